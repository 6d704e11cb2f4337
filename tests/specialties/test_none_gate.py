import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from clinqa.errors import ClinqaError
from clinqa.specialties.none_gate import NoneGate, cross_fitted_p_none, fit_none_gate


def _clusters(n_in=40, n_out=30, dim=8, gap=2.0, seed=0):
    rng = np.random.default_rng(seed)
    centre = np.zeros(dim)
    centre[0] = gap
    return rng.normal(size=(n_in, dim)) + centre, rng.normal(size=(n_out, dim)) - centre


def test_gate_matches_a_direct_logistic_regression_and_separates_the_groups():
    pos, neg = _clusters()
    gate = fit_none_gate(pos, neg)
    X = np.vstack([pos, neg])
    y = np.r_[np.zeros(len(pos)), np.ones(len(neg))]
    ref = LogisticRegression(class_weight="balanced", random_state=0, max_iter=2000).fit(X, y)
    np.testing.assert_allclose(gate.p_none(X), ref.predict_proba(X)[:, 1], rtol=1e-9, atol=1e-12)
    # by hand: the sigmoid of the linear score
    x = X[3]
    assert gate.p_none(X[3:4])[0] == pytest.approx(1 / (1 + np.exp(-(x @ gate.coef + gate.intercept))))
    assert (gate.n_specialty, gate.n_none) == (40, 30)
    assert gate.is_none(neg).mean() > 0.9 and gate.is_none(pos).mean() < 0.1


def test_threshold_decides_is_none():
    pos, neg = _clusters()
    gate = fit_none_gate(pos, neg, threshold=0.9)
    p = gate.p_none(np.vstack([pos, neg]))
    np.testing.assert_array_equal(gate.is_none(np.vstack([pos, neg])), p >= 0.9)
    assert set(gate.to_dict()) == {"coef", "intercept", "threshold", "n_specialty", "n_none"}


def test_cross_fitted_scores_come_from_gates_that_never_saw_the_question():
    pos, neg = _clusters(seed=1)
    extra, _ = _clusters(n_in=10, n_out=1, seed=2)
    X = np.vstack([pos, neg])
    y = np.r_[np.zeros(len(pos), bool), np.ones(len(neg), bool)]
    got = cross_fitted_p_none(X, y, extra_specialty_embeddings=extra, folds=5, seed=3)
    assert not np.isnan(got).any()
    # recompute one fold independently
    train, test = next(StratifiedKFold(n_splits=5, shuffle=True, random_state=3).split(X, y))
    Xt = np.vstack([extra, X[train][~y[train]], X[train][y[train]]])
    yt = np.r_[np.zeros(len(extra) + int((~y[train]).sum())), np.ones(int(y[train].sum()))]
    ref = LogisticRegression(class_weight="balanced", random_state=0, max_iter=2000).fit(Xt, yt)
    np.testing.assert_allclose(got[test], ref.predict_proba(X[test])[:, 1], rtol=1e-9, atol=1e-12)
    # a gate fitted on everything scores differently from the held-out scores (they are not in-sample)
    full = fit_none_gate(np.vstack([extra, pos]), neg)
    assert not np.allclose(full.p_none(X), got)


def test_bad_input_is_refused_in_one_line():
    pos, neg = _clusters()
    with pytest.raises(ClinqaError, match="questions labelled none"):
        fit_none_gate(pos, neg[:0])
    with pytest.raises(ClinqaError, match="threshold"):
        fit_none_gate(pos, neg, threshold=1.0)
    with pytest.raises(ClinqaError, match="one dim"):
        fit_none_gate(pos, neg[:, :3])
    with pytest.raises(ClinqaError, match="5 folds need"):
        cross_fitted_p_none(np.vstack([pos, neg[:3]]), [False] * 40 + [True] * 3, folds=5)
    gate = NoneGate(coef=np.zeros(4), intercept=0.0)
    with pytest.raises(ClinqaError, match=r"shape \(n, 4\)"):
        gate.p_none(np.zeros((2, 5)))
    assert gate.p_none(np.zeros((2, 4))).tolist() == [0.5, 0.5]


# -- the gate in the MiniLM annotator and `clinqa annotate --none-from` (real MiniLM, offline) --------

NONE_TEXTS = [
    "Which tooth erupts first in the permanent dentition?",
    "The enamel of a molar is formed by which cells?",
    "Which dental cement is used for a temporary restoration?",
    "The median of the numbers 3, 7, 9, 12 and 15 is:",
    "A measure of dispersion that is not affected by extreme values is:",
    "Standard deviation of a normal distribution measures:",
    "Which amino acid has a sulphur-containing side chain?",
    "The enzyme that unwinds DNA during replication is:",
]
SPEC_TEXTS = {
    "cardiology": [
        "A 60-year-old man has crushing chest pain and ST elevation in leads II, III and aVF.",
        "An irregularly irregular pulse with no P waves on the ECG; what is the rhythm?",
        "Pericarditis with pleuritic chest pain relieved by sitting forward.",
    ],
    "neurology": [
        "Sudden right arm weakness and slurred speech starting 40 minutes ago.",
        "Resting tremor, rigidity and bradykinesia in a 70-year-old.",
        "Fatigable ptosis and diplopia that worsen at the end of the day.",
    ],
}


