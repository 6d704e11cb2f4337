"""Split-conformal prediction sets: coverage on synthetic data with known probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clinqa.errors import ClinqaError
from clinqa.specialties.conformal import (
    ConformalCalibration,
    calibrate,
    conformal_scores,
    evaluate_sets,
    min_calibration_size,
    prediction_sets,
    sets_to_labels,
    split,
)

K = 15
N = 4000


def _synthetic(seed: int = 0, n: int = N, k: int = K, max_labels: int = 1):
    """Items with known class probabilities (Dirichlet) and labels drawn from them."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(k, 0.3), size=n)
    gold = []
    for row in probs:
        m = int(rng.integers(1, max_labels + 1))
        gold.append({int(j) for j in rng.choice(k, size=m, replace=False, p=row)})
    return probs, gold


def test_coverage_close_to_target_on_held_out():
    probs, gold = _synthetic()
    cal, test = split(len(probs), 0.5, seed=1)
    assert len(cal) == len(test) == N // 2 and not set(cal) & set(test)
    c = calibrate(probs[cal], [gold[i] for i in cal], alpha=0.1)
    assert isinstance(c, ConformalCalibration) and c.n == N // 2 and c.mode == "any"
    sets = prediction_sets(probs[test], c)
    m = evaluate_sets(sets, [gold[i] for i in test])
    assert abs(m.coverage_any - 0.9) <= 0.03
    assert all(sets) and all(len(s) == len(set(s)) for s in sets)


def test_smaller_alpha_gives_bigger_sets():
    probs, gold = _synthetic(seed=2)
    cal, test = split(len(probs), 0.5, seed=3)
    sizes, covs = [], []
    for alpha in (0.3, 0.1, 0.02):
        c = calibrate(probs[cal], [gold[i] for i in cal], alpha=alpha)
        m = evaluate_sets(prediction_sets(probs[test], c), [gold[i] for i in test])
        sizes.append(m.mean_set_size)
        covs.append(m.coverage_any)
    assert sizes[0] < sizes[1] < sizes[2]
    assert covs[0] < covs[1] < covs[2]
    assert covs[2] >= 0.98 - 0.03


def test_qhat_is_the_kth_smallest_score():
    # 10 items, alpha 0.1 -> k = ceil(11 * 0.9) = 10 -> the largest score; alpha 0.2 -> k = 9.
    p_true = np.linspace(0.05, 0.95, 10)
    probs = np.stack([p_true, 1 - p_true], axis=1)
    gold = [{0}] * 10
    scores = np.sort(1 - p_true)
    assert calibrate(probs, gold, alpha=0.1).qhat == pytest.approx(scores[9])
    assert calibrate(probs, gold, alpha=0.2).qhat == pytest.approx(scores[8])


def test_too_small_calibration_set_is_a_clear_error():
    probs, gold = _synthetic(n=8)
    assert min_calibration_size(0.1) == 9
    assert min_calibration_size(0.05) == 19
    with pytest.raises(ClinqaError, match=r"8 calibration item\(s\) are too few for alpha=0\.1.*at least 9"):
        calibrate(probs, gold, alpha=0.1)
    calibrate(*_synthetic(n=9), alpha=0.1)  # exactly the minimum works
    with pytest.raises(ClinqaError, match="alpha"):
        calibrate(probs, gold, alpha=1.5)


def test_mode_all_covers_every_gold_label():
    probs, gold = _synthetic(seed=4, max_labels=3)
    cal, test = split(len(probs), 0.5, seed=5)
    g_cal, g_test = [gold[i] for i in cal], [gold[i] for i in test]
    c_any = calibrate(probs[cal], g_cal, alpha=0.1, mode="any")
    c_all = calibrate(probs[cal], g_cal, alpha=0.1, mode="all")
    assert c_all.mode == "all" and c_all.qhat >= c_any.qhat
    m_any = evaluate_sets(prediction_sets(probs[test], c_any), g_test)
    m_all = evaluate_sets(prediction_sets(probs[test], c_all), g_test)
    assert abs(m_any.coverage_any - 0.9) <= 0.03
    assert abs(m_all.coverage_all - 0.9) <= 0.03
    assert m_any.coverage_all < 0.9 - 0.03  # "any" does not promise all gold labels
    assert m_all.mean_set_size > m_any.mean_set_size
    with pytest.raises(ClinqaError, match="mode"):
        calibrate(probs[cal], g_cal, alpha=0.1, mode="some")


