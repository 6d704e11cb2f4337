import json

import pytest

from clinqa.data.schema import Question
from clinqa.evaluate.sample import Sample
from clinqa.experiments.cross_specialty import CrossSpecialtyConfig, cross_specialty, pooled_effects, split_by_specialty


def qs():
    out = []
    for spec, word in (("cardiology", "heart"), ("neurology", "brain")):
        for i in range(8):
            out.append(
                Question(
                    id=f"{spec}-{i}",
                    question=f"A {word} question number {i} about {word} disease?",
                    options={"A": f"{word} answer {i}", "B": "wrong thing", "C": "other thing"},
                    answer="A",
                    specialties=[spec],
                )
            )
    return out


CONTROL = [
    Question(id=f"c{i}", question=f"Which city is number {i}?", options={"A": "Paris", "B": "Rome"}, answer="A")
    for i in range(10)
]


def test_split_is_seeded_disjoint_and_per_specialty():
    train, test = split_by_specialty(qs(), ["cardiology", "neurology"], 0.25, seed=1)
    assert {len(v) for v in test.values()} == {2} and {len(v) for v in train.values()} == {6}
    assert not {q.id for q in train["cardiology"]} & {q.id for q in test["cardiology"]}
    assert split_by_specialty(qs(), ["cardiology", "neurology"], 0.25, seed=1)[1] == test


def test_matrix_heatmap_and_resume(tiny_predictor, tmp_path):
    cfg = CrossSpecialtyConfig(
        model="tiny",
        data="test",
        specialties=("cardiology", "neurology"),
        test_fraction=0.25,
        lora={"epochs": 1, "rank": 4, "alpha": 8, "batch_size": 4, "val_fraction": 0.0},
    )
    s = cross_specialty(
        cfg, qs(), tmp_path / "xs", base=tiny_predictor, control_questions=CONTROL, control_eval_questions=CONTROL
    )
    assert s["models"] == ["base", "cardiology", "neurology", "control"]
    # general ability: the control adapter trained on 6 of the 10 control questions (the specialties'
    # train size); every model is tested on the other 4, each adapter paired against base
    import random

    trained = {q.id for q in random.Random("0|control").sample(CONTROL, 6)}  # the control adapter's seeded draw
    g = s["control_set"]
    assert g["n_questions"] == 4 and set(g["models"]) == {"base", "cardiology", "neurology", "control"}
    from clinqa.evaluate.runs import Run

    ctrl_runs = {m: Run.load(tmp_path / "xs/runs" / f"{m}__control-set").samples() for m in g["models"]}
    tested = {x.question_id for x in ctrl_runs["base"]}
    assert tested == {q.id for q in CONTROL} - trained
    for m in ("cardiology", "neurology", "control"):
        base_hit = {x.question_id: x.correct for x in ctrl_runs["base"]}
        hit = {x.question_id: x.correct for x in ctrl_runs[m]}
        assert g["models"][m]["acc"] == pytest.approx(sum(hit.values()) / 4)
        assert g["models"][m]["vs_base"]["diff"] == pytest.approx((sum(hit.values()) - sum(base_hit.values())) / 4)
        b = sum(base_hit[q] and not hit[q] for q in tested)
        c = sum(hit[q] and not base_hit[q] for q in tested)
        from scipy.stats import binomtest

        assert g["models"][m]["vs_base"]["p_mcnemar"] == pytest.approx(binomtest(b, b + c).pvalue if b + c else 1.0)
    assert "tested on | cardiology | neurology | control set |" in (tmp_path / "xs" / "summary.md").read_text()
    # a cell against the diagonal: the cardiology adapter on neurology minus the neurology adapter there,
    # from the runs' samples
    neur = {m: {x.question_id: x.correct for x in Run.load(tmp_path / "xs/runs" / f"{m}__neurology").samples()}
            for m in ("cardiology", "neurology")}  # fmt: skip
    assert s["cells"]["cardiology"]["neurology"]["vs_diagonal"]["diff"] == pytest.approx(
        (sum(neur["cardiology"].values()) - sum(neur["neurology"].values())) / len(neur["neurology"])
    )
    assert s["cells"]["cardiology"]["neurology"]["acc"] == pytest.approx(sum(neur["cardiology"].values()) / 2)
    assert set(s["cells"]["cardiology"]) == {"cardiology", "neurology"}
    assert "vs_diagonal" in s["cells"]["cardiology"]["neurology"]
    assert s["cells"]["base"]["cardiology"]["delta_vs_base"] == 0
    assert 0 <= s["term_overlap"]["cardiology"]["neurology"] < s["term_overlap"]["cardiology"]["cardiology"] <= 1
    assert (tmp_path / "xs" / "matrix.png").stat().st_size > 1000
    assert "| control |" in (tmp_path / "xs" / "summary.md").read_text()
    assert set(s["pooled"]) == {"own_vs_other", "medical_vs_base", "control_vs_base", "medical_vs_control"}
    assert s["pooled"]["own_vs_other"]["n"] == 4  # two test questions in each of two specialties
    from clinqa.data.loaders import load_questions

    held_out = load_questions(str(tmp_path / "xs" / "test_questions.jsonl")).questions
    assert len(held_out) == 4 and all(q.specialties for q in held_out)
    assert "own-specialty adapter − other" in (tmp_path / "xs" / "summary.md").read_text()
    runs = sorted(p.name for p in (tmp_path / "xs" / "runs").iterdir())
    assert len(runs) == 12  # 4 models x (2 specialties + the control set)
    before = {p: (p / "samples.jsonl").read_text() for p in (tmp_path / "xs" / "runs").iterdir()}
    # a folder made before the matcher, preset and control-set fields existed resumes: nothing is redone
    exp = json.loads((tmp_path / "xs/experiment.json").read_text())
    for k in ("matcher", "preset", "control_eval"):
        exp.pop(k)
    (tmp_path / "xs/experiment.json").write_text(json.dumps(exp))
    again = cross_specialty(
        cfg, qs(), tmp_path / "xs", base=tiny_predictor, control_questions=CONTROL, control_eval_questions=CONTROL
    )
    assert json.dumps(again["cells"]) == json.dumps(s["cells"])
    assert json.dumps(again["control_set"]) == json.dumps(s["control_set"])
    assert all((p / "samples.jsonl").read_text() == t for p, t in before.items())
    cfg.matcher, cfg.method = "minilm", "generate"
    with pytest.raises(Exception, match="different config .*matcher: 'regex' -> 'minilm'"):
        cross_specialty(cfg, qs(), tmp_path / "xs", base=tiny_predictor, control_questions=CONTROL)
    cfg.matcher, cfg.method = "regex", "option"
    # gradient checkpointing is a memory knob: switching it on resumes the same experiment, nothing retrained
    cfg.lora["gradient_checkpointing"] = True
    third = cross_specialty(cfg, qs(), tmp_path / "xs", base=tiny_predictor, control_questions=CONTROL)
    assert json.dumps(third["cells"]) == json.dumps(s["cells"])
    cfg.lora["rank"] = 2
    with pytest.raises(Exception, match="different config"):
        cross_specialty(cfg, qs(), tmp_path / "xs", base=tiny_predictor, control_questions=CONTROL)


