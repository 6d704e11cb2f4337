import json

import pytest

from clinqa.adapt import apply_modifier
from clinqa.data.schema import Question
from clinqa.experiments.compare import CompareConfig, compare
from clinqa.models.spec import parse_spec


def qs(n=8):
    return [Question(id=f"q{i}", question=f"Question number {i}?", options={"A": f"yes {i}", "B": f"no {i}", "C": "maybe"},
                     answer="ABC"[i % 3], specialties=["cardiology" if i % 2 else "neurology"]) for i in range(n)]


def test_compare_runs_every_method_on_the_same_questions(tiny_predictor, tmp_path):
    def load(spec):
        ms = parse_spec(spec)
        p = tiny_predictor
        for m in ms.modifiers:
            p = apply_modifier(p, m)
        return p

    cfg = CompareConfig(model="tiny", data="test", methods=("base", "prompt:expert"), shuffles=2)
    summary = compare(cfg, qs(), tmp_path / "exp", load=load)
    assert set(summary["methods"]) == {"base", "prompt:expert"}
    vs = summary["methods"]["prompt:expert"]["vs_base"]
    assert vs["n"] == 16
    md = (tmp_path / "exp" / "summary.md").read_text()
    assert "| prompt:expert |" in md and "| cardiology |" in md
    assert (tmp_path / "exp" / "compare.png").exists()
    # resumable: a second call recomputes nothing and gives the same table
    again = compare(cfg, qs(), tmp_path / "exp", load=load)
    assert json.dumps(again["methods"]["base"]["summary"], default=str) == json.dumps(summary["methods"]["base"]["summary"], default=str)


def test_question_part_is_a_disjoint_stratified_split():
    from clinqa.errors import ClinqaError
    from clinqa.experiments.compare import question_part

    questions = qs(9)  # neurology q0,q2,q4,q6,q8; cardiology q1,q3,q5,q7
    a, b = question_part(questions, "0/2"), question_part(questions, "1/2")
    assert [q.id for q in a] == ["q0", "q1", "q4", "q5", "q8"] and [q.id for q in b] == ["q2", "q3", "q6", "q7"]
    assert question_part(questions, None) == questions
    thirds = [question_part(questions, f"{k}/3") for k in range(3)]
    assert sorted(q.id for t in thirds for q in t) == sorted(q.id for q in questions)
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(ClinqaError, match="K/N"):
            question_part(questions, bad)


def test_compare_on_a_part_records_it(tiny_predictor, tmp_path):
    cfg = CompareConfig(model="tiny", data="test", methods=("base",), part="1/2")
    summary = compare(cfg, qs(), tmp_path / "exp", load=lambda spec: tiny_predictor)
    assert summary["methods"]["base"]["summary"]["n_questions"] == 4
    run = json.loads((tmp_path / "exp" / "base" / "run.json").read_text())
    assert run["config"]["extra"] == {"part": "1/2"}


@pytest.mark.embedded
def test_compare_command_part(tmp_path):
    from typer.testing import CliRunner

    from clinqa.cli import app

    r = CliRunner().invoke(app, ["compare", "default", "bundled", "--methods", "base", "--limit", "8", "--part", "1/2",
                                 "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "c" / "base" / "run.json").read_text())
    assert run["counts"]["questions"] == 4 and run["config"]["extra"] == {"part": "1/2"}
