import json

from clinqa.data.schema import Question
from clinqa.experiments.cross_specialty import CrossSpecialtyConfig, cross_specialty, split_by_specialty


def qs():
    out = []
    for spec, word in (("cardiology", "heart"), ("neurology", "brain")):
        for i in range(8):
            out.append(Question(id=f"{spec}-{i}", question=f"A {word} question number {i} about {word} disease?",
                                options={"A": f"{word} answer {i}", "B": "wrong thing", "C": "other thing"},
                                answer="A", specialties=[spec]))
    return out


CONTROL = [Question(id=f"c{i}", question=f"Which city is number {i}?", options={"A": "Paris", "B": "Rome"}, answer="A") for i in range(6)]


def test_split_is_seeded_disjoint_and_per_specialty():
    train, test = split_by_specialty(qs(), ["cardiology", "neurology"], 0.25, seed=1)
    assert {len(v) for v in test.values()} == {2} and {len(v) for v in train.values()} == {6}
    assert not {q.id for q in train["cardiology"]} & {q.id for q in test["cardiology"]}
    assert split_by_specialty(qs(), ["cardiology", "neurology"], 0.25, seed=1)[1] == test


def test_matrix_heatmap_and_resume(tiny_predictor, tmp_path):
    cfg = CrossSpecialtyConfig(model="tiny", data="test", specialties=("cardiology", "neurology"), test_fraction=0.25,
                               lora={"epochs": 1, "rank": 4, "alpha": 8, "batch_size": 4, "val_fraction": 0.0})
    s = cross_specialty(cfg, qs(), tmp_path / "xs", base=tiny_predictor, control_questions=CONTROL)
    assert s["models"] == ["base", "cardiology", "neurology", "control"]
    assert set(s["cells"]["cardiology"]) == {"cardiology", "neurology"}
    assert "vs_diagonal" in s["cells"]["cardiology"]["neurology"]
    assert s["cells"]["base"]["cardiology"]["delta_vs_base"] == 0
    assert 0 <= s["term_overlap"]["cardiology"]["neurology"] < s["term_overlap"]["cardiology"]["cardiology"] <= 1
    assert (tmp_path / "xs" / "matrix.png").stat().st_size > 1000
    assert "| control |" in (tmp_path / "xs" / "summary.md").read_text()
    runs = sorted(p.name for p in (tmp_path / "xs" / "runs").iterdir())
    assert len(runs) == 8
    before = {p: (p / "samples.jsonl").read_text() for p in (tmp_path / "xs" / "runs").iterdir()}
    again = cross_specialty(cfg, qs(), tmp_path / "xs", base=tiny_predictor, control_questions=CONTROL)
    assert json.dumps(again["cells"]) == json.dumps(s["cells"])
    assert all((p / "samples.jsonl").read_text() == t for p, t in before.items())
