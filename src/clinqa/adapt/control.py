"""Applying steering vectors (repeng's ControlModel): the value type and its extraction are in
`clinqa.adapt.steering`; the per-category router in `clinqa.adapt.router`. One way: this module
imports both, neither imports it.

`steer` installs plain torch forward hooks on the chosen blocks that add `alpha * std *
unit_direction` to the block output, only at answer-side positions (those at or after
`STEER_START`, which LocalModel sets around every forward), so the question prefix and left padding
are never touched. `SteeredPredictor` wraps a LocalModel in the Predictor protocol (one vector, or
one per category with a router); `apply_modifier` reads `+steer:FOLDER@alpha=2,layer=20` specs;
`sweep` scores a grid of (layer, alpha) against the unsteered model, with flip rates.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel

from clinqa.adapt.steering import SteeringVector, _block_output, _require_local, weights_hash
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.models.base import ContinuationScore, GenerationConfig, ModelInfo, ReportsCost
from clinqa.models.local import STEER_START, LocalModel
from clinqa.runs import Progress, atomic_write_text

# --------------------------------------------------------------------------- application

# The steering handles active in the current context (thread/task): a hook whose key is absent
# passes its input through, so a model shared across threads is only steered where steer() runs.
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("clinqa_steer_active", default=frozenset())


def _steering_hook(key: object, delta: torch.Tensor):
    def hook(_module, _args, output):
        if key not in _ACTIVE.get():
            return None
        hidden = _block_output(output)
        vec = (
            delta
            if (delta.dtype, delta.device) == (hidden.dtype, hidden.device)
            else delta.to(hidden.device, hidden.dtype)
        )
        start = STEER_START.get()
        if start is None or hidden.shape[1] == 1:  # no window known / a cached decode step: all answer side
            steered = hidden + vec
        else:
            answer_side = torch.arange(hidden.shape[1], device=hidden.device) >= start.to(hidden.device).view(-1, 1)
            steered = hidden + answer_side.unsqueeze(-1).to(hidden.dtype) * vec
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return hook


def check_compatible(model: LocalModel, vector: SteeringVector) -> None:
    hidden = int(model.model.config.hidden_size)
    if hidden != vector.hidden_size:
        raise ClinqaError(
            f"steering vector {vector.name!r} was built on {vector.model_name} (hidden size "
            f"{vector.hidden_size}); this model has hidden size {hidden}"
        )
    if weights_hash(model) != vector.model_hash:
        warnings.warn(
            f"steering vector {vector.name!r} was built on {vector.model_name} with different weights; "
            "its directions may not mean the same here",
            stacklevel=2,
        )


@contextmanager
def steer(
    model: LocalModel, vector: SteeringVector, alpha: float = 1.0, *, layers: Sequence[int] | None = None
) -> Iterator[None]:
    """Within the block, forwards of `model` add `alpha * std * direction` to the output of each
    steered block at answer-side positions (>= STEER_START per row; every position of a cached
    decode step; every position when no window is set). Hooks are removed on exit, errors included."""
    use = vector.layers if layers is None else [int(x) for x in layers]
    missing = [x for x in use if x not in vector.directions]
    if missing:
        raise ClinqaError(f"layer(s) {missing} not in steering vector {vector.name!r} (it has {vector.layers})")
    if max(use, default=1) > len(model.layers):
        raise ClinqaError(
            f"steering vector {vector.name!r} uses layer {max(use)}; this model has {len(model.layers)} layers"
        )
    key = object()
    handles = []
    try:
        for layer in use:
            handles.append(
                model.layers[layer - 1].register_forward_hook(_steering_hook(key, vector.delta(layer, alpha)))
            )
        token = _ACTIVE.set(_ACTIVE.get() | {key})
        try:
            yield
        finally:
            _ACTIVE.reset(token)
    finally:
        for h in handles:
            h.remove()


class SteeredPredictor:
    """A LocalModel answering under a steering vector (or, with a router, one vector per question).

    `vectors` is one SteeringVector, or {category: vector} with a `router` that maps each prompt's
    question to a category or None (None = unsteered): the question stem a structured prompt
    carries (clinqa.models.request.Prompt), else the one parsed from plain text. `hidden_states` is
    always unsteered.

    Capabilities of its own: Annotates (vector and route per prompt), ReportsCost (the base's plus
    the directions and router), Encodes and HasTokenizer (the local model's).
    """

    def __init__(
        self,
        model: LocalModel,
        vectors: SteeringVector | Mapping[str, SteeringVector],
        *,
        alpha: float = 1.0,
        layer: int | None = None,
        router: Any = None,
        spec: str | None = None,
    ):
        self.base = _require_local(model)
        self.routed = not isinstance(vectors, SteeringVector)
        self.vectors: dict[str | None, SteeringVector] = dict(vectors) if self.routed else {None: vectors}  # type: ignore[arg-type, dict-item]
        if self.routed and router is None:
            raise ClinqaError("per-category steering vectors need a router")
        self.router, self.alpha = router, float(alpha)
        self.steer_layers = None if layer is None else [int(layer)]
        for vec in self.vectors.values():
            check_compatible(self.base, vec)
            if layer is not None and int(layer) not in vec.directions:
                raise ClinqaError(f"layer={layer} is not stored in steering vector {vec.name!r} (it has {vec.layers})")
        self._routes: dict[str, str | None] = {}
        about = {
            "vectors": sorted({vec.name for vec in self.vectors.values()}),
            "alpha": self.alpha,
            "layers": self.steer_layers,
            "routed": self.routed,
        }
        self.info = ModelInfo(
            **{
                **self.base.info.__dict__,
                "spec": spec or f"{self.base.info.spec}+steer",
                "extra": {**self.base.info.extra, "steer": about},
            }
        )

    # routing
    def route(self, prompts: Sequence[str]) -> list[str | None]:
        """The vector key for each prompt (None: unsteered); routing results are cached per prompt."""
        if not self.routed:
            return [None] * len(prompts)
        from clinqa.adapt.router import question_from_prompt

        todo = list(dict.fromkeys(p for p in prompts if p not in self._routes))
        if todo:
            if len(self._routes) > 4096:
                self._routes.clear()
            for p, cat in zip(todo, self.router.route([question_from_prompt(p) for p in todo])):
                self._routes[p] = cat if cat in self.vectors else None
        return [self._routes[p] for p in prompts]

    def _split(self, prompts: Sequence[str], run: Callable[[list[int]], list]) -> list:
        """Run `run(indices)` once per chosen vector (under its hooks) and reassemble in order."""
        keys = self.route(prompts)
        out: list = [None] * len(prompts)
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            unsteered = self.routed and key is None
            scope = (
                nullcontext()
                if unsteered
                else steer(self.base, self.vectors[key], self.alpha, layers=self.steer_layers)
            )
            with scope:
                for i, r in zip(idx, run(idx)):
                    out[i] = r
        return out

    def cost(self) -> dict:
        """For `compare`: the directions applied plus the router's weights as extra parameters, and the
        seconds it took to build them (added to whatever the wrapped model, e.g. a LoRA view, reports)."""
        inner = self.base.cost() if isinstance(self.base, ReportsCost) else {}
        cost = {"extra_params": 0, "training_s": 0.0, **inner}
        vectors = list(self.vectors.values())
        cost["extra_params"] += sum(
            v.directions[layer].numel() for v in vectors for layer in (self.steer_layers or v.layers)
        )
        cost["training_s"] += sum(float(v.provenance.get("build_seconds") or 0.0) for v in vectors)
        if self.router is not None:
            cost["extra_params"] += int(np.size(self.router.coef) + np.size(self.router.intercept))
            cost["training_s"] += float(self.router.metrics.get("fit_seconds") or 0.0)
        return cost

    # Predictor protocol
    def score_continuations(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[ContinuationScore]]:
        return self._split(
            [ctx for ctx, _ in groups], lambda idx: self.base.score_continuations([groups[i] for i in idx])
        )

    def next_token_logprobs(self, contexts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        rows = self._split(
            list(contexts), lambda idx: list(self.base.next_token_logprobs([contexts[i] for i in idx], candidates))
        )
        return np.stack(rows) if rows else np.zeros((0, len(candidates)), dtype=np.float64)

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
        return self._split(list(prompts), lambda idx: self.base.generate([prompts[i] for i in idx], config))

    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[np.ndarray]:
        return self.base.hidden_states(texts, layers)

    def annotations(self, prompt: str) -> dict:
        key = self.route([prompt])[0]
        vec = None if self.routed and key is None else self.vectors[key]
        return {"steer": {"vector": vec.name if vec else None, "alpha": self.alpha, "routed_to": key}}

    @property
    def tokenizer(self):
        return self.base.tokenizer

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)


def _param(params: dict[str, str], key: str, kind: type, default: Any, spec: str) -> Any:
    if key not in params:
        return default
    try:
        return kind(params.pop(key))
    except ValueError:
        raise ClinqaError(f"bad {key} in {spec!r}: expected a {kind.__name__}, e.g. @alpha=2,layer=20") from None


def apply_modifier(predictor: Any, modifier: Any) -> SteeredPredictor:
    """`+steer:FOLDER@alpha=A,layer=L[,threshold=T]`: FOLDER is one vector (vector.json) or a
    category folder (vectors.json + router/) whose router picks a vector per question."""
    spec = str(modifier)
    params = dict(modifier.params)
    alpha = _param(params, "alpha", float, 1.0, spec)
    layer = _param(params, "layer", int, None, spec)
    threshold = _param(params, "threshold", float, None, spec)
    if params:
        raise ClinqaError(f"unknown steer parameter(s) {', '.join(params)} in {spec!r}: use alpha, layer, threshold")
    model = _require_local(predictor)
    path = Path(modifier.target).expanduser()
    full = f"{predictor.info.spec}+{spec}"
    if (path / "vectors.json").is_file():
        from clinqa.adapt.router import load_category_vectors

        vectors, router = load_category_vectors(path, predictor=model)
        if threshold is not None:
            router.threshold = threshold
        return SteeredPredictor(model, vectors, alpha=alpha, layer=layer, router=router, spec=full)
    if (path / "vector.json").is_file():
        if threshold is not None:
            raise ClinqaError(f"threshold applies to a category folder (vectors.json), not the single vector {path}")
        return SteeredPredictor(model, SteeringVector.load(path), alpha=alpha, layer=layer, spec=full)
    raise ClinqaError(
        f"{path} is neither a steering vector folder (vector.json) nor a category folder (vectors.json): "
        "build one with clinqa.adapt.steering.build_steering_vector(...).save(path) "
        "or clinqa.adapt.router.build_category_vectors"
    )


# --------------------------------------------------------------------------- sweep


@dataclass
class SweepResult:
    base_accuracy: float
    n: int  # samples (questions x shuffles)
    rows: list[dict[str, Any]]  # layer, alpha, accuracy, wrong_to_right, right_to_wrong, n

    def accuracy(self, layer: int, alpha: float) -> float:
        return next(r["accuracy"] for r in self.rows if r["layer"] == layer and r["alpha"] == alpha)

    def best(self) -> dict[str, Any]:
        return max(self.rows, key=lambda r: (r["accuracy"], -abs(r["alpha"])))

    def markdown(self) -> str:
        """The grid as a table; p is McNemar's exact test against the unsteered answers (uncorrected for
        the number of cells, so expect about one cell in twenty below 0.05 by chance)."""
        from scipy.stats import binomtest

        lines = [
            f"Unsteered accuracy {self.base_accuracy:.3f} (n={self.n})",
            "",
            "| layer | alpha | accuracy | Δ | wrong→right | right→wrong | p |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            gained, lost = round(r["wrong_to_right"] * r["n"]), round(r["right_to_wrong"] * r["n"])
            p = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
            lines.append(
                f"| {r['layer']} | {r['alpha']:g} | {r['accuracy']:.3f} | {r['accuracy'] - self.base_accuracy:+.3f} "
                f"| {r['wrong_to_right']:.3f} | {r['right_to_wrong']:.3f} | {p:.2f} |"
            )
        return "\n".join(lines) + "\n"


_SWEEP_FIELDS = ["layer", "alpha", "accuracy", "wrong_to_right", "right_to_wrong", "n"]


def _heatmap(result: SweepResult, layers: Sequence[int], alphas: Sequence[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[result.accuracy(layer, a) for a in alphas] for layer in layers])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(alphas), 1.2 + 0.45 * len(layers)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("alpha (activation stds)")
    ax.set_ylabel("layer")
    ax.set_title(f"accuracy (unsteered {result.base_accuracy:.3f})")
    for i in range(len(layers)):
        for j in range(len(alphas)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(
    predictor: Any,
    questions: Sequence[Question],
    vector: SteeringVector,
    layers: Sequence[int],
    alphas: Sequence[float],
    *,
    method: str = "option",
    shuffles: int = 1,
    seed: int = 0,
    out: str | Path | None = None,
    progress: Progress | None = None,
) -> SweepResult:
    """Accuracy for every (layer, alpha) against the unsteered model, with per-sample flip rates.

    With `out`, a run folder (clinqa.runs): the unsteered answers in run.json, each finished cell
    appended to sweep.jsonl (a rerun skips them; another vector, model, method or question set is
    refused, a second writer is locked out), and sweep.csv, sweep.json, sweep.md and sweep.png
    (heatmap) written at the end.
    """
    from clinqa.evaluate.methods import SCORERS, make_items

    model = _require_local(predictor)
    if method not in SCORERS:
        raise ClinqaError(f"unknown method {method!r}: use one of {', '.join(SCORERS)}")
    layers, alphas = [int(x) for x in layers], [float(a) for a in alphas]
    items = make_items(questions, shuffles, seed)
    score = lambda p: np.array([s.correct for s in SCORERS[method](p, items, seed=seed)])  # noqa: E731
    grid = [(layer, a) for layer in layers for a in alphas]
    if out is None:
        return _sweep_grid(model, vector, grid, score(model), score, {}, None, progress, len(items))
    from clinqa.evaluate.runs import questions_fingerprint
    from clinqa.runs import RunFolder

    out = Path(out)
    if (out / "sweep.json").is_file() and not (out / "run.json").is_file():
        raise ClinqaError(
            f"{out} holds a sweep written by an older clinqa (sweep.json, no run.json): move it aside or "
            "delete it and re-run to redo the sweep in the current format (its rows stay in sweep.csv)"
        )
    directions = b"".join(vector.directions[x].numpy().tobytes() for x in vector.layers)
    key = {
        "vector": vector.name,
        "model_sha256": vector.model_hash,
        "method": method,
        "shuffles": shuffles,
        "seed": seed,
        "directions_sha256": hashlib.sha256(directions).hexdigest(),
    }
    with RunFolder.open(
        out,
        key,
        kind="steer-sweep",
        sample_type=SweepRow,
        samples_file="sweep.jsonl",
        data=questions_fingerprint(questions),
        data_may_grow=False,
    ) as run:
        if run.meta.get("base") is None:
            run.meta["base"] = score(model).tolist()
            run.save_meta()
        base = np.array(run.meta["base"], dtype=bool)
        done = {(r.layer, r.alpha): r.model_dump() for r in run.samples()}
        result = _sweep_grid(model, vector, grid, base, score, done, run, progress, len(items))
        atomic_write_text(
            out / "sweep.csv",
            ",".join(_SWEEP_FIELDS)
            + "\n"
            + "".join(",".join(str(r[c]) for c in _SWEEP_FIELDS) + "\n" for r in result.rows),
        )
        atomic_write_text(
            out / "sweep.json",
            json.dumps(
                {"config": key, "base_accuracy": result.base_accuracy, "n": result.n, "rows": result.rows}, indent=1
            )
            + "\n",
        )
        (out / "sweep.md").write_text(result.markdown())
        _heatmap(result, layers, alphas, out / "sweep.png")
        run.finish(rows=len(result.rows))
    return result


class SweepRow(BaseModel):
    """One finished (layer, alpha) cell of a sweep: a line of sweep.jsonl (sweep.csv is written from them)."""

    layer: int
    alpha: float
    accuracy: float
    wrong_to_right: float
    right_to_wrong: float
    n: int


def _sweep_grid(model, vector, grid, base, score, done, run, progress, n) -> SweepResult:
    rows = []
    for k, (layer, alpha) in enumerate(grid):
        if (layer, alpha) not in done:
            # alpha = 0 is exactly the unsteered model
            hit = base if alpha == 0 else score(SteeredPredictor(model, vector, alpha=alpha, layer=layer))
            row = SweepRow(
                layer=layer,
                alpha=alpha,
                accuracy=float(hit.mean()),
                wrong_to_right=float((~base & hit).mean()),
                right_to_wrong=float((base & ~hit).mean()),
                n=len(hit),
            )
            done[(layer, alpha)] = row.model_dump()
            if run is not None:
                run.append([row])
        rows.append(done[(layer, alpha)])
        if progress:
            progress(k + 1, len(grid))
    return SweepResult(base_accuracy=float(base.mean()), n=n, rows=rows)


__all__ = ["SteeredPredictor", "SweepResult", "SweepRow", "apply_modifier", "check_compatible", "steer", "sweep"]
