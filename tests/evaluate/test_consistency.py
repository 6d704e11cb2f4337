"""Factual-consistency grading of generated explanations: parsing, unparseable counts, resume, summary."""

from __future__ import annotations

import json
import math

import pytest

from clinqa.errors import ClinqaError
from clinqa.evaluate import EvalConfig, Run
from clinqa.evaluate.consistency import consistency_prompt, load_grades, parse_grade, summarize_consistency
from clinqa.evaluate.report import write_report
from clinqa.evaluate.sample import Sample


@pytest.mark.parametrize(
    "reply,grade",
    [
        (" 2", 2),
        ("2 - consistent", 2),
        ("Grade: 0", 0),
        (" 1\nThe explanation omits the mechanism.", 1),
        ("grade = (2)", 2),
        ("Grade: 3", None),
        ("I think it is fine.", None),
        ("Grade: 1 or Grade: 2", None),
        ("", None),
        ("1.5", None),
        ("Grade 2: consistent. Grade: 2", 2),
    ],
)
def test_parse_grade(reply, grade):
    assert parse_grade(reply) == grade


QUESTIONS = [
    {
        "id": f"q{i}",
        "question": f"Question {i}?",
        "options": {"A": "yes", "B": "no"},
        "answer": "A",
        "meta": {"rationale": f"Because of reason {i}."} if i < 5 else {},
    }
    for i in range(6)
]
# what the fake judge answers for each explanation, and the grade it means
REPLIES = {
    "q0": ("Grade: 2", 2),
    "q1": (" 2", 2),
    "q2": (" 0 - it contradicts", 0),
    "q3": ("no idea", None),
    "q4": (" 1", 1),
}


class FakeJudge:
    def __init__(self):
        self.prompts = []

    def generate(self, prompts, config=None):
        self.prompts += prompts
        return [REPLIES[p.split("Explanation to grade: ")[1].split(" says")[0]][0] for p in prompts]


def generate_run(tmp_path):
    data = tmp_path / "qs.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    run = Run.open(tmp_path / "run", EvalConfig(model="m", data=str(data), method="generate"))
    samples = [
        Sample(
            question_id=f"q{i}",
            permutation=[0, 1],
            options={"A": "yes", "B": "no"},
            gold="A",
            pred="A" if i != 1 else "B",
            correct=i != 1,
            method="generate",
            extras={"generated": f"q{i} says A because ..."},
        )
        for i in range(6)
    ]
    run.append(samples)
    return run


def test_report_with_judge_grades_counts_unparseable_and_summarises_by_hand(tmp_path):
    generate_run(tmp_path)
    judge = FakeJudge()
    res = write_report([tmp_path / "run"], judge="fake", load_judge=lambda spec: judge)
    assert len(judge.prompts) == 5  # q5 has no rationale: not graded
    assert "Reference rationale: Because of reason 2." in judge.prompts[2]
    c = res["summary"]["consistency"]
    # grades 2, 2, 0, unparseable, 1 -> 4 parseable: consistent 2/4, contradicts 1/4, mean 5/4
    assert (c["n_graded"], c["n_unparseable"]) == (5, 1)
    assert (c["consistent"]["events"], c["consistent"]["n"]) == (2, 4)
    assert (c["contradicts"]["events"], c["contradicts"]["n"]) == (1, 4)
    assert c["mean_grade"] == pytest.approx(1.25)
    # among correct answers (q1 was wrong): q0 (2), q2 (0), q4 (1) -> 1 of 3 consistent
    assert (c["consistent_when_correct"]["events"], c["consistent_when_correct"]["n"]) == (1, 3)
    z = 1.959963984540054
    p, n = 0.5, 4
    lo = ((p + z * z / (2 * n)) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    assert c["consistent"]["ci_low"] == pytest.approx(lo)
    text = (tmp_path / "run" / "report.md").read_text()
    assert "unparseable 1" in text and "Consistent (grade 2): 50.0% (2/4" in text
    assert [g.grade for g in load_grades(tmp_path / "run")] == [2, 2, 0, None, 1]

    # resumes: nothing left to grade, and the report keeps the section without a judge
    again = write_report([tmp_path / "run"], judge="fake", load_judge=lambda spec: judge)
    assert len(judge.prompts) == 5 and again["summary"]["consistency"] == c
    assert write_report([tmp_path / "run"])["summary"]["consistency"] == c
    with pytest.raises(ClinqaError, match="holds grades by fake"):
        write_report([tmp_path / "run"], judge="other", load_judge=lambda spec: judge)


def test_summary_of_no_grades_is_nan_not_an_error():
    c = summarize_consistency([])
    assert c["n_graded"] == 0 and math.isnan(c["mean_grade"]) and c["consistent"]["n"] == 0


def test_a_non_generate_run_is_refused(tmp_path):
    run = Run.open(tmp_path / "r", EvalConfig(model="m", data=str(tmp_path / "qs.jsonl"), method="letter"))
    run.append(
        [
            Sample(
                question_id="q0",
                permutation=[0, 1],
                options={"A": "a", "B": "b"},
                gold="A",
                pred="A",
                correct=True,
                method="letter",
            )
        ]
    )
    (tmp_path / "qs.jsonl").write_text(json.dumps(QUESTIONS[0]) + "\n")
    with pytest.raises(ClinqaError, match="--method generate"):
        write_report([tmp_path / "r"], judge="fake", load_judge=lambda spec: FakeJudge())


def test_prompt_holds_the_rubric_and_ends_at_the_grade():
    p = consistency_prompt("Q?", "R.", "E.")
    assert "Grade 0: inconsistent" in p and p.endswith("Grade:") and "Reference rationale: R." in p


@pytest.mark.embedded
def test_report_judge_option_on_the_embedded_model(tmp_path):
    from typer.testing import CliRunner

    from clinqa.cli import app

    runner = CliRunner()
    out = tmp_path / "gen"
    r = runner.invoke(
        app,
        [
            "eval",
            "default",
            "bundled",
            "--method",
            "generate",
            "--limit",
            "1",
            "--max-new-tokens",
            "8",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["report", str(out), "--judge", "default"])
    assert r.exit_code == 0, r.output
    grades = load_grades(out)
    assert len(grades) == 1 and {g.judge for g in grades} == {"default"}
    assert all(g.grade == parse_grade(g.raw) for g in grades)  # stored grade is what the raw reply says
    unparseable = sum(g.grade is None for g in grades)
    assert f"unparseable grades {unparseable}" in r.output
    assert f"unparseable {unparseable} (excluded from the rates" in (out / "report.md").read_text()
