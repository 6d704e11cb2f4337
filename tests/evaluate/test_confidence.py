"""The option method's confidence comes from the rule that made its prediction; calibration per rule.

Hand example (a fake predictor returns fixed log-likelihoods, so every number below is worked out by hand):

q1: A "ab" logprob -2, B "abcd" logprob -3, gold B.
    sum rule: A (-2 > -3), wrong, p_sum(A) = 1 / (1 + e^-1) = 0.731059
    length-normalised: A -1.0, B -0.75 -> B, right, p_norm(B) = 1 / (1 + e^-0.25) = 0.562177
q2: A "x" logprob -1, B "xy" logprob -4, gold B.
    sum rule: A, wrong, p_sum(A) = 1 / (1 + e^-3) = 0.952574
    length-normalised: A -1.0, B -2.0 -> A, wrong, p_norm(A) = 1 / (1 + e^-1) = 0.731059
ECE (10 bins, each sample alone in its bin, weight 1/2):
    norm rule: (|1 - 0.562177| + |0 - 0.731059|) / 2 = 0.584441
    sum rule:  (|0 - 0.731059| + |0 - 0.952574|) / 2 = 0.841817
"""

from __future__ import annotations

import json
import math

import pytest

from clinqa.data.schema import Question
from clinqa.evaluate import EvalConfig, Run
from clinqa.evaluate.methods import make_items, score_option
from clinqa.evaluate.report import as_sum_variant, summarize
from clinqa.models.base import ContinuationScore

LOGPROBS = {"ab": -2.0, "abcd": -3.0, "x": -1.0, "xy": -4.0}


class FixedScores:
    """A predictor whose log-likelihood of each option text is fixed (looked up by the text)."""

    def score_continuations(self, groups):
        return [[ContinuationScore(LOGPROBS[c.strip()], 1, len(c)) for c in conts] for _, conts in groups]


def hand_questions():
    return [
        Question(id="q1", question="first?", options={"A": "ab", "B": "abcd"}, answer="B"),
        Question(id="q2", question="second?", options={"A": "x", "B": "xy"}, answer="B"),
    ]


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_option_probs_follow_the_normalised_rule_and_sum_probs_are_kept():
    s1, s2 = score_option(FixedScores(), make_items(hand_questions(), shuffles=1, seed=0))
    for s in (s1, s2):
        assert s.pred == max(s.probs, key=s.probs.get)  # argmax(probs) == pred
        assert s.extras["pred_sum"] == max(s.extras["probs_sum"], key=s.extras["probs_sum"].get)
    assert (s1.pred, s1.correct, s1.extras["pred_sum"], s1.extras["correct_sum"]) == ("B", True, "A", False)
    assert s1.confidence == pytest.approx(sig(0.25)) == pytest.approx(0.562177, abs=1e-6)
    assert s1.extras["probs_sum"]["A"] == pytest.approx(sig(1.0))
    assert (s2.pred, s2.correct) == ("A", False)
    assert s2.confidence == pytest.approx(0.731059, abs=1e-6)
    assert s2.extras["probs_sum"]["A"] == pytest.approx(0.952574, abs=1e-6)


def test_calibration_is_reported_per_rule_by_hand():
    samples = score_option(FixedScores(), make_items(hand_questions(), shuffles=1, seed=0))
    s = summarize(samples)
    norm, summ = s["calibration_by_rule"]["length-normalised"], s["calibration_by_rule"]["sum"]
    assert norm["ece"] == pytest.approx(0.584441, abs=1e-6)
    assert summ["ece"] == pytest.approx(0.841817, abs=1e-6)
    assert norm["mean_confidence"] == pytest.approx((0.562177 + 0.731059) / 2, abs=1e-6)
    assert summ["mean_confidence"] == pytest.approx((0.731059 + 0.952574) / 2, abs=1e-6)
    # Brier, norm rule: q1 2 x (1 - 0.562177)^2, q2 2 x 0.731059^2; sum rule: 2 x 0.731059^2, 2 x 0.952574^2
    assert norm["brier"] == pytest.approx((2 * 0.437823**2 + 2 * 0.731059**2) / 2, abs=1e-5)
    assert summ["brier"] == pytest.approx((2 * 0.731059**2 + 2 * 0.952574**2) / 2, abs=1e-5)
    assert (norm["accuracy"], summ["accuracy"]) == (0.5, 0.0)
    assert s["calibration"]["ece"] == norm["ece"] and s["calibration"]["rule"] == "length-normalised"
    assert s["confidence_mismatch"] == 0


def old_style_line(q: str, texts: dict[str, str], gold: str) -> dict:
    """A sample line as runs before the fix wrote it: probs = softmax of the sums, no probs_sum."""
    sums = {k: LOGPROBS[v] for k, v in texts.items()}
    norms = {k: LOGPROBS[v] / len(v) for k, v in texts.items()}
    z = sum(math.exp(v) for v in sums.values())
    pred, pred_sum = max(norms, key=norms.get), max(sums, key=sums.get)
    return {
        "question_id": q,
        "shuffle": 0,
        "permutation": [0, 1],
        "options": texts,
        "gold": gold,
        "pred": pred,
        "correct": pred == gold,
        "method": "option",
        "scores": norms,
        "probs": {k: math.exp(v) / z for k, v in sums.items()},
        "extras": {"logprob_sum": sums, "pred_sum": pred_sum, "correct_sum": pred_sum == gold},
    }


def test_an_old_run_folder_loads_and_reports_consistently(tmp_path):
    Run.open(tmp_path / "old", EvalConfig(model="m", data="d", method="option"))
    lines = [old_style_line("q1", {"A": "ab", "B": "abcd"}, "B"), old_style_line("q2", {"A": "x", "B": "xy"}, "B")]
    (tmp_path / "old" / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    samples = Run.load(tmp_path / "old").samples()
    assert all(s.pred == max(s.probs, key=s.probs.get) for s in samples)
    assert samples[0].extras["probs_sum"]["A"] == pytest.approx(sig(1.0))
    s = summarize(samples)
    assert s["calibration_by_rule"]["length-normalised"]["ece"] == pytest.approx(0.584441, abs=1e-6)
    assert s["calibration_by_rule"]["sum"]["ece"] == pytest.approx(0.841817, abs=1e-6)
    assert [x.probs for x in as_sum_variant(samples)] == [x.extras["probs_sum"] for x in samples]


def test_letter_samples_are_untouched_by_the_migration():
    from clinqa.evaluate.sample import Sample

    s = Sample(
        question_id="q",
        permutation=[0, 1],
        options={"A": "a", "B": "b"},
        gold="A",
        pred="A",
        correct=True,
        method="letter",
        scores={"A": -1.0, "B": -2.0},
        probs={"A": 0.6, "B": 0.4},
    )
    assert s.probs == {"A": 0.6, "B": 0.4} and "probs_sum" not in s.extras
