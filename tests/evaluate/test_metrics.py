"""Metrics on hand-sized examples whose values are worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clinqa.errors import ClinqaError
from clinqa.evaluate.metrics import (
    NONE_GROUP,
    PairingError,
    accuracy,
    bootstrap_ci,
    brier,
    calibration,
    cluster_bootstrap_ci,
    ece,
    grouped_accuracy,
    grouped_bootstrap_ci,
    harmful_choice_rate,
    macro_micro,
    paired_comparison,
    per_question,
    reliability_bins,
    shuffle_summary,
    unparseable_count,
)
from clinqa.evaluate.sample import Sample

ABC = {"A": "alpha", "B": "beta", "C": "gamma"}


def make(
    qid: str,
    pred: str | None = "A",
    gold: str = "A",
    *,
    correct: bool | None = None,
    shuffle: int = 0,
    permutation: list[int] | None = None,
    probs: dict[str, float] | None = None,
    specialties: list[str] | None = None,
    source: str = "",
    extras: dict | None = None,
) -> Sample:
    return Sample(
        question_id=qid,
        shuffle=shuffle,
        permutation=permutation if permutation is not None else [0, 1, 2],
        options=dict(ABC),
        gold=gold,
        pred=pred,
        correct=(pred == gold) if correct is None else correct,
        method="logprob",
        probs=probs or {},
        specialties=specialties or [],
        source=source,
        extras=extras or {},
    )


def flagged(qid: str, correct: bool, **kw) -> Sample:
    return make(qid, "A" if correct else "B", "A", **kw)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_all_correct_is_degenerate():
    assert bootstrap_ci([1.0] * 25) == (1.0, 1.0)
    assert bootstrap_ci([0, 0, 0]) == (0.0, 0.0)


def test_bootstrap_empty_is_nan():
    lo, hi = bootstrap_ci([])
    assert math.isnan(lo) and math.isnan(hi)


def test_bootstrap_is_deterministic_by_seed():
    values = np.random.default_rng(1).integers(0, 2, 40)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_bootstrap_two_values_known_distribution():
    # Resample means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4.
    # 95%: the 2.5th and 97.5th percentiles fall in the 0 and 1 masses.
    assert bootstrap_ci([0, 1], n_boot=4000) == (0.0, 1.0)
    # 40%: the 30th and 70th percentiles both fall in the 0.5 mass (which spans 25%..75%).
    assert bootstrap_ci([0, 1], n_boot=4000, confidence=0.4) == (0.5, 0.5)


def test_bootstrap_matches_normal_approximation():
    # 100 coin flips, 50 heads: the 95% interval is about 0.5 +- 1.96 * 0.05.
    lo, hi = bootstrap_ci([1] * 50 + [0] * 50)
    assert lo == pytest.approx(0.402, abs=0.03)
    assert hi == pytest.approx(0.598, abs=0.03)


def test_bootstrap_custom_stat():
    assert bootstrap_ci([3.0, 3.0, 3.0], stat=np.median) == (3.0, 3.0)


def test_bootstrap_rejects_bad_confidence():
    with pytest.raises(ValueError):
        bootstrap_ci([1, 0], confidence=1.5)


# --------------------------------------------------------------------------- accuracy


Z95 = 1.959963984540054  # the standard normal 97.5% quantile


def wilson_by_hand(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's closed form, written out independently of clinqa.evaluate.intervals."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def test_accuracy_from_flags():
    a = accuracy([True, True, False, True])
    assert (a.n, a.correct, a.acc, a.ci_method) == (4, 3, 0.75, "wilson")
    # 3/4: centre (0.75 + 0.4802) / 1.9604 = 0.6275, half 1.96 * sqrt(0.0469 + 0.0600) / 1.9604 = 0.3269
    assert (a.ci_low, a.ci_high) == pytest.approx((0.3006, 0.9544), abs=1e-4)
    assert (a.ci_low, a.ci_high) == pytest.approx(wilson_by_hand(3, 4))


def test_accuracy_empty():
    a = accuracy([])
    assert a.n == 0 and a.correct == 0 and math.isnan(a.acc) and math.isnan(a.ci_low)


def test_accuracy_of_samples_scored_once_is_wilson():
    from scipy.stats import binomtest

    samples = [flagged(f"q{i}", i % 2 == 0) for i in range(10)]
    a = accuracy(samples, seed=5)
    assert (a.n, a.correct, a.acc, a.n_questions, a.ci_method) == (10, 5, 0.5, 10, "wilson")
    # 5/10: centre 0.5, half 1.96 * sqrt(0.025 + 0.0096) / 1.3841 = 0.2634
    assert (a.ci_low, a.ci_high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    ref = binomtest(5, 10).proportion_ci(0.95, method="wilson")  # scipy's own implementation
    assert (a.ci_low, a.ci_high) == pytest.approx((ref.low, ref.high))


@pytest.mark.parametrize(
    "k,n,expected", [(0, 1, (0.0, 0.7935)), (1, 1, (0.2065, 1.0)), (0, 2, (0.0, 0.6576)), (1, 2, (0.0945, 0.9055))]
)
def test_small_groups_get_a_non_degenerate_interval(k, n, expected):
    # one question answered wrongly was "0.0-0.0" and two were "0.0-100.0" under the bootstrap
    samples = [flagged(f"q{i}", i < k) for i in range(n)]
    a = accuracy(samples)
    assert (a.ci_low, a.ci_high) == pytest.approx(expected, abs=1e-4)
    assert (a.ci_low, a.ci_high) == pytest.approx(wilson_by_hand(k, n))


def test_per_question_mean_across_shuffles():
    samples = [flagged("q1", True, shuffle=0), flagged("q1", False, shuffle=1), flagged("q2", True, shuffle=0)]
    assert per_question(samples) == {"q1": 0.5, "q2": 1.0}


def test_cluster_bootstrap_resamples_questions():
    # q1 right in all 3 shuffles, q2 wrong in all 3: the clusters are [1, 0] -> 95% CI (0, 1).
    samples = [flagged("q1", True, shuffle=k) for k in range(3)] + [flagged("q2", False, shuffle=k) for k in range(3)]
    assert cluster_bootstrap_ci(samples, n_boot=4000) == (0.0, 1.0)
    a = accuracy(samples, n_boot=4000)
    assert (a.n, a.correct, a.acc, a.n_questions) == (6, 3, 0.5, 2)
    # two questions are too few to bootstrap: Wilson over questions, 1 of 2 -> (0.0945, 0.9055)
    assert a.ci_method == "wilson-questions"
    assert (a.ci_low, a.ci_high) == pytest.approx(wilson_by_hand(1, 2))


def test_cluster_interval_is_wider_than_naive_when_shuffles_agree():
    # 20 questions answered identically under 5 shuffles: 100 samples but only 20 independent units.
    samples = [flagged(f"q{i}", i < 12, shuffle=k) for i in range(20) for k in range(5)]
    a = accuracy(samples)
    naive_lo, naive_hi = bootstrap_ci([s.correct for s in samples])
    assert a.acc == 0.6 and a.ci_method == "cluster-bootstrap"
    assert (a.ci_low, a.ci_high) == cluster_bootstrap_ci(samples)
    assert a.ci_high - a.ci_low > 1.8 * (naive_hi - naive_lo)  # ~ sqrt(5) wider
    # computed independently: 20 independent 0/1 questions, p = 0.6: normal approximation over questions
    # 0.6 +- 1.96 * sqrt(0.24 / 20) = (0.385, 0.815); over the 100 samples it would be 0.6 +- 0.096
    assert (a.ci_low, a.ci_high) == pytest.approx((0.385, 0.815), abs=0.05)


def test_cluster_bootstrap_matches_the_per_question_normal_approximation_when_shuffles_disagree():
    # 40 questions; each answered right in 3 of its 5 shuffles (q < 20) or 1 of 5 (q >= 20): per-question
    # means 0.6 and 0.2, overall 0.4. Between-question sd is 0.2, so the clustered 95% interval is
    # 0.4 +- 1.96 * 0.2 / sqrt(40) = (0.338, 0.462), whereas a bootstrap over the 200 samples would
    # give 0.4 +- 1.96 * sqrt(0.24 / 200) = (0.332, 0.468): clustering matters, and here narrows it.
    samples = [flagged(f"q{i}", k < (3 if i < 20 else 1), shuffle=k) for i in range(40) for k in range(5)]
    a = accuracy(samples, n_boot=4000)
    assert a.ci_method == "cluster-bootstrap" and a.acc == pytest.approx(0.4)
    assert (a.ci_low, a.ci_high) == pytest.approx((0.338, 0.462), abs=0.012)


def test_shuffled_questions_all_alike_fall_back_to_wilson_over_questions():
    # 12 questions right under every shuffle: a bootstrap collapses to 100-100; Wilson on 12 of 12 does not
    samples = [flagged(f"q{i}", True, shuffle=k) for i in range(12) for k in range(3)]
    a = accuracy(samples)
    assert a.ci_method == "wilson-questions"
    assert (a.ci_low, a.ci_high) == pytest.approx(wilson_by_hand(12, 12))
    assert a.ci_low == pytest.approx(0.7575, abs=1e-4)


# --------------------------------------------------------------------------- groups


def test_grouped_accuracy_counts_multi_specialty_sample_in_each_group():
    samples = [
        flagged("q1", True, specialties=["cardiology", "nephrology"], source="medqa"),
        flagged("q2", False, specialties=["cardiology"], source="medqa"),
        flagged("q3", True, specialties=[], source=""),
    ]
    g = grouped_accuracy(samples, "specialty")
    assert list(g) == [NONE_GROUP, "cardiology", "nephrology"]
    assert (g["cardiology"].n, g["cardiology"].correct, g["cardiology"].acc) == (2, 1, 0.5)
    assert (g["nephrology"].n, g["nephrology"].acc) == (1, 1.0)
    assert (g[NONE_GROUP].n, g[NONE_GROUP].acc) == (1, 1.0)

    s = grouped_accuracy(samples, "source")
    assert {k: (v.n, v.correct) for k, v in s.items()} == {NONE_GROUP: (1, 1), "medqa": (2, 1)}


def test_grouped_accuracy_rejects_unknown_key():
    with pytest.raises(ValueError, match="specialty"):
        grouped_accuracy([flagged("q1", True)], "topic")  # type: ignore[arg-type]


def test_grouped_accuracy_uses_cluster_bootstrap_with_shuffles():
    samples = [flagged("q1", True, shuffle=k, source="x") for k in range(3)]
    samples += [flagged("q2", False, shuffle=k, source="x") for k in range(3)]
    g = grouped_accuracy(samples, "source")
    assert (g["x"].ci_low, g["x"].ci_high) == pytest.approx(wilson_by_hand(1, 2))  # 2 questions: over questions
    many = [
        flagged(f"q{i}", (i + k) % 3 == 0 and i % 2 == 0, shuffle=k, source="y") for i in range(12) for k in range(3)
    ]
    g = grouped_accuracy(many, "source")
    assert g["y"].ci_method == "cluster-bootstrap"
    assert (g["y"].ci_low, g["y"].ci_high) == cluster_bootstrap_ci(many)


def test_macro_vs_micro_by_hand():
    # group a: 3/3 correct (1.0); group b: 0/1 (0.0) -> macro 0.5, micro 3/4.
    samples = [flagged(f"a{i}", True, source="a") for i in range(3)] + [flagged("b0", False, source="b")]
    assert macro_micro(samples, "source") == (0.5, 0.75)


def test_macro_micro_with_multi_specialty_counts_sample_once_in_micro():
    # q1 (a, b) right, q2 (a) wrong: a = 0.5, b = 1.0 -> macro 0.75; micro = 1/2.
    samples = [flagged("q1", True, specialties=["a", "b"]), flagged("q2", False, specialties=["a"])]
    assert macro_micro(samples, "specialty") == (0.75, 0.5)


def test_macro_micro_empty():
    assert all(math.isnan(x) for x in macro_micro([], "source"))


# --------------------------------------------------------------------------- shuffles


def test_shuffle_summary_consistency_follows_the_original_option():
    # Original options o0, o1, o2 with o0 the answer. Shuffle 1 shows [o2, o0, o1] as A, B, C.
    perm1 = [2, 0, 1]
    samples = [
        # q1 picks o1 both times: B under shuffle 0, C under shuffle 1 -> consistent (and wrong).
        make("q1", "B", "A", shuffle=0),
        make("q1", "C", "B", shuffle=1, permutation=perm1),
        # q2 picks letter A both times: o0 then o2 -> inconsistent despite the same letter.
        make("q2", "A", "A", shuffle=0),
        make("q2", "A", "B", shuffle=1, permutation=perm1),
    ]
    s = shuffle_summary(samples)
    # shuffle 0: q1 wrong, q2 right -> 0.5; shuffle 1: both wrong -> 0.0
    assert s.k == 2
    assert s.mean_acc == 0.25
    assert s.std_acc_across_shuffles == pytest.approx(math.sqrt(0.125))  # ddof=1 over [0.5, 0.0]
    assert (s.min_acc, s.max_acc) == (0.0, 0.5)
    assert s.consistency == 0.5


def test_shuffle_summary_unparseable_is_inconsistent():
    samples = [make("q1", "A", shuffle=0), make("q1", None, shuffle=1)]
    assert shuffle_summary(samples).consistency == 0.0


def test_shuffle_summary_single_shuffle():
    s = shuffle_summary([flagged("q1", True), flagged("q2", False)])
    assert (s.k, s.mean_acc, s.std_acc_across_shuffles) == (1, 0.5, 0.0)
    assert math.isnan(s.consistency)


# --------------------------------------------------------------------------- calibration


def test_ece_by_hand():
    # bin [0.9, 1): conf 0.95, acc 1/2 -> gap 0.45; bin [0.6, 0.7): conf 0.65, acc 1 -> gap 0.35.
    # Each bin holds half the samples: 0.5 * 0.45 + 0.5 * 0.35 = 0.4
    assert ece([0.95, 0.95, 0.65, 0.65], [1, 0, 1, 1]) == pytest.approx(0.4)


def test_ece_perfectly_calibrated_is_zero():
    assert ece([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)


def test_ece_empty_is_nan():
    assert math.isnan(ece([], []))


def test_reliability_bins():
    bins = reliability_bins([0.95, 0.95, 0.65, 0.65, 0.0, 1.0], [1, 0, 1, 1, 0, 1], n_bins=10)
    assert len(bins) == 10
    assert (bins[0].lo, bins[0].hi) == (0.0, 0.1)
    assert (bins[6].count, bins[6].mean_conf, bins[6].acc) == (2, pytest.approx(0.65), 1.0)
    assert bins[0].count == 1  # confidence 0 lands in the first bin
    assert bins[9].count == 3  # confidence 1 lands in the last bin
    assert bins[9].acc == pytest.approx(2 / 3)
    assert bins[3].count == 0 and math.isnan(bins[3].mean_conf) and math.isnan(bins[3].acc)
    assert sum(b.count for b in bins) == 6


def test_reliability_bins_shape_mismatch():
    with pytest.raises(ValueError):
        reliability_bins([0.5, 0.5], [1])


def _calibration_samples() -> list[Sample]:
    return [
        # gold A, p = (.7, .2, .1): (.3)^2 + .2^2 + .1^2 = 0.14; right with confidence 0.7
        make("q1", "A", "A", probs={"A": 0.7, "B": 0.2, "C": 0.1}),
        # gold B, p = (.5, .5, 0): .5^2 + .5^2 + 0 = 0.5; wrong with confidence 0.5
        make("q2", "A", "B", probs={"A": 0.5, "B": 0.5, "C": 0.0}),
        make("q3", None, "A", probs={"A": 0.4, "B": 0.3, "C": 0.3}),  # unparseable -> excluded
        make("q4", "A", "A"),  # no probs -> excluded
    ]


def test_brier_by_hand():
    assert brier(_calibration_samples()) == pytest.approx((0.14 + 0.5) / 2)


def test_brier_empty_is_nan():
    assert math.isnan(brier([make("q1", None)]))


def test_calibration_by_hand():
    c = calibration(_calibration_samples())
    assert (c.n, c.n_excluded) == (2, 2)
    assert c.brier == pytest.approx(0.32)
    assert c.mean_confidence == pytest.approx(0.6)
    assert c.accuracy == 0.5
    assert c.overconfidence == pytest.approx(0.1)
    # bins: 0.7 right -> |1 - .7| = .3, 0.5 wrong -> |0 - .5| = .5; each weight 1/2 -> 0.4
    assert c.ece == pytest.approx(0.4)


def test_calibration_with_nothing_usable():
    c = calibration([make("q1", None), make("q2", "A")])
    assert (c.n, c.n_excluded) == (0, 2)
    assert math.isnan(c.ece) and math.isnan(c.brier)


# --------------------------------------------------------------------------- paired comparison


def _runs_b1_c6() -> tuple[list[Sample], list[Sample]]:
    # 3 both right, 1 only A right (b), 6 only B right (c).
    pattern = [(True, True)] * 3 + [(True, False)] + [(False, True)] * 6
    a = [flagged(f"q{i}", ra) for i, (ra, _) in enumerate(pattern)]
    b = [flagged(f"q{i}", rb) for i, (_, rb) in enumerate(pattern)]
    return a, b


def test_mcnemar_exact_against_hand_binomial():
    a, b = _runs_b1_c6()
    p = paired_comparison(a, b)
    assert (p.n, p.mcnemar_b, p.mcnemar_c) == (10, 1, 6)
    # two-sided exact: 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * (1 + 7) / 128 = 0.125
    assert p.p_mcnemar == pytest.approx(0.125)
    assert (p.acc_a, p.acc_b) == (0.4, 0.9)
    assert p.diff == pytest.approx(0.5)
    # bootstrap p, computed independently: resample the 10 per-question differences (one -1, three 0,
    # six +1); the mean is <= 0 iff #(+1) <= #(-1). Exactly, by the multinomial(10; .1, .3, .6):
    from math import comb, factorial

    p_le0 = sum(
        factorial(10) // (factorial(m) * factorial(z) * factorial(10 - m - z)) * 0.1**m * 0.3**z * 0.6 ** (10 - m - z)
        for m in range(11)
        for z in range(11 - m)
        if 10 - m - z <= m
    )
    assert p_le0 == pytest.approx(0.02301, abs=1e-5)
    big = paired_comparison(a, b, n_boot=40000)
    assert big.p_bootstrap == pytest.approx(2 * p_le0, abs=0.003)  # two-sided; P(mean >= 0) is ~1
    # the interval of the mean difference: 0.5 +- 1.96 * sd / sqrt(10), sd = sqrt(0.65 - 0.25) = 0.632
    assert (big.ci_low, big.ci_high) == pytest.approx((0.5 - 0.392, 0.5 + 0.392), abs=0.1)
    assert comb(7, 1) == 7  # the McNemar tail above: (C(7,0) + C(7,1)) / 2^7


def test_paired_is_deterministic_and_symmetric():
    a, b = _runs_b1_c6()
    assert paired_comparison(a, b, seed=2) == paired_comparison(a, b, seed=2)
    ab, ba = paired_comparison(a, b), paired_comparison(b, a)
    assert (ba.mcnemar_b, ba.mcnemar_c) == (6, 1)
    assert ba.diff == pytest.approx(-ab.diff)
    assert ba.p_mcnemar == pytest.approx(ab.p_mcnemar)


def test_paired_identical_runs():
    a = [flagged(f"q{i}", i % 3 == 0) for i in range(9)]
    p = paired_comparison(a, a)
    assert (p.diff, p.ci_low, p.ci_high) == (0.0, 0.0, 0.0)
    assert p.p_mcnemar == 1.0 and p.p_bootstrap == 1.0


def test_paired_uses_only_shared_keys_and_bootstraps_questions():
    a = [flagged("q1", True, shuffle=k) for k in range(2)] + [flagged("q2", False, shuffle=k) for k in range(2)]
    b = [flagged("q1", True, shuffle=0), flagged("q2", True, shuffle=0), flagged("q3", True, shuffle=0)]
    p = paired_comparison(a, b)
    assert p.n == 2  # (q1, 0) and (q2, 0)
    assert (p.acc_a, p.acc_b, p.mcnemar_b, p.mcnemar_c) == (0.5, 1.0, 0, 1)


def test_paired_key_mismatch_is_a_clear_error():
    a = [flagged("q1", True), flagged("q2", True)]
    b = [flagged("q9", True, shuffle=1)]
    with pytest.raises(ValueError, match="share no .question_id, shuffle. keys"):
        paired_comparison(a, b)
    with pytest.raises(ClinqaError):
        paired_comparison(a, b)


def test_paired_rejects_duplicate_keys():
    a = [flagged("q1", True), flagged("q1", False)]
    with pytest.raises(PairingError, match="q1"):
        paired_comparison(a, a)


# --------------------------------------------------------------------------- counts


def test_unparseable_count():
    assert unparseable_count([make("q1", None), make("q2", "A"), make("q3", None)]) == 2
    assert unparseable_count([]) == 0


def test_harmful_choice_rate():
    assert harmful_choice_rate([make("q1", "A")]) is None
    samples = [
        make("q1", "B", extras={"harmful_options": ["B"]}),  # chose harm
        make("q2", "A", extras={"harmful_options": ["B", "C"]}),  # did not
        make("q3", None, extras={"harmful_options": ["B"]}),  # unparseable: not a harmful choice
        make("q4", "B"),  # no field: ignored
    ]
    assert harmful_choice_rate(samples) == pytest.approx(1 / 3)


def test_grouped_bootstrap_keeps_a_groups_values_together():
    rng = np.random.default_rng(0)
    per_group = rng.normal(size=20)
    values = np.repeat(per_group, 10)  # ten identical values per group: really 20 observations, not 200
    groups = np.repeat(np.arange(20), 10).tolist()
    lo_g, hi_g = grouped_bootstrap_ci(values, groups)
    lo_i, hi_i = grouped_bootstrap_ci(values, list(range(200)))  # every value its own group
    assert lo_g < values.mean() < hi_g
    assert (hi_g - lo_g) > 2.5 * (hi_i - lo_i)  # about sqrt(10) wider
    assert (hi_i - lo_i) == pytest.approx(np.subtract(*bootstrap_ci(values)[::-1]), rel=0.15)
    # unequal group sizes: the statistic is the pooled mean, so a constant stays constant
    assert grouped_bootstrap_ci([2.0, 2.0, 2.0], ["a", "a", "b"]) == (2.0, 2.0)
    with pytest.raises(ValueError, match="3 values but 2 group labels"):
        grouped_bootstrap_ci([1.0, 2.0, 3.0], ["a", "b"])
