"""Structured prompts (clinqa.models.request.Prompt) and the optional predictor capabilities
(runtime-checkable protocols in clinqa.models.base)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from clinqa.adapt.prompting import PromptPredictor
from clinqa.data.schema import Question
from clinqa.evaluate import methods, prompts
from clinqa.models.base import (
    Annotates,
    ContinuationScore,
    Encodes,
    ModelInfo,
    ReportsLogprobs,
    capabilities,
    logprobs_available,
)
from clinqa.models.request import Prompt, rewritten

Q = Question(
    id="q7",
    question="  Which drug reverses warfarin?  ",
    options={"A": "Vitamin K", "B": "Protamine"},
    answer="A",
    meta={"contexts": ["First abstract.", "Second abstract."], "source_row": 3},
)


def test_prompt_texts_are_the_formats_byte_for_byte():
    shown = {"A": "Protamine", "B": "Vitamin K"}
    ctx = "Context: First abstract. Second abstract.\n"
    letter = prompts.letter_prompt(Q, shown)
    cloze = prompts.cloze_prompt(Q)
    gen = prompts.generate_prompt(Q, shown)
    assert letter == ctx + "Which drug reverses warfarin?\nA. Protamine\nB. Vitamin K\nAnswer:"
    assert cloze == ctx + "Question: Which drug reverses warfarin?\nAnswer:"
    assert (
        gen == prompts.GENERATE_INSTRUCTION + "\n\n" + ctx + "Which drug reverses warfarin?\nA. Protamine\nB. Vitamin K"
    )
    for p, kind in ((letter, "letter"), (cloze, "option"), (gen, "generate")):
        assert isinstance(p, Prompt) and p.kind == kind
        assert p.stem == "Which drug reverses warfarin?" and p.question_id == "q7"
        assert p.meta["source_row"] == 3
        assert type(p.text) is str and type(str(p)) is str and str(p) == p.text == p
        assert hash(p) == hash(p.text) and {p.text: 1}[p] == 1  # equality and hashing are the text's
        assert type(p + "x") is str  # string operations give plain text
        assert repr(p) == repr(p.text)
    assert dict(letter.options) == shown and dict(gen.options) == shown and dict(cloze.options) == {}
    with pytest.raises(TypeError):
        letter.options["C"] = "x"  # read only


def test_prompt_pickles_copies_and_rewrites():
    p = prompts.letter_prompt(Q, Q.options)
    for back in (pickle.loads(pickle.dumps(p)), copy.deepcopy(p), copy.copy(p)):
        assert isinstance(back, Prompt) and back == p
        assert (back.stem, back.kind, dict(back.options), back.question_id) == (p.stem, p.kind, dict(p.options), "q7")
        assert dict(back.meta) == dict(p.meta)
    r = rewritten(p, "PREFIX\n" + p)
    assert isinstance(r, Prompt) and r == "PREFIX\n" + p.text and r.stem == p.stem and r.kind == "letter"
    assert rewritten("typed by a user", "PREFIX typed") == "PREFIX typed"
    assert type(rewritten("typed by a user", "PREFIX typed")) is str
    with pytest.raises(ValueError, match="unknown prompt kind"):
        Prompt("x", stem="x", kind="cloze")


def test_a_prompt_reaches_the_model_as_its_text(tiny_predictor):
    """Tokenizer and model see exactly the text: same ids, same scores as the plain str."""
    p = prompts.letter_prompt(Q, Q.options)
    assert tiny_predictor.encode(p) == tiny_predictor.encode(p.text)
    a = tiny_predictor.next_token_logprobs([p], [" A", " B"])
    b = tiny_predictor.next_token_logprobs([p.text], [" A", " B"])
    assert np.array_equal(a, b)
    c = prompts.cloze_prompt(Q)
    assert tiny_predictor.score_continuations([(c, [" Vitamin K"])]) == tiny_predictor.score_continuations(
        [(c.text, [" Vitamin K"])]
    )


class Plain:
    """The four Predictor methods and nothing else."""

    def __init__(self, can_score: bool | None = None):
        self.info = ModelInfo(spec="plain", backend="fake", name="plain")
        if can_score is not None:
            self.logprobs_available = can_score

    def score_continuations(self, groups):
        return [[ContinuationScore(-1.0, 1, len(c)) for c in conts] for _, conts in groups]

    def next_token_logprobs(self, contexts, candidates):
        return np.zeros((len(contexts), len(candidates)))

    def generate(self, prompts, config=None):
        return ["Answer: A" for _ in prompts]

    def hidden_states(self, texts, layers):
        return [np.zeros((len(layers), 1, 2)) for _ in texts]


def test_capabilities_are_declared_not_probed(tiny_predictor):
    local = set(capabilities(tiny_predictor))
    assert local == {
        "Encodes",
        "HasTokenizer",
        "FormatsChat",
        "HasContextLimit",
        "SharesPrefix",
        "ReadsTokenLogprobs",
        "ReportsCost",
        "LoadsAdapters",
    }
    wrapped = PromptPredictor(tiny_predictor, "Be careful.\n\n", "careful")
    # the base's tokenizer, chat template, window and cost pass through; what would bypass the prefix does not
    assert set(capabilities(wrapped)) == {
        "Annotates",
        "Encodes",
        "HasTokenizer",
        "FormatsChat",
        "HasContextLimit",
        "ReportsCost",
        "ReportsLogprobs",
    }
    assert wrapped.encode("a b") == tiny_predictor.encode("a b") and wrapped.tokenizer is tiny_predictor.tokenizer
    assert wrapped.max_length == tiny_predictor.max_length
    assert not hasattr(wrapped, "next_token_logprobs_shared") and not hasattr(wrapped, "load_adapter")
    bare = PromptPredictor(Plain(), "Be careful.\n\n", "careful")
    assert set(capabilities(Plain())) == set() and set(capabilities(bare)) == {"Annotates", "ReportsLogprobs"}
    assert not isinstance(bare, Encodes) and not hasattr(bare, "encode")


def test_logprobs_available_passes_through_wrappers():
    assert logprobs_available(Plain()) is True  # says nothing: taken to score
    assert not isinstance(Plain(), ReportsLogprobs)
    chat_only = Plain(can_score=False)
    assert logprobs_available(chat_only) is False
    assert logprobs_available(PromptPredictor(chat_only, "x\n\n", "x")) is False
    assert logprobs_available(PromptPredictor(Plain(can_score=True), "x\n\n", "x")) is True


def test_annotations_come_only_from_annotating_predictors():
    p = prompts.cloze_prompt(Q)
    assert methods.annotations(Plain(), p) == {}
    wrapped = PromptPredictor(Plain(), "x\n\n", "mine")
    assert isinstance(wrapped, Annotates) and methods.annotations(wrapped, p) == {"prompt": "mine"}
    [sample] = methods.score_option(wrapped, methods.make_items([Q], 1, 0))
    assert sample.extras["prompt"] == "mine"
