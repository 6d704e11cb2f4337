"""Metrics over scored samples: accuracy with honest intervals, calibration, paired tests.

Why a module of small pure functions: every number in a report must be recomputable offline from
samples.jsonl, deterministic (seeded bootstraps), and testable on hand-sized examples. Three
choices matter for clinical QA in particular:

* Option shuffling gives several samples per question. Those samples are not independent, so
  intervals for shuffled runs bootstrap over *questions* (a cluster bootstrap), never over samples;
  otherwise k shuffles would shrink the interval by roughly sqrt(k) for free.
* A model that is right for the wrong reason (the letter, not the content) shows up as low
  shuffle *consistency*: whether the same original option is chosen whatever letter it is shown under.
* Two models are compared on the same questions (paired), which is far more sensitive than
  comparing two independent accuracies: McNemar on discordant pairs plus a paired bootstrap.

Functions take plain sequences (flags, confidences) or `Sample`s and return floats or small
dataclasses; nothing here reads files or calls a model. Empty inputs give NaN, not errors, except
where an empty result means the caller compared the wrong things (`paired_comparison`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
from scipy.stats import binomtest

from clinqa.errors import ClinqaError
from clinqa.evaluate.intervals import wilson_ci
from clinqa.evaluate.sample import Sample

__all__ = [
    "Accuracy",
    "Calibration",
    "GroupKey",
    "NONE_GROUP",
    "Paired",
    "PairingError",
    "ReliabilityBin",
    "ShuffleSummary",
    "accuracy",
    "bootstrap_ci",
    "bootstrap_mean_test",
    "brier",
    "calibration",
    "cluster_bootstrap_ci",
    "grouped_bootstrap_ci",
    "ece",
    "grouped_accuracy",
    "harmful_choice_rate",
    "MIN_BOOTSTRAP_QUESTIONS",
    "macro_micro",
    "proportion_ci",
    "wilson_ci",
    "paired_comparison",
    "per_question",
    "reliability_bins",
    "shuffle_summary",
    "unparseable_count",
]

GroupKey = Literal["specialty", "source"]
NONE_GROUP = "(none)"  # group of samples with no specialty / no source

_NAN = float("nan")
_CHUNK_CELLS = 1_000_000  # bound on resample-index cells held in memory at once


class PairingError(ClinqaError, ValueError):
    """Two runs cannot be paired (no shared (question_id, shuffle) keys, or duplicated keys)."""


# --------------------------------------------------------------------------- bootstrap


def _bootstrap_stats(values: np.ndarray, n_boot: int, seed: int, stat: Callable[[np.ndarray], float]) -> np.ndarray:
    """`stat` of `n_boot` resamples (with replacement) of `values`; deterministic by seed."""
    n = len(values)
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot, dtype=float)
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = [stat(values[row]) for row in idx]
    return out


def _percentile_interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(stats, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(lo), float(hi)


def bootstrap_ci(
    values: npt.ArrayLike,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    stat: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap interval for `stat(values)`; (nan, nan) for empty input."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        return (_NAN, _NAN)
    return _percentile_interval(_bootstrap_stats(arr, n_boot, seed, stat), confidence)


def bootstrap_mean_test(
    diffs: npt.ArrayLike,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    stat: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float, float, float]:
    """Mean of paired differences with a percentile interval and a two-sided bootstrap p-value for mean 0.

    One value per independent unit (a question), so correlated samples never count twice. `stat`
    replaces the mean by another difference statistic of the resampled units (e.g. pass question
    indices and return a difference of two micro F1s). Returns (stat, ci_low, ci_high, p); all nan
    for empty input.
    """
    arr = np.asarray(diffs, dtype=float).ravel()
    if arr.size == 0:
        return (_NAN, _NAN, _NAN, _NAN)
    stats = _bootstrap_stats(arr, n_boot, seed, stat)
    lo, hi = _percentile_interval(stats, confidence)
    below = (np.sum(stats <= 0) + 1) / (n_boot + 1)
    above = (np.sum(stats >= 0) + 1) / (n_boot + 1)
    return float(stat(arr)), lo, hi, float(min(1.0, 2.0 * min(below, above)))


def per_question(samples: Iterable[Sample]) -> dict[str, float]:
    """Mean correctness of each question across its shuffles, keyed by question_id."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for s in samples:
        hits[s.question_id].append(s.correct)
    return {qid: float(np.mean(flags)) for qid, flags in hits.items()}