def test_scores_take_best_or_worst_gold_label():
    probs = np.array([[0.7, 0.2, 0.1]])
    assert conformal_scores(probs, [{0, 2}], "any")[0] == pytest.approx(0.3)
    assert conformal_scores(probs, [{0, 2}], "all")[0] == pytest.approx(0.9)


def test_sets_are_never_empty_and_ordered_by_probability():
    probs = np.array([[0.2, 0.5, 0.3], [0.05, 0.1, 0.08], [0.9, 0.95, 0.1]])
    sets = prediction_sets(probs, ConformalCalibration(qhat=0.6, alpha=0.1, n=100))
    assert sets == [[1], [1], [1, 0]]  # row 2: nothing >= 0.4 -> argmax fallback
    assert prediction_sets(probs, 0.85) == [[1, 2, 0], [1], [1, 0]]


def test_specialty_names_as_gold_labels():
    probs = np.full((12, K), 0.01)
    probs[:, 0] = 0.9  # cardiology is the first taxonomy column
    gold = [["cardio"]] * 12
    c = calibrate(probs, gold, alpha=0.1)
    assert sets_to_labels(prediction_sets(probs[:1], c)) == [["cardiology"]]
    with pytest.raises(ClinqaError, match="unknown specialty"):
        calibrate(probs, [["not a specialty"]] * 12, alpha=0.1)
    with pytest.raises(ClinqaError, match=r"gold\[0\] has no labels"):
        calibrate(probs, [[]] + [["cardio"]] * 11, alpha=0.1)
    with pytest.raises(ClinqaError, match="taxonomy"):
        calibrate(probs[:, :3], gold, alpha=0.1)


def test_evaluate_sets_by_hand():
    sets = [[0, 1], [2], [0, 3, 4], [1]]
    gold = [{0}, {1}, {0, 4}, {1, 2}]
    m = evaluate_sets(sets, gold)
    assert m.n == 4
    assert m.coverage_any == pytest.approx(3 / 4)  # item 1 misses
    assert m.coverage_all == pytest.approx(2 / 4)  # items 0 and 2
    assert m.mean_set_size == pytest.approx(7 / 4)
    assert m.precision == pytest.approx(4 / 7)  # hits: 1 + 0 + 2 + 1
    assert m.recall == pytest.approx(4 / 6)
    named = evaluate_sets([["cardiology", "neuro"]], [["neurology"]])
    assert (named.coverage_any, named.precision, named.recall) == (1.0, 0.5, 1.0)
    with pytest.raises(ClinqaError, match="2 prediction sets but 1"):
        evaluate_sets([[0], [1]], [{0}])


def test_split_is_reproducible_and_validated():
    a = split(101, 0.3, seed=7)
    b = split(101, 0.3, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(a[0]) == 30 and len(a[1]) == 71
    assert sorted(np.concatenate(a).tolist()) == list(range(101))
    assert not np.array_equal(a[0], split(101, 0.3, seed=8)[0])
    with pytest.raises(ClinqaError):
        split(10, 1.0)
    with pytest.raises(ClinqaError):
        split(1, 0.5)


def test_agrees_with_numpy_inverted_cdf_quantile():
    probs, gold = _synthetic(seed=9, n=500)
    for alpha in (0.05, 0.1, 0.2):
        scores = conformal_scores(probs, gold)
        level = math.ceil((len(scores) + 1) * (1 - alpha)) / len(scores)
        expected = np.quantile(scores, level, method="inverted_cdf")
        assert calibrate(probs, gold, alpha).qhat == pytest.approx(expected)
