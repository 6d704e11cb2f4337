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
