"""Per-category steering: one vector per specialty (or any meta key) and a router choosing one.

The router is a multinomial logistic regression on features of the question stem: the bundled
MiniLM sentence embeddings ("embed", the default: cheap and model-independent), the steered model's
own mean hidden state at a layer ("hidden"), or both side by side ("embed+hidden"). C is chosen by
cross-validation on the training texts. When the top probability is below a threshold (by default
set so that about 90% of training texts are routed) it returns None and the question is answered
unsteered: a wrong vector is worse than none. Coefficients are saved as JSON (no pickle), with
held-out routing metrics (accuracy, coverage, accuracy of the most confident shares, confusion).

A category folder written by `build_category_vectors`:

    out_dir/vectors.json          index: categories, their folders, router accuracy, config
    out_dir/<category>/vector.*   one SteeringVector per category
    out_dir/router/router.json    the router
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clinqa.adapt.steering import SteeringConfig, SteeringVector, build_steering_vector, resolve_layers, weights_hash
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate.prompts import GENERATE_INSTRUCTION
from clinqa.models.request import Prompt
from clinqa.runs import Progress

ROUTER_FORMAT = "clinqa.steering_router"
INDEX_FORMAT = "clinqa.steering_categories"
MODES = ("embed", "hidden", "embed+hidden")
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # searched by CV when C is None
CV_FOLDS = 5
_OPTION_LINE = re.compile(r"^[A-Z][.)] ")


def question_from_prompt(prompt: str) -> str:
    """The question stem of a prompt: read from a structured prompt (clinqa.models.request.Prompt, as
    every scoring method makes, rewritten or not by the modifiers above); plain text typed by a user
    is parsed (question_from_text)."""
    if isinstance(prompt, Prompt) and prompt.stem:
        return prompt.stem
    return question_from_text(prompt)


def question_from_text(prompt: str) -> str:
    """The fallback for plain text typed by a user (CLI, the service): the question stem guessed from
    the text of a clinqa prompt (cloze, letter or generate format; other text as it is). Text before
    the stem or inside it that looks like scaffolding ("Question: ", "A. ...", "Answer:") fools it."""
    text = prompt.split(GENERATE_INSTRUCTION, 1)[-1]
    if "Question: " in text:
        text = text.rsplit("Question: ", 1)[1]
    stem = []
    for line in text.strip().split("\n"):
        if _OPTION_LINE.match(line) or line.startswith("Answer:"):
            break
        if not (line.startswith("Context: ") and not stem):
            stem.append(line)
    return "\n".join(stem).strip() or prompt.strip()


class Router:
    """Pick a category for each text, or None when the classifier is not confident enough.

    `C=None` chooses the regularisation by stratified 5-fold CV on the training texts (small data
    wants strong regularisation, and the best strength differs between feature sets). Abstaining:
    a fixed probability `threshold`, or (threshold=None) one set at fit so that about `coverage` of
    the training texts are routed, judged on out-of-fold probabilities -- a probability cut alone
    means little, since it moves with C.
    """

    def __init__(
        self,
        mode: str = "embed",
        *,
        threshold: float | None = None,
        coverage: float = 0.9,
        layer: int | None = None,
        predictor: Any = None,
        C: float | None = None,
        seed: int = 0,
    ):
        if mode not in MODES:
            raise ClinqaError(f"unknown router mode {mode!r}: use one of {', '.join(MODES)}")
        if "hidden" in mode and (predictor is None or layer is None):
            raise ClinqaError("a hidden-state router needs the model (predictor=) and a layer")
        if not 0 < coverage <= 1:
            raise ClinqaError(f"coverage must be in (0, 1], got {coverage}")
        self.mode, self.layer, self.predictor, self.C, self.coverage, self.seed = (
            mode,
            layer,
            predictor,
            C,
            coverage,
            seed,
        )
        self.threshold = None if threshold is None else float(threshold)
        self.fixed_threshold = threshold is not None
        self.classes: list[str] = []
        self.coef = self.intercept = self.mean = self.scale = None
        self.C_used: float | None = C
        self.metrics: dict[str, Any] = {}  # held-out routing_accuracy, coverage, routed_accuracy, confusion, ...
        self.model: dict[str, str] = {}  # hidden modes: the model the features come from
        self._dims: list[int] = []

    @property
    def routing_accuracy(self) -> float | None:
        return self.metrics.get("routing_accuracy")

    def features(self, texts: Sequence[str]) -> np.ndarray:
        """MiniLM embeddings and/or the mean hidden state at `layer`, side by side."""
        blocks = []
        if "embed" in self.mode:
            from clinqa.models.embed import embed_texts

            blocks.append(embed_texts(list(texts)).astype(np.float64))
        if "hidden" in self.mode:
            states = self.predictor.hidden_states(list(texts), [self.layer])
            blocks.append(np.stack([s[0].mean(0) for s in states]).astype(np.float64))
        self._dims = [b.shape[1] for b in blocks]
        return np.hstack(blocks)

    def _train(self, X: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, ...]:
        """(coef, intercept, mean, scale). Features are z-scored, and each block of a concatenation
        scaled to the same total variance so the wider one does not dominate."""
        from sklearn.linear_model import LogisticRegression

        weight = np.concatenate([np.full(d, np.sqrt(len(self._dims) * d / sum(self._dims))) for d in self._dims])
        mean, scale = X.mean(0), (X.std(0) + 1e-6) * weight
        clf = LogisticRegression(C=C, max_iter=3000, random_state=self.seed).fit((X - mean) / scale, y)
        return clf.coef_, clf.intercept_, mean, scale

    @staticmethod
    def _proba_of(params: tuple[np.ndarray, ...], X: np.ndarray) -> np.ndarray:
        coef, intercept, mean, scale = params
        z = ((X - mean) / scale) @ coef.T + intercept
        if z.shape[1] == 1:  # binary logistic regression: one column for the second class
            p = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1 - p, p], axis=1)
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def _proba(self, X: np.ndarray) -> np.ndarray:
        return self._proba_of((self.coef, self.intercept, self.mean, self.scale), X)

    def _out_of_fold(self, X: np.ndarray, y: np.ndarray, C: float) -> np.ndarray:
        """Probabilities for each training text from a model fitted without its fold (stratified k-fold)."""
        from sklearn.model_selection import StratifiedKFold

        P = np.zeros((len(y), len(self.classes)))
        folds = StratifiedKFold(min(CV_FOLDS, int(np.bincount(y).min())), shuffle=True, random_state=self.seed)
        for tr, te in folds.split(X, y):
            P[te] = self._proba_of(self._train(X[tr], y[tr], C), X[te])
        return P

    @property
    def _min_per_class(self) -> int:
        """Texts each category needs: 2 when C or the threshold come from cross-validation."""
        return 2 if self.C is None or not self.fixed_threshold else 1

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        cv = self._min_per_class == 2
        if np.bincount(y, minlength=len(self.classes)).min() < self._min_per_class:
            raise ClinqaError(
                "choosing C or the threshold by cross-validation needs 2+ texts per category: pass C= and threshold="
            )
        oof = {C: self._out_of_fold(X, y, C) for C in ((self.C,) if self.C is not None else C_GRID)} if cv else {}
        self.C_used = self.C if self.C is not None else max(oof, key=lambda c: (oof[c].argmax(1) == y).mean())
        if not self.fixed_threshold:  # the top probability that about `coverage` of the texts reach
            conf = np.sort(oof[self.C_used].max(1))[::-1]
            self.threshold = float(conf[max(0, int(np.ceil(self.coverage * len(conf))) - 1)])
        self.coef, self.intercept, self.mean, self.scale = self._train(X, y, self.C_used)

    def _decide(self, P: np.ndarray) -> list[str | None]:
        best = P.argmax(1)
        return [self.classes[b] if P[i, b] >= self.threshold else None for i, b in enumerate(best)]

    def fit(self, texts: Sequence[str], labels: Sequence[str], *, holdout: float = 0.25) -> Router:
        """Fit on (text, category) examples. With `holdout` > 0, first fit on a seeded stratified
        split (C and threshold chosen inside it) and store held-out metrics in `metrics`, then
        refit on everything."""
        started = time.perf_counter()
        labels = [str(x) for x in labels]
        if len(texts) != len(labels):
            raise ClinqaError(f"{len(texts)} texts but {len(labels)} labels")
        self.classes = sorted(set(labels))
        if len(self.classes) < 2:
            raise ClinqaError(f"a router needs at least 2 categories, got {self.classes}")
        X = self.features(texts)
        y = np.array([self.classes.index(x) for x in labels])
        rng = np.random.default_rng(self.seed)
        test = np.zeros(len(y), dtype=bool)
        if holdout > 0:
            for c in range(len(self.classes)):
                idx = rng.permutation(np.flatnonzero(y == c))
                if len(idx) >= 2:
                    test[idx[: max(1, int(round(len(idx) * holdout)))]] = True
        if test.any() and np.bincount(y[~test], minlength=len(self.classes)).min() >= self._min_per_class:
            self._fit(X[~test], y[~test])
            self.metrics = {**self._score(X[test], y[test]), "n_train": int((~test).sum())}
        else:
            self.metrics = {"routing_accuracy": None, "n_test": 0, "n_train": len(y)}
        self._fit(X, y)
        self.metrics["fit_seconds"] = round(time.perf_counter() - started, 3)
        if "hidden" in self.mode:
            self.model = {"name": self.predictor.info.name, "sha256": weights_hash(self.predictor)}
        return self

    def _score(self, X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        P = self._proba(X)
        hit = P.argmax(1) == y
        conf = P.max(1)
        covered = conf >= self.threshold
        ranked = hit[np.argsort(-conf, kind="stable")]
        return {
            "routing_accuracy": float(hit.mean()),
            "coverage": float(covered.mean()),
            "routed_accuracy": float(hit[covered].mean()) if covered.any() else None,
            "n_test": int(len(y)),
            "accuracy_at_coverage": {
                str(c): float(ranked[: max(1, int(round(c * len(y))))].mean()) for c in (1.0, 0.9, 0.75, 0.5)
            },
            "confusion": np.bincount(y * len(self.classes) + P.argmax(1), minlength=len(self.classes) ** 2)
            .reshape(len(self.classes), -1)
            .tolist(),
            "C": self.C_used,
            "threshold": self.threshold,
        }

    def evaluate(self, texts: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
        """Accuracy of the top choice, share routed (above threshold), accuracy among routed, accuracy
        of the most confident shares, and the confusion matrix (rows: true category, in `classes` order)."""
        unknown = set(labels) - set(self.classes)
        if unknown:
            raise ClinqaError(f"labels {sorted(unknown)} are not router categories {self.classes}")
        return self._score(self.features(texts), np.array([self.classes.index(x) for x in labels]))

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        if self.coef is None:
            raise ClinqaError("the router is not fitted")
        return self._proba(self.features(texts)) if len(texts) else np.zeros((0, len(self.classes)))

    def route(self, texts: Sequence[str]) -> list[str | None]:
        return self._decide(self.probabilities(texts))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        from clinqa.models.embed import embedding_model_name

        doc = {
            "format": ROUTER_FORMAT,
            "version": 1,
            "mode": self.mode,
            "threshold": self.threshold,
            "layer": self.layer,
            "coverage": None if self.fixed_threshold else self.coverage,
            "embedding_model": embedding_model_name() if "embed" in self.mode else None,
            "model": self.model,
            "C": self.C_used,
            "C_by_cv": self.C is None,
            "seed": self.seed,
            "classes": self.classes,
            "coef": np.asarray(self.coef).tolist(),
            "intercept": np.asarray(self.intercept).tolist(),
            "mean": np.asarray(self.mean).tolist(),
            "scale": np.asarray(self.scale).tolist(),
            "metrics": self.metrics,
        }
        (path / "router.json").write_text(json.dumps(doc) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, predictor: Any = None) -> Router:
        path = Path(path)
        file = path if path.suffix == ".json" else path / "router.json"
        if not file.is_file():
            raise ClinqaError(f"no router at {file}")
        doc = json.loads(file.read_text())
        if doc.get("format") != ROUTER_FORMAT:
            raise ClinqaError(f"{file} is not a clinqa steering router")
        if "hidden" in doc["mode"] and predictor is None:
            raise ClinqaError(f"{file} routes on hidden states: load it with the model (predictor=)")
        r = cls(
            doc["mode"],
            threshold=doc["threshold"],
            layer=doc["layer"],
            predictor=predictor,
            C=doc["C"],
            seed=doc["seed"],
        )
        r.classes, r.metrics, r.model = doc["classes"], doc["metrics"], doc.get("model") or {}
        r.coef, r.intercept = np.array(doc["coef"], dtype=np.float64), np.array(doc["intercept"], dtype=np.float64)
        r.mean, r.scale = np.array(doc["mean"], dtype=np.float64), np.array(doc["scale"], dtype=np.float64)
        return r


def category_of(q: Question, by: str) -> str | None:
    """`by="specialty"`: the first specialty; otherwise the question's meta[by] (None if absent)."""
    if by == "specialty":
        return q.specialties[0] if q.specialties else None
    value = q.meta.get(by)
    return None if value is None or value == "" else str(value)