def _samples(correct_by_qid):
    return [
        Sample(
            question_id=q,
            permutation=[0, 1],
            options={"A": "x", "B": "y"},
            gold="A",
            pred="A" if c else "B",
            correct=c,
            method="option",
        )
        for q, c in correct_by_qid.items()
    ]


def test_pooled_effects_pairs_each_question_with_its_own_and_other_adapters():
    specs = ["cardiology", "neurology"]
    card = {f"c{i}": i < 2 for i in range(4)}  # base: 2 of 4 right on each test split
    neur = {f"n{i}": i < 2 for i in range(4)}
    samples = {
        ("base", "cardiology"): _samples(card),
        ("base", "neurology"): _samples(neur),
        # each specialty adapter gets every question of its own specialty right, the other's as base
        ("cardiology", "cardiology"): _samples({q: True for q in card}),
        ("cardiology", "neurology"): _samples(neur),
        ("neurology", "neurology"): _samples({q: True for q in neur}),
        ("neurology", "cardiology"): _samples(card),
        # the control adapter loses one question on each split
        ("control", "cardiology"): _samples({**card, "c0": False}),
        ("control", "neurology"): _samples({**neur, "n0": False}),
    }
    out = pooled_effects(samples, specs, control=True)
    assert out["own_vs_other"]["diff"] == pytest.approx(0.5)  # own right on all 8, other on 4 of 8
    assert out["medical_vs_base"]["diff"] == pytest.approx(0.25)
    assert out["control_vs_base"]["diff"] == pytest.approx(-0.25)
    assert out["medical_vs_control"]["diff"] == pytest.approx(0.5)
    assert all(e["n"] == 8 for e in out.values())
    assert out["own_vs_other"]["ci_low"] > 0 and out["own_vs_other"]["p"] < 0.05
    assert "control_vs_base" not in pooled_effects(samples, specs, control=False)
