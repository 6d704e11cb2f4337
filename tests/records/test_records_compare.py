"""clinqa.records.compare and `clinqa records compare`: figures with intervals, paired differences."""

import json
import os
import subprocess
import sys

import pytest

from clinqa.errors import ClinqaError
from clinqa.records.compare import compare_runs, paired, per_question, run_figures, to_markdown
from clinqa.records.evaluation import RECORDS_FILE, RecordSample
from clinqa.runs import RunFolder


def sample(qid, selected, relevant, *, em=None, meteor=0.0, rouge=0.0, abstained=False, seconds=1.0):
    return {
        "key": qid,
        "question_id": qid,
        "patient_id": "p",
        "qtype": "lookup",
        "question": f"{qid}?",
        "reference": "r",
        "relevant_ids": list(relevant),
        "selected": [{"id": x, "score": 1.0} for x in selected],
        "timings": {"total": seconds},
        "metrics": {
            "exact_match": em,
            "meteor": meteor,
            "rouge_l": rouge,
            "abstained": abstained,
            "answerable": bool(relevant),
        },
    }


# Run A: q1 selects {a, x} of relevant {a, b}: tp 1 fp 1 fn 1 -> F1 0.5; q2 selects {c} of {c}: F1 1;
# q3 is unanswerable (no relevant), selects {y}: no F1, and it abstained.
RUN_A = [
    sample("q1", ["a", "x"], ["a", "b"], em=0.0, meteor=0.2, rouge=0.1),
    sample("q2", ["c"], ["c"], em=1.0, meteor=0.8, rouge=0.6),
    sample("q3", ["y"], [], em=None, meteor=0.5, rouge=0.5, abstained=True, seconds=4.0),
]
# Run B: q1 finds both (F1 1), q2 selects nothing (F1 0) and abstains falsely, q3 answers.
RUN_B = [
    sample("q1", ["a", "b"], ["a", "b"], em=1.0, meteor=0.6, rouge=0.4),
    sample("q2", [], ["c"], em=0.0, meteor=0.0, rouge=0.0, abstained=True),
    sample("q3", [], [], em=None, meteor=0.1, rouge=0.1),
]


def test_per_question_values_by_hand():
    assert per_question(RUN_A[0])["stage1_f1"] == pytest.approx(0.5)
    assert per_question(RUN_A[1])["stage1_f1"] == 1.0
    q3 = per_question(RUN_A[2])
    assert q3["stage1_f1"] is None and q3["false_abstention"] is None and q3["correct_abstention"] == 1.0
    assert per_question(RUN_B[1])["false_abstention"] == 1.0 and per_question(RUN_B[1])["correct_abstention"] is None


def test_run_figures_means_micro_and_intervals():
    fig = run_figures(RUN_A)
    assert fig["n"] == 3 and fig["stage1_f1"]["n"] == 2 and fig["stage1_f1"]["mean"] == pytest.approx(0.75)
    assert fig["exact_match"] == {"n": 2, "mean": 0.5, "ci95": fig["exact_match"]["ci95"]}
    # micro over all three questions: tp 2, fp 2 (x, y), fn 1 -> P 0.5, R 2/3, F1 4/7
    assert fig["stage1_micro_precision"]["mean"] == pytest.approx(0.5)
    assert fig["stage1_micro_recall"]["mean"] == pytest.approx(2 / 3)
    assert fig["stage1_micro_f1"]["mean"] == pytest.approx(4 / 7)
    lo, hi = fig["stage1_micro_f1"]["ci95"]
    assert 0.0 <= lo <= 4 / 7 <= hi <= 1.0 and lo < hi
    assert fig["seconds_per_question"] == pytest.approx(2.0)


def test_paired_differences_on_shared_questions_by_hand():
    d = paired(RUN_A, RUN_B)
    # stage-1 F1 on q1, q2: (1 - 0.5) + (0 - 1) -> mean -0.25
    assert d["stage1_f1"]["n"] == 2 and d["stage1_f1"]["difference"] == pytest.approx(-0.25)
    assert d["meteor"]["n"] == 3 and d["meteor"]["difference"] == pytest.approx((0.4 - 0.8 - 0.4) / 3)
    assert d["false_abstention"]["difference"] == pytest.approx(0.5)  # q2 newly abstains
    lo, hi = d["meteor"]["ci95"]
    assert lo <= d["meteor"]["difference"] <= hi and 0.0 <= d["meteor"]["p"] <= 1.0
    # micro F1 over the shared questions: A tp 2 fp 2 fn 1 -> 4/7; B tp 2 fp 0 fn 1 -> 4/5
    micro = d["stage1_micro_f1"]
    assert micro["n"] == 3 and micro["difference"] == pytest.approx(4 / 5 - 4 / 7)
    assert micro["ci95"][0] <= micro["difference"] <= micro["ci95"][1] and 0.0 <= micro["p"] <= 1.0
    # only shared questions count
    d2 = paired(RUN_A, RUN_B[:1])
    assert d2["stage1_f1"]["n"] == 1 and d2["stage1_f1"]["difference"] == pytest.approx(0.5)
    # q1 alone: A selects {a, x} of {a, b} (F1 0.5), B both (F1 1); one question resamples to itself
    assert d2["stage1_micro_f1"] == {
        "n": 1,
        "difference": pytest.approx(0.5),
        "ci95": [0.5, 0.5],
        "p": pytest.approx(2 / 2001),
    }


def test_identical_runs_differ_by_nothing_and_the_table_names_the_baseline():
    res = compare_runs({"a": RUN_A, "b": RUN_A}, baseline="a")
    assert res["vs_baseline"]["b"]["meteor"]["difference"] == 0.0
    md = to_markdown(res)
    assert "run − a" in md and "| b |" in md and "| a | 3 |" in md
    with pytest.raises(ClinqaError, match="not one of the runs"):
        compare_runs({"a": RUN_A}, baseline="zzz")


def _write_run(folder, samples):
    with RunFolder.open(folder, {"m": 1}, kind="records", sample_type=RecordSample, samples_file=RECORDS_FILE) as run:
        run.append([RecordSample(**s) for s in samples])


def test_cli_compares_run_folders_and_writes_tables(tmp_path):
    _write_run(tmp_path / "bm25", RUN_A)
    _write_run(tmp_path / "llm", RUN_B)
    out = tmp_path / "cmp.md"
    r = subprocess.run(
        [sys.executable, "-m", "clinqa.cli", "records", "compare", str(tmp_path / "bm25"), f"tuned={tmp_path / 'llm'}",
         "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "40"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "| tuned |" in r.stdout and "run − bm25" in r.stdout
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["baseline"] == "bm25"
    assert data["vs_baseline"]["tuned"]["stage1_f1"]["difference"] == pytest.approx(-0.25)
    assert out.read_text() == to_markdown(compare_runs({"bm25": RUN_A, "tuned": RUN_B}))
    bad = subprocess.run(
        [sys.executable, "-m", "clinqa.cli", "records", "compare", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