def _folder(category: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", category).strip("._") or "category"


def build_category_vectors(
    predictor: Any,
    questions: Sequence[Question],
    by: str,
    config: SteeringConfig | None,
    out_dir: str | Path,
    progress: Progress | None = None,
    *,
    router: dict[str, Any] | None = None,
    min_questions: int = 4,
    holdout: float = 0.25,
    data: str | None = None,
) -> dict[str, Any]:
    """One steering vector per category (questions grouped by `by`) plus a router; returns the index
    written to `out_dir/vectors.json`. Categories with fewer than `min_questions` are skipped.
    `router`: Router keyword arguments (mode, layer, C, threshold, coverage); a hidden-state router
    reads the last steering layer unless told otherwise."""
    config = config or SteeringConfig()
    out = Path(out_dir)
    groups: dict[str, list[Question]] = {}
    for q in questions:
        cat = category_of(q, by)
        if cat is not None:
            groups.setdefault(cat, []).append(q)
    kept = {c: qs for c, qs in sorted(groups.items()) if len(qs) >= min_questions}
    skipped = {c: len(qs) for c, qs in groups.items() if c not in kept}
    if len(kept) < 2:
        raise ClinqaError(
            f"need at least 2 categories with {min_questions}+ questions by {by!r}; got "
            f"{ {c: len(qs) for c, qs in groups.items()} }"
        )
    folders = {c: _folder(c) for c in kept}
    if len(set(folders.values())) < len(folders):
        raise ClinqaError(f"category names collide as folder names: {folders}")
    sizes = {c: 2 * min(len(qs), config.max_pairs or len(qs)) for c, qs in kept.items()}
    total, offset = sum(sizes.values()), 0
    entries = {}
    for cat, qs in kept.items():

        def step(done: int, _total: int, base: int = offset) -> None:
            if progress:
                progress(base + done, total)

        vec = build_steering_vector(predictor, qs, config, progress=step, name=folders[cat], category=cat, data=data)
        vec.save(out / folders[cat])
        offset += sizes[cat]
        entries[cat] = {
            "path": folders[cat],
            "n_questions": len(qs),
            "n_pairs": vec.n_pairs,
            "layers": vec.layers,
            "best_layer": vec.best_layer,
            "probe_accuracy": {str(k): v for k, v in vec.probe_accuracy.items()},
        }
    from clinqa.specialties.embed import question_text

    options = {"mode": "embed", "seed": config.seed, **(router or {})}
    if "hidden" in options["mode"] and options.get("layer") is None:
        options["layer"] = resolve_layers(predictor, config.layers)[-1]
    routing = Router(predictor=predictor, **options)
    texts = [question_text(q) for qs in kept.values() for q in qs]
    routing.fit(texts, [c for c, qs in kept.items() for _ in qs], holdout=holdout)
    routing.save(out / "router")
    index = {
        "format": INDEX_FORMAT,
        "version": 1,
        "by": by,
        "data": data,
        "model": {"name": vec.model_name, "sha256": vec.model_hash},
        "config": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in asdict(config).items()},
        "categories": entries,
        "skipped": skipped,
        "router": {
            "path": "router",
            "mode": routing.mode,
            "layer": routing.layer,
            **routing.metrics,
            "C": routing.C_used,
            "threshold": routing.threshold,
        },
    }
    (out / "vectors.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def load_category_vectors(path: str | Path, predictor: Any = None) -> tuple[dict[str, SteeringVector], Router]:
    """The vectors ({category: vector}) and router of a folder written by build_category_vectors."""
    path = Path(path)
    index_file = path / "vectors.json"
    if not index_file.is_file():
        raise ClinqaError(f"{path} has no vectors.json: build it with clinqa.adapt.router.build_category_vectors")
    index = json.loads(index_file.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ClinqaError(f"{index_file} is not a clinqa category-vector index")
    vectors = {}
    for cat, entry in index["categories"].items():
        vec = SteeringVector.load(path / entry["path"])
        vec.name = f"{path.name}/{entry['path']}"
        vectors[cat] = vec
    return vectors, Router.load(path / index["router"]["path"], predictor=predictor)


__all__ = [
    "MODES",
    "Router",
    "build_category_vectors",
    "category_of",
    "load_category_vectors",
    "question_from_prompt",
    "question_from_text",
]
