import json

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
