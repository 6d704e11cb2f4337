"""The "none" gate: does a question belong to any specialty of the taxonomy at all?

The MiniLM annotator (`embed.EmbeddingAnnotator`) scores fifteen specialties one-vs-rest and has no
way to say "none of them", so a dental, anatomy or statistics question lands in whichever specialty
its embedding is least unlike. Exam banks such as MedMCQA are more than half such questions (241 of
450 in the hand-labelled sample, `benchmarks/data/medmcqa_specialty_val.jsonl`). The gate is one
logistic regression on the same sentence embeddings, trained on questions with a specialty
(positives for "in the taxonomy") against questions labelled none; a question whose P(none) reaches
the threshold is left unlabelled.

    gate = fit_none_gate(embeddings_with_specialty, embeddings_of_none)
    gate.is_none(embed_texts(texts))

`cross_fitted_p_none` scores every question of a labelled set with a gate that never saw it (k-fold),
so the gate's error rates can be measured on the same hand-labelled questions it is trained from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clinqa.errors import ClinqaError


@dataclass(frozen=True)
class NoneGate:
    """A fitted gate: P(none) = sigmoid(x . coef + intercept) for an embedding x."""

    coef: np.ndarray
    intercept: float
    threshold: float = 0.5
    n_specialty: int = 0
    n_none: int = 0

    def p_none(self, embeddings: np.ndarray) -> np.ndarray:
        """P(the question belongs to no specialty), one per embedding row."""
        X = np.asarray(embeddings, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.coef.shape[0]:
            raise ClinqaError(f"embeddings must have shape (n, {self.coef.shape[0]}), got {X.shape}")
        return 1.0 / (1.0 + np.exp(-(X @ self.coef + self.intercept)))

    def is_none(self, embeddings: np.ndarray) -> np.ndarray:
        """True where P(none) reaches the threshold: leave that question without a specialty."""
        return self.p_none(embeddings) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "threshold": self.threshold,
            "n_specialty": self.n_specialty,
            "n_none": self.n_none,
        }


def _check_threshold(threshold: float) -> float:
    if not 0.0 < float(threshold) < 1.0:
        raise ClinqaError(f"the none gate's threshold must be between 0 and 1 (exclusive), got {threshold}")
    return float(threshold)


def fit_none_gate(
    specialty_embeddings: np.ndarray,
    none_embeddings: np.ndarray,
    *,
    C: float = 1.0,
    threshold: float = 0.5,
    random_state: int = 0,
) -> NoneGate:
    """Fit the gate on embeddings of questions with a specialty (label 0) and without one (label 1).

    Classes are weighted to balance, so P(none) = 0.5 sits between the two groups whatever their sizes.
    """
    from sklearn.linear_model import LogisticRegression

    threshold = _check_threshold(threshold)
    pos = np.asarray(specialty_embeddings, dtype=np.float64)
    neg = np.asarray(none_embeddings, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ClinqaError(
            f"the none gate needs questions with a specialty and questions labelled none; got {len(pos)} and {len(neg)}"
        )
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise ClinqaError(f"embeddings of both groups must be (n, dim) with one dim; got {pos.shape} and {neg.shape}")
    X = np.vstack([pos, neg])
    y = np.r_[np.zeros(len(pos), dtype=int), np.ones(len(neg), dtype=int)]
    clf = LogisticRegression(C=C, class_weight="balanced", random_state=random_state, max_iter=2000)
    clf.fit(X, y)
    return NoneGate(
        coef=clf.coef_[0].copy(),
        intercept=float(clf.intercept_[0]),
        threshold=threshold,
        n_specialty=len(pos),
        n_none=len(neg),
    )


def cross_fitted_p_none(
    embeddings: np.ndarray,
    is_none: Sequence[bool],
    *,
    extra_specialty_embeddings: np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
    C: float = 1.0,
) -> np.ndarray:
    """Out-of-fold P(none) for every labelled question: stratified `folds`-fold, each fold scored by a
    gate fitted on the other folds (plus `extra_specialty_embeddings`, e.g. the bundled training
    questions, as further questions with a specialty)."""
    from sklearn.model_selection import StratifiedKFold

    X = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(is_none, dtype=bool)
    if len(X) != len(y):
        raise ClinqaError(f"got {len(X)} embeddings for {len(y)} labels")
    if not 2 <= folds <= min(int(y.sum()), int((~y).sum())):
        raise ClinqaError(
            f"{folds} folds need at least {folds} questions labelled none and {folds} with a specialty; "
            f"got {int(y.sum())} and {int((~y).sum())}"
        )
    extra = np.zeros((0, X.shape[1])) if extra_specialty_embeddings is None else np.asarray(extra_specialty_embeddings)
    out = np.full(len(X), np.nan)
    for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y):
        gate = fit_none_gate(np.vstack([extra, X[train][~y[train]]]), X[train][y[train]], C=C)
        out[test] = gate.p_none(X[test])
    return out


def fit_none_gate_on(
    labelled: Sequence[Any],
    extra_specialty: Sequence[Any] = (),
    *,
    threshold: float = 0.5,
    where: str = "the none examples",
    model: Any = None,
    include_options: bool = False,
) -> NoneGate:
    """Fit the gate on hand-labelled questions: those whose ``specialties`` is empty are "none", the
    others (and `extra_specialty`, e.g. the annotator's training questions) belong to the taxonomy.
    A file in which no question has a specialty is refused: it was not labelled, so emptiness there
    does not mean "none"."""
    from clinqa.specialties.embed import embed_texts, question_text

    threshold = _check_threshold(threshold)
    none = [q for q in labelled if not q.specialties]
    spec = [q for q in labelled if q.specialties]
    if not spec:
        raise ClinqaError(
            f"{where}: no question has a specialty, so the file does not look labelled; the gate learns "
            "'none' from a labelled file's questions whose specialties list is empty"
        )
    if not none:
        raise ClinqaError(f"{where}: no question is labelled none (an empty specialties list)")
    spec += list(extra_specialty)
    emb = embed_texts([question_text(q, include_options=include_options) for q in spec + none], model=model)
    return fit_none_gate(emb[: len(spec)], emb[len(spec) :], threshold=threshold)


__all__ = ["NoneGate", "cross_fitted_p_none", "fit_none_gate", "fit_none_gate_on"]
