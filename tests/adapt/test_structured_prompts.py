"""The question travels with the prompt: the router and retrieval read the stem a structured prompt
carries, through the +prompt:/+rag: rewrites, where parsing the text goes wrong; text typed by a
user is still parsed."""

from __future__ import annotations

import numpy as np
import pytest

from clinqa.adapt import apply_modifier
from clinqa.adapt.control import SteeredPredictor
from clinqa.adapt.prompting import PromptPredictor
from clinqa.adapt.rag import RagPredictor, retrieval_query, retrieval_query_from_text
from clinqa.adapt.retrieval import Document, build_index
from clinqa.adapt.router import question_from_prompt, question_from_text
from clinqa.adapt.steering import SteeringConfig, build_steering_vector
from clinqa.data.loaders import load_questions
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate import prompts
from clinqa.models.base import ContinuationScore, ModelInfo
from clinqa.models.request import Prompt
from clinqa.models.spec import Modifier

# a stem with lines that look like prompt scaffolding: an "Answer:" line, an option-like line, a "Question:"
STEM = (
    "A 70-year-old woman has palpitations.\n"
    "Answer: pending review by cardiology\n"
    "A. Fib was seen on a Holter monitor last year.\n"
    "Question: which drug prevents stroke in atrial fibrillation?"
)
FOOLING = Question(id="fool", question=STEM, options={"A": "Apixaban", "B": "Furosemide", "C": "Insulin"}, answer="A")


def formats(q: Question) -> list[Prompt]:
    return [prompts.cloze_prompt(q), prompts.letter_prompt(q, q.options), prompts.generate_prompt(q, q.options)]


def test_router_reads_the_stem_that_parsing_gets_wrong():
    for p in formats(FOOLING):
        assert question_from_prompt(p) == STEM
        assert question_from_text(p.text) != STEM  # the parser is fooled by the stem's own lines
        assert question_from_prompt(p.text) == question_from_text(p.text)  # plain text: the fallback
    typed = "Question: Which drug reverses warfarin?\nA. Vitamin K\nB. Protamine\nAnswer:"
    assert question_from_prompt(typed) == "Which drug reverses warfarin?"


def test_retrieval_query_reads_the_stem_that_parsing_gets_wrong():
    flat = " ".join(STEM.split())
    for p in formats(FOOLING):
        assert retrieval_query(p) == flat
        assert retrieval_query_from_text(p.text) != flat
        assert retrieval_query(p.text) == retrieval_query_from_text(p.text)
    letter = prompts.letter_prompt(FOOLING, {"A": "Insulin", "B": "Apixaban"})
    assert retrieval_query(letter, include_options=True) == flat + " Insulin Apixaban"  # in the order shown
    assert retrieval_query(prompts.cloze_prompt(FOOLING), include_options=True) == flat  # cloze shows none
    typed = "Question: Which drug reverses warfarin?\nA. Vitamin K\nB. Protamine\nAnswer:"
    assert retrieval_query(typed, include_options=True) == "Which drug reverses warfarin? Vitamin K Protamine"


@pytest.mark.parametrize("data", ["bundled", "bundled:control"])
def test_reading_equals_parsing_where_parsing_was_right(data):
    """On the bundled sets the parser finds every stem, so retrieval queries and routes are unchanged."""
    for q in load_questions(data).questions:
        for p in formats(q):
            assert question_from_prompt(p) == question_from_text(p.text)
            for with_options in (False, True):
                assert retrieval_query(p, include_options=with_options) == retrieval_query_from_text(
                    p.text, include_options=with_options
                )


class Recorder:
    """Records the prompts it is given."""

    def __init__(self):
        self.info = ModelInfo(spec="rec", backend="fake", name="rec")
        self.seen: list[str] = []

    def score_continuations(self, groups):
        self.seen += [c for c, _ in groups]
        return [[ContinuationScore(-1.0, 1, len(c)) for c in conts] for _, conts in groups]

    def next_token_logprobs(self, contexts, candidates):
        self.seen += list(contexts)
        return np.zeros((len(contexts), len(candidates)))

    def generate(self, prompts_, config=None):
        self.seen += list(prompts_)
        return ["Answer: A" for _ in prompts_]

    def hidden_states(self, texts, layers):
        self.seen += list(texts)
        return [np.zeros((len(layers), 1, 2)) for _ in texts]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    docs = [
        Document("af", "Apixaban prevents stroke in atrial fibrillation; palpitations are common."),
        Document("hf", "Furosemide relieves congestion in heart failure."),
    ]
    return build_index(docs, tmp_path_factory.mktemp("idx") / "i", dense=False)


def test_structure_survives_the_prompt_and_rag_rewrites(index):
    base = Recorder()
    chain = RagPredictor(PromptPredictor(base, "Be careful.\n\n", "careful"), index, k=1, mode="bm25")
    letter = prompts.letter_prompt(FOOLING, FOOLING.options)
    chain.next_token_logprobs([letter], [" A", " B", " C"])
    [seen] = base.seen
    assert isinstance(seen, Prompt) and seen.stem == STEM and seen.question_id == "fool"
    # the outer +rag: put its passages first, then the inner +prompt: its instruction before them
    assert seen.text.startswith("Be careful.\n\nReference passages:\n[af#0] ") and seen.text.endswith("\n\n" + letter)
    assert chain.annotations(letter)["rag_query"] == " ".join(STEM.split())
    assert chain.annotations(letter)["prompt"] == "careful"


class RecordingRouter:
    """Routes everything to one category and records the questions it was asked about."""

    coef = intercept = np.zeros(1)
    metrics: dict = {}

    def __init__(self):
        self.asked: list[str] = []

    def route(self, texts):
        self.asked += list(texts)
        return ["cardiology"] * len(texts)


def test_routed_steering_behind_a_prefix_routes_on_the_stem(tiny_predictor, index):
    qs = load_questions("bundled").questions[:4]
    vec = build_steering_vector(tiny_predictor, qs, SteeringConfig(layers=[1]), name="v")
    router = RecordingRouter()
    steered = SteeredPredictor(tiny_predictor, {"cardiology": vec}, router=router)
    expert = apply_modifier(steered, Modifier("prompt", "expert"))
    plain = qs[0]  # an ordinary question: behind an instruction the text parser went wrong too
    letter = prompts.letter_prompt(plain, plain.options)
    expert.next_token_logprobs([letter], [" A", " B"])
    assert router.asked == [plain.question.strip()]
    assert question_from_text(expert._rewrite(letter).text).startswith("The following are multiple choice")
    router.asked.clear()
    RagPredictor(steered, index, k=1, mode="bm25").generate([prompts.generate_prompt(FOOLING, FOOLING.options)])
    assert router.asked == [STEM]


def test_steering_needs_the_local_model_itself(tiny_predictor, tmp_path):
    qs = load_questions("bundled").questions[:4]
    build_steering_vector(tiny_predictor, qs, SteeringConfig(layers=[1]), name="v").save(tmp_path / "v")
    wrapped = apply_modifier(tiny_predictor, Modifier("prompt", "expert"))
    with pytest.raises(ClinqaError, match=r"got tiny\+prompt:expert \(PromptPredictor\).*Put \+steer: right after"):
        apply_modifier(wrapped, Modifier("steer", str(tmp_path / "v")))
