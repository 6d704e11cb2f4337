"""A prompt cut to fit the context window is recorded in its sample and counted in the summary (issue 16)."""

from __future__ import annotations

import pytest

from clinqa.data.schema import Question
from clinqa.evaluate import prompts
from clinqa.evaluate.methods import make_items, score_generate, score_letter, score_option
from clinqa.evaluate.report import summarize
from clinqa.models.truncation import note_truncated, truncated_flags, watch_truncation

pytestmark = pytest.mark.usefixtures("one_thread")


def question(qid: str, words: int) -> Question:
    return Question(
        id=qid,
        question="Which drug first? " + "filler " * words,
        answer="A",
        options={"A": "adrenaline", "B": "cetirizine", "C": "steroids"},
    )


@pytest.mark.parametrize("scorer", [score_option, score_letter, score_generate])
def test_long_prompts_are_flagged_and_counted(tiny_predictor, scorer):
    tiny_predictor.max_length = 96  # a small window: the long question cannot fit, the short one does
    qs = [question("short", 3), question("long", 200)]
    assert (
        len(tiny_predictor.encode(prompts.cloze_prompt(qs[1])))
        > 96
        > len(tiny_predictor.encode(prompts.letter_prompt(qs[0], qs[0].options))) + 8
    )
    samples = scorer(tiny_predictor, make_items(qs, 2, 0), max_new_tokens=4)
    assert [(s.question_id, s.truncated) for s in samples] == [("short", False)] * 2 + [("long", True)] * 2
    assert summarize(samples)["truncated"] == 2


def test_nothing_is_flagged_in_a_normal_window(tiny_predictor):
    samples = score_option(tiny_predictor, make_items([question("a", 3), question("b", 20)], 1, 0))
    assert not any(s.truncated for s in samples) and summarize(samples)["truncated"] == 0


def test_flags_follow_text_through_wrappers_and_fall_back_to_the_index():
    with watch_truncation() as notes:
        note_truncated(0, "EXPERT PREAMBLE ... prompt two")  # a wrapper added text around prompt two
        note_truncated(2, "rewritten beyond recognition")
    note_truncated(1, "outside any watcher: ignored")
    assert truncated_flags(notes, ["prompt one", "prompt two", "prompt three"]) == [False, True, True]