def _q(qid, text, specialties=()):
    from clinqa.data.schema import Question

    return Question(id=qid, question=text, options={"A": "one", "B": "two"}, answer="A", specialties=list(specialties))


def _labelled():
    qs = [_q(f"none{i}", t) for i, t in enumerate(NONE_TEXTS)]
    qs += [_q(f"{s}{i}", t, [s]) for s, ts in SPEC_TEXTS.items() for i, t in enumerate(ts)]
    return qs


def test_the_gate_leaves_out_questions_like_the_none_examples(tmp_path):
    from clinqa.specialties.annotate import read_annotations
    from clinqa.specialties.embed import EmbeddingAnnotator, embed_texts, question_text
    from clinqa.specialties.label import labelled_questions, minilm_to_run
    from clinqa.specialties.none_gate import fit_none_gate_on

    train = [_q(f"t-{s}{i}", t, [s]) for s, ts in SPEC_TEXTS.items() for i, t in enumerate(ts)]
    data = [
        _q("d-dental", "Which cells form the enamel of a permanent incisor?"),
        _q("d-heart", "Crushing chest pain radiating to the left arm with ST elevation in V1-V4."),
    ]
    labelled = _labelled()
    out = tmp_path / "ann"
    anns = minilm_to_run(out, data, train, "train", none_from=("val.jsonl", labelled), annotator=EmbeddingAnnotator())
    # independently: the same gate fitted directly, on the same embeddings
    gate = fit_none_gate_on(labelled, train)
    p = gate.p_none(embed_texts([question_text(x) for x in data]))
    assert [a.p_none for a in anns] == pytest.approx(list(p), abs=1e-6)
    assert p[0] >= 0.5 > p[1]
    assert [a.label for a in anns] == [None, "cardiology"]
    assert anns[0].votes and anns[0].probs  # the classifier's view is kept
    assert [a.label for a in read_annotations(out)] == [None, "cardiology"]
    qs = labelled_questions(data, anns, sets=[["neurology"], ["cardiology", "neurology"]])
    assert [x.specialties for x in qs] == [[], ["cardiology", "neurology"]]  # the gate wins over the set
    assert qs[0].meta["specialty_annotation"]["labels_from"] == "none gate"
    cfg = json.loads((out / "run.json").read_text())["config"]["none_gate"]
    assert cfg["from"] == "val.jsonl" and cfg["threshold"] == 0.5 and cfg["n"] == len(labelled)
    with pytest.raises(ClinqaError, match="threshold: 0.5 -> 0.9"):
        minilm_to_run(out, data, train, "train", none_from=("val.jsonl", labelled), none_threshold=0.9)
    with pytest.raises(ClinqaError, match="none_gate"):  # a gate-less annotation is another run
        minilm_to_run(out, data, train, "train")


def test_an_unlabelled_none_file_is_refused(tmp_path):
    from clinqa.specialties.none_gate import fit_none_gate_on

    with pytest.raises(ClinqaError, match="raw.jsonl: no question has a specialty"):
        fit_none_gate_on([_q("a", "x"), _q("b", "y")], where="raw.jsonl")
    with pytest.raises(ClinqaError, match="no question is labelled none"):
        fit_none_gate_on([_q("a", "x", ["cardiology"])])


def test_cli_none_from_writes_unlabelled_questions_and_refuses_without_train(tmp_path):
    from typer.testing import CliRunner

    from clinqa.cli import app
    from clinqa.data.loaders import load_questions, write_questions

    val, data = tmp_path / "val.jsonl", tmp_path / "data.jsonl"
    write_questions(val, _labelled())
    write_questions(
        data,
        [
            _q("d-stats", "The mode of the numbers 2, 2, 3, 5 and 9 is:"),
            _q("d-neuro", "A man has a sudden facial droop and weakness of the left arm and leg."),
        ],
    )
    r = CliRunner().invoke(app, ["annotate", str(data), "--out", str(tmp_path / "x"), "--none-from", str(val)])
    assert isinstance(r.exception, ClinqaError) and "give --train too" in str(r.exception)  # exit 2: test_cli
    lab = tmp_path / "lab.jsonl"
    r = CliRunner().invoke(
        app,
        ["annotate", str(data), "--train", "bundled:all", "--none-from", str(val), "--out", str(tmp_path / "ann"),
         "--labelled", str(lab)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "1 of 2 questions left without a specialty" in " ".join(r.output.split())
    got = {x.id: x.specialties for x in load_questions(str(lab)).questions}
    assert got["d-stats"] == [] and got["d-neuro"] == ["neurology"]
