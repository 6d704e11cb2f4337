"""LLM specialty annotation: prompt voting constrained to the taxonomy, trade-off table, files, conformal sets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.specialties.annotate import (
    PROMPTS,
    SPECIALTY_IDS,
    Annotation,
    annotate,
    annotate_to_file,
    annotations_from_scores,
    conformal_from_probs,
    label_continuations,
    read_annotations,
    tradeoff_table,
    write_annotations,
)
from clinqa.specialties.taxonomy import SPECIALTIES


def _q(
    i: int, text: str = "A 60-year-old man has crushing chest pain. What is the next step?", specs=("cardiology",)
) -> Question:
    return Question(id=f"q{i}", question=text, options={"A": "ECG", "B": "CT"}, answer="A", specialties=list(specs))


QUESTIONS = [
    _q(0),
    _q(
        1,
        "A 4-year-old child has a barking cough and stridor. What is the diagnosis?",
        ("pediatrics", "infectious_diseases"),
    ),
    _q(
        2,
        "A pregnant woman at 32 weeks has headache and hypertension. What is the diagnosis?",
        ("obstetrics_gynecology",),
    ),
]


class CountingPredictor:
    """Wraps a predictor and records every score_continuations call."""

    def __init__(self, inner):
        self.inner = inner
        self.info = inner.info
        self.calls: list[list[tuple[str, list[str]]]] = []

    def score_continuations(self, groups):
        self.calls.append([(ctx, list(conts)) for ctx, conts in groups])
        return self.inner.score_continuations(groups)

    @property
    def groups(self):
        return [g for call in self.calls for g in call]


def test_prompts_are_five_distinct_templates():
    assert len(PROMPTS) == 5 and len(set(PROMPTS)) == 5
    for p in PROMPTS:
        assert p.count("{q}") == 1 and p.format(q="X")
    assert label_continuations() == [" " + s.name for s in SPECIALTIES]


def test_annotate_labels_in_taxonomy_and_votes_sum(tiny_predictor):
    anns = annotate(tiny_predictor, QUESTIONS, n_prompts=5, min_votes=1)
    assert [a.question_id for a in anns] == ["q0", "q1", "q2"]
    for a in anns:
        assert sum(a.votes.values()) == 5 and len(a.per_prompt) == 5
        assert set(a.votes) <= set(SPECIALTY_IDS) and set(a.per_prompt) <= set(SPECIALTY_IDS)
        assert a.label in SPECIALTY_IDS  # min_votes=1: always labelled
        assert a.label == a.top_label and a.votes[a.label] == max(a.votes.values())
        assert len(a.probs) == len(SPECIALTY_IDS) and abs(sum(a.probs) - 1) < 1e-9
        assert {s: a.per_prompt.count(s) for s in a.votes} == a.votes


def test_each_vote_is_the_argmax_of_the_label_scores_computed_directly(tiny_predictor):
    """Uncalibrated, token-normalised: prompt k's vote is the label with the highest mean log-probability
    per token after prompt k, scored here one prompt at a time."""
    anns = annotate(tiny_predictor, QUESTIONS, n_prompts=5, min_votes=1, calibrate=False)
    for q, a in zip(QUESTIONS, anns):
        for p, vote in zip(PROMPTS, a.per_prompt):
            scored = tiny_predictor.score_continuations([(p.format(q=q.question), label_continuations())])[0]
            assert vote == SPECIALTY_IDS[int(np.argmax([c.logprob / c.n_tokens for c in scored]))]


def test_min_votes_leaves_weak_majorities_unlabelled(tiny_predictor):
    loose = annotate(tiny_predictor, QUESTIONS, n_prompts=3, min_votes=1, calibrate=False)
    strict = annotate(tiny_predictor, QUESTIONS, n_prompts=3, min_votes=3, calibrate=False)
    for a, b in zip(loose, strict):
        assert a.probs == pytest.approx(b.probs) and a.votes == b.votes
        assert b.label == (a.label if a.top_votes == 3 else None)


@pytest.mark.parametrize("calibrate", [False, True])
def test_one_group_per_question_and_prompt(tiny_predictor, calibrate):
    wrapped = CountingPredictor(tiny_predictor)
    annotate(wrapped, QUESTIONS, n_prompts=4, min_votes=2, calibrate=calibrate, batch_size=2)
    groups = wrapped.groups
    labels = label_continuations()
    assert all(conts == labels for _, conts in groups)  # the 15 display names, scored, never generated
    cf = [g for g in groups if "N/A" in g[0]]
    assert len(cf) == (4 if calibrate else 0)
    real = [ctx for ctx, _ in groups if "N/A" not in ctx]
    assert len(real) == len(QUESTIONS) * 4
    for q in QUESTIONS:  # each question appears once under each of the 4 prompts
        assert sorted(ctx for ctx in real if q.question in ctx) == sorted(p.format(q=q.question) for p in PROMPTS[:4])
    # batches of 2 questions -> 2 calls for 3 questions (plus one content-free call)
    assert len(wrapped.calls) == 2 + (1 if calibrate else 0)


def test_calibration_subtracts_content_free_scores():
    scores = np.zeros((1, 2, 15))
    scores[0, :, 3] = 1.0  # label 3 is preferred by both prompts ...
    scores[0, :, 5] = 0.9
    cf = np.zeros((2, 15))
    cf[:, 3] = 0.5  # ... but mostly because the prompts favour it anyway
    raw = annotations_from_scores(["x"], scores, min_votes=2)[0]
    cal = annotations_from_scores(["x"], scores, min_votes=2, content_free=cf)[0]
    assert raw.label == SPECIALTY_IDS[3] and cal.label == SPECIALTY_IDS[5]


def test_majority_tie_broken_by_mean_probability():
    scores = np.full((1, 4, 15), -5.0)
    scores[0, 0, 0] = scores[0, 1, 0] = 0.0  # two prompts: cardiology, moderately sure
    scores[0, 2, 1] = scores[0, 3, 1] = 3.0  # two prompts: gastroenterology, very sure
    a = annotations_from_scores(["x"], scores, min_votes=2)[0]
    assert a.votes == {"gastroenterology": 2, "cardiology": 2}
    assert a.label == a.top_label == "gastroenterology"


def _ann(qid: str, votes: dict[str, int], n: int = 5) -> Annotation:
    probs = [0.0] * 15
    for sid, v in votes.items():
        probs[SPECIALTY_IDS.index(sid)] = v / n
    per = [s for s, v in votes.items() for _ in range(v)]
    return Annotation(qid, votes, None, probs, per)


def test_tradeoff_table_hand_example():
    anns = [
        _ann("q0", {"cardiology": 5}),  # right
        _ann("q1", {"infectious_diseases": 3, "pediatrics": 2}),  # right: second gold label
        _ann(
            "q2", {"neurology": 2, "cardiology": 2, "surgery": 1}
        ),  # wrong (tie -> higher prob: both 0.4 -> taxonomy order cardiology)
        _ann("q3", {"dermatology": 4, "surgery": 1}),  # no gold question
    ]
    table = tradeoff_table(anns, QUESTIONS)
    assert [r["min_votes"] for r in table] == [1, 2, 3, 4, 5]
    cov = [r["coverage"] for r in table]
    assert cov == [1.0, 1.0, 0.75, 0.5, 0.25]
    assert all(a >= b for a, b in zip(cov, cov[1:]))
    assert anns[2].top_label == "cardiology"
    # t<=2: q0, q1 right, q2 wrong (q3 has no gold) -> 2/3; t=3: q0, q1 -> 1; t=4: q0 only; t=5: q0
    assert [r["n_gold"] for r in table] == [3, 3, 2, 1, 1]
    assert table[0]["accuracy"] == pytest.approx(2 / 3) and table[2]["accuracy"] == 1.0
    assert table[0]["accuracy_primary"] == pytest.approx(1 / 3)  # q1's primary gold is pediatrics
    none = tradeoff_table([_ann("zz", {"surgery": 5})], QUESTIONS)
    assert none[0]["accuracy"] is None and none[0]["coverage"] == 1.0


def test_tradeoff_table_monotone_on_model_output(tiny_predictor):
    anns = annotate(tiny_predictor, QUESTIONS, min_votes=1)
    cov = [r["coverage"] for r in tradeoff_table(anns, QUESTIONS)]
    assert len(cov) == 5 and cov[0] == 1.0 and all(a >= b for a, b in zip(cov, cov[1:]))


def test_conformal_from_probs_coverage_near_target():
    rng = np.random.default_rng(0)
    n = 4000
    probs = rng.dirichlet(np.full(15, 0.3), size=n)
    gold = [[SPECIALTY_IDS[rng.choice(15, p=row)]] for row in probs]
    res = conformal_from_probs(probs, gold, alpha=0.1, cal_fraction=0.5, seed=1)
    assert res["n_cal"] == res["n_test"] == n // 2
    assert abs(res["coverage"] - 0.9) < 0.03 and res["coverage"] == res["coverage_any"]
    assert 1 <= res["mean_set_size"] < 15 and 0 < res["precision"] <= 1 and 0 < res["recall"] <= 1
    # annotations are accepted in place of a probability matrix
    anns = [Annotation(str(i), {"cardiology": 1}, None, list(p), ["cardiology"]) for i, p in enumerate(probs[:200])]
    assert conformal_from_probs(anns, gold[:200], alpha=0.2)["n_test"] == 100


def test_conformal_from_probs_all_mode_and_errors():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(15), size=400)
    gold = [["cardiology", "neurology"]] * 400
    res = conformal_from_probs(probs, gold, alpha=0.2, mode="all")
    assert res["coverage"] == res["coverage_all"]
    with pytest.raises(ClinqaError, match="one row per item"):
        conformal_from_probs(probs, gold[:10], alpha=0.1)
    with pytest.raises(ClinqaError, match="too few"):
        conformal_from_probs(probs[:6], gold[:6], alpha=0.1)


def test_write_and_resume(tiny_predictor, tmp_path):
    out = tmp_path / "ann.jsonl"
    full = annotate(tiny_predictor, QUESTIONS, min_votes=2)
    write_annotations(out, full)  # a plain JSONL export
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in lines] == ["q0", "q1", "q2"]
    assert {"question_id", "label", "votes", "probs"} <= set(lines[0])
    back = read_annotations(out)
    assert [a.to_dict() for a in back] == [a.to_dict() for a in full]

    res = tmp_path / "resumable"  # a run folder (more in test_annotate_store.py)
    first = annotate_to_file(tiny_predictor, QUESTIONS[:2], res, min_votes=2, batch_size=1)
    assert [a.question_id for a in first] == ["q0", "q1"]
    wrapped = CountingPredictor(tiny_predictor)
    seen = []
    again = annotate_to_file(wrapped, QUESTIONS, res, min_votes=2, progress=lambda d, t: seen.append((d, t)))
    real = [ctx for ctx, _ in wrapped.groups if "N/A" not in ctx]
    assert len(real) == 5 and all(QUESTIONS[2].question in ctx for ctx in real)  # only q2 is scored
    assert seen[0] == (2, 3) and seen[-1] == (3, 3)
    assert [a.to_dict() for a in again] == [a.to_dict() for a in full]
    assert [a.to_dict() for a in read_annotations(res)] == [a.to_dict() for a in full]
    wrapped.calls.clear()
    annotate_to_file(wrapped, QUESTIONS, res, min_votes=2)
    assert wrapped.calls == []  # everything done: nothing scored
    with pytest.raises(ClinqaError, match="min_votes: 2 -> 3"):
        annotate_to_file(tiny_predictor, QUESTIONS, res, min_votes=3)
    with pytest.raises(ClinqaError, match="twice"):
        annotate_to_file(tiny_predictor, [QUESTIONS[0], QUESTIONS[0]], tmp_path / "dup")


def test_error_cases(tiny_predictor):
    with pytest.raises(ClinqaError, match="min_votes=4 can never be reached"):
        annotate(tiny_predictor, QUESTIONS, n_prompts=3, min_votes=4)
    with pytest.raises(ClinqaError, match="min_votes must be a positive"):
        annotate(tiny_predictor, QUESTIONS, min_votes=0)
    for bad in (0, 6, -1, 2.5):
        with pytest.raises(ClinqaError, match="n_prompts must be an integer from 1 to 5"):
            annotate(tiny_predictor, QUESTIONS, n_prompts=bad, min_votes=1)
    blank = Question.model_construct(
        id="blank", question="   \n\t", options={"A": "x", "B": "y"}, answer="A", specialties=[], source="", meta={}
    )
    with pytest.raises(ClinqaError, match="'blank'.*empty text"):
        annotate(tiny_predictor, [QUESTIONS[0], blank])
    with pytest.raises(ClinqaError, match="empty text"):
        annotate(tiny_predictor, ["  "])
    with pytest.raises(ClinqaError, match="norm"):
        annotate(tiny_predictor, QUESTIONS, norm="word")
    with pytest.raises(ClinqaError, match="at least one annotation"):
        tradeoff_table([], QUESTIONS)
    assert annotate(tiny_predictor, []) == []