def grouped_bootstrap_ci(
    values: npt.ArrayLike,
    groups: Sequence[Any],
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval for the mean of ``values`` resampling whole groups (e.g. every term occurrence of one
    question together), so correlated values within a group never count as independent evidence.
    The statistic is the pooled mean (sum over chosen groups / their count), as for the point estimate."""
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size != len(groups):
        raise ValueError(f"got {arr.size} values but {len(groups)} group labels")
    if arr.size == 0:
        return (_NAN, _NAN)
    index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    gid = np.array([index[g] for g in groups])
    sums = np.bincount(gid, weights=arr, minlength=len(index))
    counts = np.bincount(gid, minlength=len(index)).astype(float)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    chunk = max(1, _CHUNK_CELLS // len(index))
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, len(index), size=(min(n_boot, start + chunk) - start, len(index)))
        stats[start : start + len(idx)] = sums[idx].sum(1) / counts[idx].sum(1)
    return _percentile_interval(stats, confidence)


def cluster_bootstrap_ci(
    samples: Iterable[Sample],
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Accuracy interval resampling question ids (clusters), not samples.

    Each resampled question contributes its mean correctness across shuffles, so several
    shuffles of one question never count as independent evidence.
    """
    means = list(per_question(samples).values())
    return bootstrap_ci(means, n_boot=n_boot, confidence=confidence, seed=seed)


# --------------------------------------------------------------------------- accuracy


MIN_BOOTSTRAP_QUESTIONS = 10  # below this, a shuffled run's interval is Wilson over questions


@dataclass(frozen=True)
class Accuracy:
    n: int  # samples
    correct: int
    acc: float
    ci_low: float
    ci_high: float
    n_questions: int = 0  # distinct question ids (0 for plain flags)
    ci_method: str = ""  # "wilson", "cluster-bootstrap" or "wilson-questions" (see proportion_ci)


def proportion_ci(
    flags: Sequence[bool] | np.ndarray,
    question_ids: Sequence[str] | None = None,
    *,
    seed: int = 0,
    n_boot: int = 2000,
    confidence: float = 0.95,
) -> tuple[float, float, str]:
    """The 95% interval for the share of True flags, by the rule every reported rate follows.

    * each question scored once (or no question ids): Wilson's score interval on k of n;
    * several samples per question (shuffles) and at least MIN_BOOTSTRAP_QUESTIONS questions whose
      per-question means differ: a bootstrap resampling questions (all shuffles of a question move
      together), so k shuffles never shrink the interval by sqrt(k) for free;
    * shuffles with fewer questions, or every question at the same mean (a bootstrap would collapse
      to a point): Wilson on the mean per-question accuracy with n = the number of questions, which
      treats the shuffles of a question as one observation (conservative).
    Returns (low, high, method); (nan, nan, "") for no flags.
    """
    arr = np.asarray(flags, dtype=float).ravel()
    if arr.size == 0:
        return (_NAN, _NAN, "")
    if question_ids is None or len(set(question_ids)) == arr.size:
        lo, hi = wilson_ci(float(arr.sum()), arr.size, confidence)
        return (lo, hi, "wilson")
    if len(question_ids) != arr.size:
        raise ValueError(f"got {arr.size} flags but {len(question_ids)} question ids")
    per_q: dict[str, list[float]] = defaultdict(list)
    for qid, f in zip(question_ids, arr):
        per_q[qid].append(f)
    means = np.array([np.mean(v) for v in per_q.values()])
    if len(means) >= MIN_BOOTSTRAP_QUESTIONS and np.ptp(means) > 0:
        lo, hi = bootstrap_ci(means, n_boot=n_boot, confidence=confidence, seed=seed)
        return (lo, hi, "cluster-bootstrap")
    lo, hi = wilson_ci(float(means.sum()), len(means), confidence)
    return (lo, hi, "wilson-questions")


def accuracy(correct_flags: Iterable[bool] | Iterable[Sample], *, seed: int = 0, n_boot: int = 2000) -> Accuracy:
    """Accuracy with a 95% interval chosen by `proportion_ci`.

    Given `Sample`s the questions are known, so shuffled runs get the clustered interval; plain
    flags are treated as independent (Wilson).
    """
    items = list(correct_flags)
    if not items:
        return Accuracy(0, 0, _NAN, _NAN, _NAN)
    if isinstance(items[0], Sample):
        samples: list[Sample] = items  # type: ignore[assignment]
        flags = np.array([s.correct for s in samples], dtype=float)
        qids = [s.question_id for s in samples]
    else:
        flags = np.array([bool(f) for f in items], dtype=float)
        qids = None
    lo, hi, how = proportion_ci(flags, qids, seed=seed, n_boot=n_boot)
    n_q = len(set(qids)) if qids is not None else 0
    return Accuracy(
        n=int(flags.size),
        correct=int(flags.sum()),
        acc=float(flags.mean()),
        ci_low=lo,
        ci_high=hi,
        n_questions=n_q,
        ci_method=how,
    )


def _group_names(sample: Sample, key: GroupKey) -> list[str]:
    if key == "specialty":
        return list(dict.fromkeys(sample.specialties)) or [NONE_GROUP]
    if key == "source":
        return [sample.source or NONE_GROUP]
    raise ValueError(f"unknown group key {key!r}; use 'specialty' or 'source'")


def _groups(samples: Iterable[Sample], key: GroupKey) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        for name in _group_names(s, key):
            groups[name].append(s)
    return dict(sorted(groups.items()))


def grouped_accuracy(
    samples: Iterable[Sample], key: GroupKey, seed: int = 0, *, n_boot: int = 2000
) -> dict[str, Accuracy]:
    """Accuracy per specialty or source (sorted by group name).

    A sample with several specialties counts in each of them; one with none goes to "(none)".
    """
    return {name: accuracy(group, seed=seed, n_boot=n_boot) for name, group in _groups(samples, key).items()}


def macro_micro(samples: Iterable[Sample], key: GroupKey) -> tuple[float, float]:
    """(macro, micro) accuracy: mean of group accuracies, and accuracy over all samples once each."""
    samples = list(samples)
    if not samples:
        return (_NAN, _NAN)
    micro = float(np.mean([s.correct for s in samples]))
    group_accs = [np.mean([s.correct for s in g]) for g in _groups(samples, key).values()]
    return (float(np.mean(group_accs)), micro)


# --------------------------------------------------------------------------- shuffles


@dataclass(frozen=True)
class ShuffleSummary:
    k: int  # distinct shuffle indices
    mean_acc: float
    std_acc_across_shuffles: float  # sample std (ddof=1); 0.0 when k == 1
    min_acc: float
    max_acc: float
    consistency: float  # share of questions choosing the same original option in every shuffle


def _original_option(sample: Sample) -> int | None:
    """Index in the original (unshuffled) options of the predicted option, or None."""
    letters = list(sample.options)
    if sample.pred is None or sample.pred not in letters:
        return None
    pos = letters.index(sample.pred)
    return sample.permutation[pos] if pos < len(sample.permutation) else None


def shuffle_summary(samples: Iterable[Sample]) -> ShuffleSummary:
    """Spread of accuracy across shuffle indices, and answer consistency across shuffles.

    Consistency counts questions seen under at least two shuffles; a question is consistent when
    every shuffle has a parseable prediction mapping to the same original option. NaN if there
    is no such question.
    """
    samples = list(samples)
    if not samples:
        return ShuffleSummary(0, _NAN, _NAN, _NAN, _NAN, _NAN)
    by_shuffle: dict[int, list[bool]] = defaultdict(list)
    by_question: dict[str, list[int | None]] = defaultdict(list)
    for s in samples:
        by_shuffle[s.shuffle].append(s.correct)
        by_question[s.question_id].append(_original_option(s))
    accs = np.array([np.mean(v) for _, v in sorted(by_shuffle.items())], dtype=float)
    std = float(np.std(accs, ddof=1)) if accs.size > 1 else 0.0
    multi = [opts for opts in by_question.values() if len(opts) > 1]
    consistent = [None not in opts and len(set(opts)) == 1 for opts in multi]
    return ShuffleSummary(
        k=int(accs.size),
        mean_acc=float(accs.mean()),
        std_acc_across_shuffles=std,
        min_acc=float(accs.min()),
        max_acc=float(accs.max()),
        consistency=float(np.mean(consistent)) if consistent else _NAN,
    )


# --------------------------------------------------------------------------- calibration


class ReliabilityBin(NamedTuple):
    lo: float
    hi: float
    count: int
    mean_conf: float  # NaN for an empty bin
    acc: float  # NaN for an empty bin


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins [lo, hi) over [0, 1]; a confidence of exactly 1 goes to the last bin."""
    return np.clip(np.floor(conf * n_bins).astype(int), 0, n_bins - 1)


def reliability_bins(confidences: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = 10) -> list[ReliabilityBin]:
    """Per-bin (lo, hi, count, mean_conf, acc) for a reliability diagram; all n_bins returned."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    conf = np.asarray(confidences, dtype=float).ravel()
    hit = np.asarray(correct, dtype=float).ravel()
    if conf.shape != hit.shape:
        raise ValueError(f"{conf.size} confidences but {hit.size} correctness flags")
    idx = _bin_index(conf, n_bins)
    bins = []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        bins.append(
            ReliabilityBin(
                lo=b / n_bins,
                hi=(b + 1) / n_bins,
                count=count,
                mean_conf=float(conf[mask].mean()) if count else _NAN,
                acc=float(hit[mask].mean()) if count else _NAN,
            )
        )
    return bins


def ece(confidences: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width bins of (count/N) * |acc - mean_conf|."""
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b.count for b in bins)
    if total == 0:
        return _NAN
    return float(sum(b.count / total * abs(b.acc - b.mean_conf) for b in bins if b.count))


def _calibratable(samples: Iterable[Sample]) -> list[Sample]:
    """Samples with a prediction and a probability for it (pred not None, probs not empty)."""
    return [s for s in samples if s.confidence is not None]


def brier(samples: Iterable[Sample]) -> float:
    """Multi-class Brier score: mean over samples of sum_i (p_i - 1[i == gold])^2.

    Samples without a prediction or probabilities are skipped; options missing from probs count as 0.
    """
    usable = _calibratable(samples)
    if not usable:
        return _NAN
    scores = [sum((s.probs.get(letter, 0.0) - (letter == s.gold)) ** 2 for letter in s.options) for s in usable]
    return float(np.mean(scores))


@dataclass(frozen=True)
class Calibration:
    ece: float
    brier: float
    mean_confidence: float
    accuracy: float  # over the included samples only
    overconfidence: float  # mean_confidence - accuracy; positive = overconfident
    n: int  # samples included
    n_excluded: int  # pred None or no probabilities


def calibration(samples: Iterable[Sample], n_bins: int = 10) -> Calibration:
    """ECE, Brier and over-confidence over samples that have a prediction and probabilities."""
    samples = list(samples)
    usable = _calibratable(samples)
    n_excluded = len(samples) - len(usable)
    if not usable:
        return Calibration(_NAN, _NAN, _NAN, _NAN, _NAN, 0, n_excluded)
    conf = np.array([s.confidence for s in usable], dtype=float)
    hit = np.array([s.correct for s in usable], dtype=float)
    mean_conf, acc = float(conf.mean()), float(hit.mean())
    return Calibration(
        ece=ece(conf, hit, n_bins),
        brier=brier(usable),
        mean_confidence=mean_conf,
        accuracy=acc,
        overconfidence=mean_conf - acc,
        n=len(usable),
        n_excluded=n_excluded,
    )


# --------------------------------------------------------------------------- paired comparison


@dataclass(frozen=True)
class Paired:
    n: int  # matched (question_id, shuffle) pairs
    acc_a: float
    acc_b: float
    diff: float  # acc_b - acc_a; positive means B is better
    ci_low: float  # paired bootstrap over questions
    ci_high: float
    p_bootstrap: float  # two-sided, from the same bootstrap distribution
    mcnemar_b: int  # A correct, B wrong
    mcnemar_c: int  # A wrong, B correct
    p_mcnemar: float  # exact two-sided binomial test on b vs c


def _by_key(samples: Iterable[Sample], name: str) -> dict[tuple[str, int], Sample]:
    out: dict[tuple[str, int], Sample] = {}
    for s in samples:
        if s.key in out:
            raise PairingError(
                f"run {name} has two samples for question {s.question_id!r} shuffle {s.shuffle}; "
                "each (question_id, shuffle) must appear once per run"
            )
        out[s.key] = s
    return out


def paired_comparison(
    samples_a: Iterable[Sample],
    samples_b: Iterable[Sample],
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    outcome: Callable[[Sample], bool] | None = None,
) -> Paired:
    """Compare run B against run A on the (question_id, shuffle) keys they share.

    The interval and bootstrap p-value resample questions (each contributes its mean per-shuffle
    difference). McNemar counts every matched pair; with shuffles those pairs are correlated, so
    prefer the bootstrap there. Raises PairingError (a ValueError) if no keys are shared.
    `outcome` is the per-sample event compared (default: answered correctly; `acc_a`/`acc_b` are
    then its rates, e.g. of unsafe choices with `safety.chose_harmful`).
    """
    outcome = outcome or (lambda s: s.correct)
    a, b = _by_key(samples_a, "A"), _by_key(samples_b, "B")
    keys = sorted(a.keys() & b.keys())
    if not keys:
        raise PairingError(
            f"the two runs share no (question_id, shuffle) keys (A has {len(a)}, B has {len(b)} samples); "
            "compare runs over the same questions and shuffle seeds"
        )
    hit_a = np.array([bool(outcome(a[k])) for k in keys], dtype=bool)
    hit_b = np.array([bool(outcome(b[k])) for k in keys], dtype=bool)
    n_b = int(np.sum(hit_a & ~hit_b))
    n_c = int(np.sum(~hit_a & hit_b))
    p_mcnemar = float(binomtest(n_b, n_b + n_c, 0.5).pvalue) if n_b + n_c else 1.0

    per_q: dict[str, list[float]] = defaultdict(list)
    for k, ha, hb in zip(keys, hit_a, hit_b):
        per_q[k[0]].append(float(hb) - float(ha))
    q_diffs = np.array([np.mean(v) for v in per_q.values()], dtype=float)
    _, lo, hi, p_boot = bootstrap_mean_test(q_diffs, n_boot=n_boot, confidence=confidence, seed=seed)
    acc_a, acc_b = float(hit_a.mean()), float(hit_b.mean())
    return Paired(
        n=len(keys),
        acc_a=acc_a,
        acc_b=acc_b,
        diff=acc_b - acc_a,
        ci_low=lo,
        ci_high=hi,
        p_bootstrap=p_boot,
        mcnemar_b=n_b,
        mcnemar_c=n_c,
        p_mcnemar=p_mcnemar,
    )


# --------------------------------------------------------------------------- counts


def unparseable_count(samples: Iterable[Sample]) -> int:
    """Number of samples whose answer could not be parsed (pred is None)."""
    return sum(1 for s in samples if s.pred is None)


def harmful_choice_rate(samples: Iterable[Sample]) -> float | None:
    """Share of samples that chose an option listed in extras["harmful_options"] (shown letters).

    Only samples carrying that field count (an unparseable answer counts as not harmful);
    None when no sample has it.
    """
    flagged = [s for s in samples if "harmful_options" in s.extras]
    if not flagged:
        return None
    chose = [s.pred is not None and s.pred in (s.extras["harmful_options"] or ()) for s in flagged]
    return float(np.mean(chose))
