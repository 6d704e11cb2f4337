"""A specialty annotator on sentence embeddings (the embedder itself is `clinqa.models.embed`).

``EmbeddingAnnotator`` is a multi-label classifier over the 15 taxonomy specialties: one logistic
regression per specialty (one-vs-rest, ``class_weight="balanced"``) on normalised sentence
embeddings. It is saved as plain JSON (coefficients, intercepts, the embedding model name), never as
a pickle, and predicts with numpy alone, so a loaded annotator gives bit-identical probabilities.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.models.embed import (  # noqa: F401  (re-exported: the annotator's callers use these names)
    MINILM_DIM,
    MINILM_NAME,
    MINILM_PACKAGE,
    ModelLike,
    embed_texts,
    embedding_model_name,
    load_embedder,
    minilm_path,
)
from clinqa.specialties.taxonomy import SPECIALTIES, resolve_specialty

log = logging.getLogger(__name__)

SPECIALTY_IDS: tuple[str, ...] = tuple(s.id for s in SPECIALTIES)

ANNOTATOR_FORMAT = "clinqa.embedding_annotator"
ANNOTATOR_VERSION = 1


def question_text(question: Question | str, *, include_options: bool = False) -> str:
    """The text the annotator embeds for a question: the stem, optionally followed by the options."""
    if isinstance(question, str):
        return question
    if not include_options:
        return question.question
    return question.question + "\n" + "\n".join(f"{k}. {v}" for k, v in question.options.items())


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


class EmbeddingAnnotator:
    """Multi-label specialty classifier: one-vs-rest logistic regression on sentence embeddings.

    Columns of ``predict_proba`` follow the taxonomy order (``SPECIALTY_IDS``). A specialty with no
    training example gets probability 0 everywhere and is listed in ``untrained_labels``; one present
    in every training example gets probability 1 (``constant_labels``).
    """

    labels: tuple[str, ...] = SPECIALTY_IDS

    def __init__(
        self,
        *,
        C: float = 1.0,
        random_state: int = 0,
        max_iter: int = 2000,
        include_options: bool = False,
        model: ModelLike = None,
        batch_size: int = 64,
    ) -> None:
        self.C = float(C)
        self.random_state = int(random_state)
        self.max_iter = int(max_iter)
        self.include_options = bool(include_options)
        self.model = model
        self.batch_size = int(batch_size)
        self.embedding_model = embedding_model_name(model)
        self.coef_: np.ndarray | None = None  # [15, dim]
        self.intercept_: np.ndarray | None = None  # [15]
        self.status_: list[str] = []  # per label: "fitted" | "absent" | "always"
        self.n_train_: int = 0
        self.label_counts_: dict[str, int] = {}

    # -- fitting --------------------------------------------------------------------------------
    def _texts(self, items: Sequence[Question | str] | str) -> list[str]:
        if isinstance(items, (str, Question)):
            items = [items]
        return [question_text(q, include_options=self.include_options) for q in items]

    def _embed(self, items: Sequence[Question | str] | str) -> np.ndarray:
        return embed_texts(self._texts(items), batch_size=self.batch_size, model=self.model)

    def fit(self, questions: Sequence[Question], *, embeddings: np.ndarray | None = None) -> EmbeddingAnnotator:
        """Fit on questions carrying ``specialties`` (ids, aliases or names); unlabelled ones are skipped.

        ``embeddings`` (one row per question, from ``embed_texts``) skips re-embedding.
        """
        from sklearn.linear_model import LogisticRegression

        questions = list(questions)
        if embeddings is not None and len(embeddings) != len(questions):
            raise ClinqaError(f"got {len(embeddings)} embeddings for {len(questions)} questions")
        keep: list[int] = []
        gold: list[set[int]] = []
        for i, q in enumerate(questions):
            if not isinstance(q, Question):
                raise ClinqaError(f"fit expects Question objects; item {i} is {type(q).__name__}")
            if not q.specialties:
                continue
            try:
                ids = {SPECIALTY_IDS.index(resolve_specialty(s)) for s in q.specialties}
            except ClinqaError as e:
                raise ClinqaError(f"question {q.id}: {e}") from e
            keep.append(i)
            gold.append(ids)
        if not keep:
            raise ClinqaError("no training question has specialties: label some questions before fitting the annotator")
        skipped = len(questions) - len(keep)
        if skipped:
            log.info("EmbeddingAnnotator.fit: skipped %d question(s) without specialties", skipped)

        if embeddings is None:
            X = self._embed([questions[i] for i in keep])
        else:
            X = np.asarray(embeddings, dtype=np.float32)[keep]
        X64 = X.astype(np.float64)
        Y = np.zeros((len(keep), len(SPECIALTY_IDS)), dtype=int)
        for r, ids in enumerate(gold):
            Y[r, list(ids)] = 1

        dim = X.shape[1]
        coef = np.zeros((len(SPECIALTY_IDS), dim), dtype=np.float64)
        intercept = np.zeros(len(SPECIALTY_IDS), dtype=np.float64)
        status: list[str] = []
        for c in range(len(SPECIALTY_IDS)):
            y = Y[:, c]
            if y.sum() == 0:
                status.append("absent")
                continue
            if y.sum() == len(y):
                status.append("always")
                continue
            clf = LogisticRegression(
                C=self.C, class_weight="balanced", random_state=self.random_state, max_iter=self.max_iter
            )
            clf.fit(X64, y)
            coef[c] = clf.coef_[0]
            intercept[c] = clf.intercept_[0]
            status.append("fitted")
        self.coef_, self.intercept_, self.status_ = coef, intercept, status
        self.n_train_ = len(keep)
        self.label_counts_ = {lab: int(Y[:, c].sum()) for c, lab in enumerate(SPECIALTY_IDS)}
        if self.untrained_labels:
            log.warning(
                "EmbeddingAnnotator: no training example for %s; these get probability 0",
                ", ".join(self.untrained_labels),
            )
        return self

    @property
    def untrained_labels(self) -> tuple[str, ...]:
        """Specialties with no training example (always predicted with probability 0)."""
        return tuple(lab for lab, s in zip(SPECIALTY_IDS, self.status_) if s == "absent")

    @property
    def constant_labels(self) -> tuple[str, ...]:
        """Specialties present in every training example (always predicted with probability 1)."""
        return tuple(lab for lab, s in zip(SPECIALTY_IDS, self.status_) if s == "always")

    # -- prediction -----------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.coef_ is None or self.intercept_ is None:
            raise ClinqaError("the annotator is not fitted: call fit(questions) or EmbeddingAnnotator.load(path)")

    def predict_proba_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities [n, 15] (taxonomy order) for precomputed embeddings."""
        self._check_fitted()
        X = np.asarray(embeddings, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.coef_.shape[1]:
            raise ClinqaError(
                f"embeddings must have shape (n, {self.coef_.shape[1]}) for {self.embedding_model}, got {X.shape}"
            )
        probs = _sigmoid(X @ self.coef_.T + self.intercept_)
        status = np.array(self.status_)
        probs[:, status == "absent"] = 0.0
        probs[:, status == "always"] = 1.0
        return probs

    def predict_proba(self, texts: Sequence[str | Question] | str) -> np.ndarray:
        """Probabilities [n, 15], columns in taxonomy order; each is an independent one-vs-rest score."""
        self._check_fitted()
        return self.predict_proba_embeddings(self._embed(texts))

    def predict(self, texts: Sequence[str | Question] | str, k: int = 1) -> list[list[str]]:
        """The k most probable specialty ids per text, most probable first."""
        if not 1 <= k <= len(SPECIALTY_IDS):
            raise ClinqaError(f"k must be between 1 and {len(SPECIALTY_IDS)}, got {k}")
        probs = self.predict_proba(texts)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[SPECIALTY_IDS[j] for j in row] for row in order]

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "format": ANNOTATOR_FORMAT,
            "version": ANNOTATOR_VERSION,
            "embedding_model": self.embedding_model,
            "embedding_dim": int(self.coef_.shape[1]),
            "include_options": self.include_options,
            "params": {"C": self.C, "random_state": self.random_state, "max_iter": self.max_iter},
            "n_train": self.n_train_,
            "labels": list(SPECIALTY_IDS),
            "status": list(self.status_),
            "label_counts": self.label_counts_,
            "intercept": [float(v) for v in self.intercept_],
            "coef": [[float(v) for v in row] for row in self.coef_],
        }

    def save(self, path: str | Path) -> Path:
        """Write the annotator as JSON (floats round-trip exactly)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, *, model: ModelLike = None, batch_size: int = 64) -> EmbeddingAnnotator:
        """Read a saved annotator. ``model`` overrides the recorded embedding model (same dimension)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ClinqaError(f"annotator file {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ClinqaError(f"could not read annotator file {path}: {e}") from e
        if not isinstance(data, dict) or data.get("format") != ANNOTATOR_FORMAT:
            raise ClinqaError(f"{path} is not a saved clinqa EmbeddingAnnotator")
        if data.get("version") != ANNOTATOR_VERSION:
            raise ClinqaError(
                f"{path}: unsupported annotator version {data.get('version')} (expected {ANNOTATOR_VERSION})"
            )
        if list(data.get("labels", [])) != list(SPECIALTY_IDS):
            raise ClinqaError(f"{path}: its labels do not match this clinqa's specialty taxonomy; refit the annotator")
        recorded = data["embedding_model"]
        if model is None and recorded != MINILM_NAME:
            model = recorded  # a local folder recorded at fit time
        params = data.get("params", {})
        ann = cls(
            C=params.get("C", 1.0),
            random_state=params.get("random_state", 0),
            max_iter=params.get("max_iter", 2000),
            include_options=data.get("include_options", False),
            model=model,
            batch_size=batch_size,
        )
        ann.coef_ = np.asarray(data["coef"], dtype=np.float64)
        ann.intercept_ = np.asarray(data["intercept"], dtype=np.float64)
        ann.status_ = list(data["status"])
        ann.n_train_ = int(data.get("n_train", 0))
        ann.label_counts_ = dict(data.get("label_counts", {}))
        if ann.coef_.shape != (len(SPECIALTY_IDS), int(data["embedding_dim"])) or len(ann.status_) != len(
            SPECIALTY_IDS
        ):
            raise ClinqaError(f"{path}: coefficient shapes are inconsistent; the file is damaged, refit the annotator")
        return ann
