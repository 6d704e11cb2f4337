"""Split-conformal multi-label prediction sets over class probabilities (LAC scores).

Given class probabilities ``probs`` [n, K] (e.g. ``EmbeddingAnnotator.predict_proba``; rows need not
sum to 1) and gold label sets for a calibration split:

* the nonconformity score of a calibration item is ``1 - p(gold label)`` ("least ambiguous
  set-valued classifier", Sadinle et al. 2019). An item may have several gold labels:

  - ``mode="any"`` (default) scores it with its *most probable* gold label, ``min_y (1 - p_y)``;
    the sets then contain **at least one** gold label with probability >= 1 - alpha;
  - ``mode="all"`` scores it with its *least probable* gold label, ``max_y (1 - p_y)``; the sets then
    contain **all** gold labels with probability >= 1 - alpha (and are larger).

* ``qhat`` is the k-th smallest of the n calibration scores, k = ceil((n + 1)(1 - alpha)) — the exact
  split-conformal quantile (numpy's ``quantile(scores, k/n, method="inverted_cdf")``; the often-quoted
  ``method="higher"`` at level k/n picks the (k+1)-th score when k < n, which is valid but one order
  statistic more conservative). With exchangeable data, 1 - alpha <= coverage < 1 - alpha + 1/(n+1).

* the prediction set of a new item is ``{k : 1 - p_k <= qhat}`` (i.e. ``p_k >= 1 - qhat``). An empty
  set is replaced by the single argmax class: this can only add coverage, so the guarantee holds.

Gold labels may be given as sets of column indices or as lists of specialty ids/aliases (then the
columns must be the 15 taxonomy specialties in taxonomy order).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from clinqa.errors import ClinqaError
from clinqa.specialties.taxonomy import SPECIALTIES, resolve_specialty

MODES = ("any", "all")
_SPECIALTY_IDS: tuple[str, ...] = tuple(s.id for s in SPECIALTIES)
_EPS = 1e-9  # guards ceil() against float error, e.g. (n + 1) * 0.9 == 9.000000000000002


@dataclass(frozen=True)
class ConformalCalibration:
    """The outcome of calibration: sets are ``{k : p_k >= 1 - qhat}``."""

    qhat: float
    alpha: float
    n: int
    mode: str = "any"

    @property
    def threshold(self) -> float:
        """The probability a class needs to enter a set: 1 - qhat."""
        return 1.0 - self.qhat

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SetMetrics:
    """How prediction sets fare against multi-label gold.

    coverage_any: share of items whose set holds at least one gold label.
    coverage_all: share of items whose set holds every gold label.
    precision / recall: micro-averaged over labels (sum |S & G| / sum |S|, sum |S & G| / sum |G|).
    """

    coverage_any: float
    coverage_all: float
    mean_set_size: float
    precision: float
    recall: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def _rank(n: int, alpha: float) -> int:
    return math.ceil((n + 1) * (1.0 - alpha) - _EPS)


def min_calibration_size(alpha: float) -> int:
    """The smallest calibration size n for which ceil((n + 1)(1 - alpha)) <= n (about 1/alpha - 1)."""
    _check_alpha(alpha)
    n = max(1, math.ceil(1.0 / alpha - 1.0 - _EPS) - 1)
    while _rank(n, alpha) > n:
        n += 1
    return n


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise ClinqaError(f"alpha must be strictly between 0 and 1 (e.g. 0.1 for 90% coverage), got {alpha!r}")


def _check_probs(probs: np.ndarray, name: str = "probs") -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ClinqaError(f"{name} must be a 2-D array [n_items, n_classes], got shape {p.shape}")
    if not np.all(np.isfinite(p)) or p.min(initial=0.0) < -1e-12 or p.max(initial=0.0) > 1 + 1e-12:
        raise ClinqaError(f"{name} must hold probabilities in [0, 1]")
    return p


def _label_index(label: int | str, n_classes: int, where: str) -> int:
    if isinstance(label, (bool, np.bool_)):
        raise ClinqaError(f"{where}: labels must be class indices or specialty ids, got {label!r}")
    if isinstance(label, (int, np.integer)):
        idx = int(label)
    elif isinstance(label, str):
        if n_classes != len(_SPECIALTY_IDS):
            raise ClinqaError(
                f"{where}: specialty names need probabilities over the {len(_SPECIALTY_IDS)} taxonomy specialties, "
                f"but there are {n_classes} classes; pass class indices instead"
            )
        idx = _SPECIALTY_IDS.index(resolve_specialty(label))
    else:
        raise ClinqaError(f"{where}: labels must be class indices or specialty ids, got {label!r}")
    if not 0 <= idx < n_classes:
        raise ClinqaError(f"{where}: class index {idx} is out of range for {n_classes} classes")
    return idx


def label_sets(
    labels: Sequence[Iterable[int | str]], n_classes: int, *, name: str = "gold", allow_empty: bool = False
) -> list[set[int]]:
    """Normalise per-item labels (indices or specialty ids/aliases) to sets of column indices."""
    if isinstance(labels, (str, bytes)):
        raise ClinqaError(f"{name} must be a list with one collection of labels per item")
    out: list[set[int]] = []
    for i, item in enumerate(labels):
        if isinstance(item, (str, int, np.integer)):
            item = [item]  # a single label per item is accepted as shorthand
        s = {_label_index(lab, n_classes, f"{name}[{i}]") for lab in item}
        if not s and not allow_empty:
            raise ClinqaError(
                f"{name}[{i}] has no labels: every calibration/evaluation item needs at least one gold label"
            )
        out.append(s)
    return out


def conformal_scores(probs: np.ndarray, gold: Sequence[Iterable[int | str]], mode: str = "any") -> np.ndarray:
    """LAC nonconformity score per item: 1 - p(gold), over the best ("any") or worst ("all") gold label."""
    if mode not in MODES:
        raise ClinqaError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    p = _check_probs(probs)
    sets = label_sets(gold, p.shape[1])
    if len(sets) != p.shape[0]:
        raise ClinqaError(f"got {p.shape[0]} probability rows but {len(sets)} gold label sets")
    agg = min if mode == "any" else max
    return np.array([agg(1.0 - p[i, k] for k in s) for i, s in enumerate(sets)], dtype=np.float64)


def calibrate(
    probs_cal: np.ndarray,
    gold_cal: Sequence[Iterable[int | str]],
    alpha: float,
    mode: str = "any",
) -> ConformalCalibration:
    """Split-conformal calibration: qhat = k-th smallest score, k = ceil((n + 1)(1 - alpha)).

    ``mode="any"``: sets contain at least one gold label w.p. >= 1 - alpha (score of the most probable
    gold label); ``mode="all"``: sets contain every gold label w.p. >= 1 - alpha.
    """
    _check_alpha(alpha)
    scores = conformal_scores(probs_cal, gold_cal, mode)
    n = len(scores)
    k = _rank(n, alpha)
    if k > n:
        raise ClinqaError(
            f"{n} calibration item(s) are too few for alpha={alpha}: split conformal needs at least "
            f"{min_calibration_size(alpha)} to reach {1 - alpha:.0%} coverage; add calibration data or raise alpha"
        )
    qhat = float(np.sort(scores)[k - 1])
    return ConformalCalibration(qhat=qhat, alpha=float(alpha), n=n, mode=mode)


def prediction_sets(probs: np.ndarray, calibration: ConformalCalibration | float) -> list[list[int]]:
    """Per item, the classes with ``1 - p_k <= qhat``, most probable first; never empty (argmax fallback).

    ``calibration`` may also be a bare qhat.
    """
    qhat = calibration.qhat if isinstance(calibration, ConformalCalibration) else float(calibration)
    p = _check_probs(probs)
    out: list[list[int]] = []
    for row in p:
        order = np.argsort(-row, kind="stable")
        members = [int(k) for k in order if 1.0 - row[k] <= qhat]
        out.append(members or [int(order[0])])
    return out


def sets_to_labels(sets: Sequence[Sequence[int]]) -> list[list[str]]:
    """Index sets over the 15 taxonomy columns -> specialty ids."""
    return [[_SPECIALTY_IDS[k] for k in s] for s in sets]


def evaluate_sets(sets: Sequence[Iterable[int | str]], gold: Sequence[Iterable[int | str]]) -> SetMetrics:
    """Coverage (any/all gold labels), mean set size and micro precision/recall of set labels vs gold.

    Labels may be indices or specialty ids (mixing is fine when the indices are taxonomy columns).
    """
    sets, gold = list(sets), list(gold)
    if len(sets) != len(gold):
        raise ClinqaError(f"got {len(sets)} prediction sets but {len(gold)} gold label sets")
    if not sets:
        raise ClinqaError("evaluate_sets needs at least one item")
    n_classes = _infer_n_classes(sets, gold)
    s_sets = label_sets(sets, n_classes, name="sets", allow_empty=True)
    g_sets = label_sets(gold, n_classes, name="gold")
    hits = [len(s & g) for s, g in zip(s_sets, g_sets)]
    n_pred = sum(len(s) for s in s_sets)
    n_gold = sum(len(g) for g in g_sets)
    n = len(s_sets)
    return SetMetrics(
        coverage_any=sum(h > 0 for h in hits) / n,
        coverage_all=sum(g <= s for s, g in zip(s_sets, g_sets)) / n,
        mean_set_size=n_pred / n,
        precision=sum(hits) / n_pred if n_pred else 0.0,
        recall=sum(hits) / n_gold,
        n=n,
    )


def _infer_n_classes(*collections: Sequence[Iterable[int | str]]) -> int:
    # Any specialty name pins the columns to the taxonomy; otherwise indices just need to be >= 0.
    top = -1
    for coll in collections:
        for item in coll:
            for lab in [item] if isinstance(item, (str, int, np.integer)) else item:
                if isinstance(lab, str):
                    return len(_SPECIALTY_IDS)
                if isinstance(lab, (int, np.integer)) and not isinstance(lab, bool):
                    top = max(top, int(lab))
    return max(top + 1, 1)


def split(n: int, cal_fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random calibration / held-out indices (each sorted) for n items; both parts are non-empty."""
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ClinqaError(f"need at least 2 items to split into calibration and held-out parts, got {n!r}")
    if not 0.0 < cal_fraction < 1.0:
        raise ClinqaError(f"cal_fraction must be strictly between 0 and 1, got {cal_fraction!r}")
    n_cal = min(max(int(round(n * cal_fraction)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(int(n))
    return np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
