"""The pieces of benchmarks/smedqa_study.py and benchmarks/annotate_medmcqa.py that need no shared data,
and the hand-labelled MedMCQA validation set shipped in benchmarks/data."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
VAL = BENCH / "data" / "medmcqa_specialty_val.jsonl"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    try:
        import smedqa_study

        yield smedqa_study
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import annotate_medmcqa

        yield annotate_medmcqa
    finally:
        sys.path.remove(str(BENCH))


def _row(qid: str, spec: str, prob: float) -> dict:
    return {
        "id": qid,
        "question": f"q {qid}",
        "options": {"A": "x", "B": "y"},
        "answer": "A",
        "specialties": [spec],
        "source": "t",
        "meta": {"specialty_annotation": {"prob": prob}},
    }


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_select_prefers_confident_questions_and_tops_up_with_the_most_confident_rest(study, tmp_path):
    rows = [
        _row("a1", "cardiology", 0.9),
        _row("a2", "cardiology", 0.8),
        _row("a3", "cardiology", 0.3),
        _row("a4", "cardiology", 0.4),
        _row("n1", "neurology", 0.7),
        _row("n2", "neurology", 0.6),
        _row("n3", "neurology", 0.95),
        _row("n4", "neurology", 0.55),
        _row("x1", "psychiatry", 0.99),
    ]
    labelled = _write(tmp_path / "labelled.jsonl", rows)
    path = study.select(labelled, tmp_path, ("cardiology", "neurology"), per_specialty=3, min_prob=0.5, seed=0)
    chosen = [json.loads(line) for line in path.read_text().splitlines()]
    by = collections.defaultdict(set)
    for r in chosen:
        by[r["specialties"][0]].add(r["id"])
    # cardiology: both confident ones, then the most confident of the rest (a4, 0.4 beats a3, 0.3)
    assert by["cardiology"] == {"a1", "a2", "a4"}
    # neurology: four confident ones, three drawn among them
    assert len(by["neurology"]) == 3 and by["neurology"] <= {"n1", "n2", "n3", "n4"}
    assert set(by) == {"cardiology", "neurology"}
    info = json.loads((tmp_path / "selection.json").read_text())
    assert info["specialties"]["cardiology"] == {"labelled": 4, "prob>=0.5": 2, "selected": 3}
    # a second call finds the file and keeps it (resumable), even with other arguments
    assert study.select(labelled, tmp_path, ("cardiology",), per_specialty=1, min_prob=0.5, seed=1) == path
    assert len(path.read_text().splitlines()) == 6


def test_select_balances_down_when_a_specialty_is_short(study, tmp_path):
    rows = [_row(f"c{i}", "cardiology", 0.9) for i in range(5)] + [
        _row("n1", "neurology", 0.9),
        _row("n2", "neurology", 0.2),
    ]
    path = study.select(
        _write(tmp_path / "l.jsonl", rows), tmp_path, ("cardiology", "neurology"), per_specialty=4, min_prob=0.5, seed=0
    )
    counts = collections.Counter(json.loads(line)["specialties"][0] for line in path.read_text().splitlines())
    assert counts == {"cardiology": 2, "neurology": 2}
    assert json.loads((tmp_path / "selection.json").read_text())["balanced_at"] == 2


def test_accuracy_kappa_and_paired_helpers(bench):
    gold = [["cardiology"], ["neurology", "pediatrics"], ["surgery"], ["psychiatry"]]
    res = bench.accuracy_with_ci(["cardiology", "pediatrics", "neurology", "psychiatry"], gold)
    assert res["accuracy"] == 0.75 and res["hits"] == [1.0, 1.0, 0.0, 1.0] and res["ci95"][0] <= 0.75 <= res["ci95"][1]
    # kappa by hand: observed agreement 2/4; each rater a,a,b,b vs a,b,a,b -> expected 1/2 -> kappa 0
    assert bench.kappa(["a", "a", "b", "b"], ["a", "b", "a", "b"]) == pytest.approx(0.0)
    assert bench.kappa(["a", "b", "a"], ["a", "b", "a"]) == pytest.approx(1.0)
    p = bench.paired_vs([1, 1, 1, 0], [0, 0, 1, 0])
    assert p["difference"] == pytest.approx(0.5)
    assert bench.share_in(["cardiology", "surgery"], ("cardiology",)) == 0.5


def test_medmcqa_validation_set_is_hand_labelled_against_the_taxonomy():
    from clinqa.data.loaders import load_questions
    from clinqa.specialties.taxonomy import SPECIALTIES

    ids = {s.id for s in SPECIALTIES}
    # MedMCQA repeats an option text in a few rows: the loaders refuse those (a tie no scorer can break),
    # so they are skipped and counted; count them independently from the raw file
    raw = [json.loads(line) for line in VAL.read_text().splitlines()]
    repeated = sum(len({" ".join(v.split()).lower() for v in r["options"].values()}) < len(r["options"]) for r in raw)
    res = load_questions(str(VAL), skip_invalid=True)
    qs = res.questions
    assert len(raw) == 450 and len(res.skipped) == repeated and len(qs) == 450 - repeated
    assert len({q.id for q in qs}) == len(qs)
    labelled = [q for q in qs if q.specialties]
    assert len(labelled) >= 200
    for q in qs:
        assert q.id.startswith("mirage-medmcqa-") and q.source == "mirage:medmcqa"
        assert set(q.specialties) <= ids and len(set(q.specialties)) == len(q.specialties) <= 2
        assert q.meta["primary_specialty"] == (q.specialties[0] if q.specialties else "none")
    assert [q.meta["draw"] for q in qs] == [i for i, r in enumerate(raw) if i in {q.meta["draw"] for q in qs}]
