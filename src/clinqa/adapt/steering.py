"""Steering vectors: a direction in the residual stream, added while the model answers.

In the spirit of repeng, in three parts:

1. Extraction (`build_steering_vector`). For each labelled question, two teacher-forced texts:
   the cloze prompt followed by the correct option, and by a (seeded) incorrect one. We read the
   decoder-block outputs at the answer's last token (or the mean over the answer span) and reduce
   the per-pair differences to one direction per layer: their mean (default), their first
   principal component, or a logistic-regression probe's weights.
2. The vector (`SteeringVector`): a unit direction per layer plus what is needed to use it well:
   the std of activations along it (the unit of `alpha`), held-out probe accuracy (to pick a
   layer), the model it came from (name + weight fingerprint), and provenance. Saved as
   `vector.safetensors` + `vector.json`; exportable as a llama.cpp control vector (GGUF).
3. Application (`steer`): plain torch forward hooks on the chosen blocks add
   `alpha * std * unit_direction` to the block output, only at answer-side positions (those at or
   after `STEER_START`, which LocalModel sets around every forward), so the question prefix and
   left padding are never touched. `SteeredPredictor` wraps a LocalModel in the Predictor
   protocol; `apply_modifier` reads `+steer:FOLDER@alpha=2,layer=20` specs.

Layer numbering is the hidden-state one used everywhere in clinqa (Hugging Face's): layer 0 is the
embeddings, layer L (1..n_layers) is the output of decoder block L (1-based, `model.layers[L-1]`).
Steering at layer 0 is not supported. Note that Hugging Face's `hidden_states[n_layers]` is taken
after the final norm; we always read (and steer) the block output itself.

`sweep` scores a grid of (layer, alpha) against the unsteered model, with flip rates.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import hashlib
import json
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate.prompts import cloze_prompt
from clinqa.models.base import ContinuationScore, GenerationConfig, ModelInfo
from clinqa.models.local import STEER_START, LocalModel, length_batches
from clinqa.runs import Progress, atomic_write_text

FORMAT = "clinqa.steering_vector"
FORMAT_VERSION = 1
POSITIONS = ("answer_last", "answer_mean")
AGGREGATORS = ("mean_diff", "pca", "probe")


# --------------------------------------------------------------------------- extraction


@dataclass
class SteeringConfig:
    layers: Sequence[int] | None = None  # hidden-state layers (1..n_layers); None = the penultimate one
    position: str = "answer_last"  # answer_last | answer_mean
    aggregator: str = "mean_diff"  # mean_diff | pca | probe
    max_pairs: int | None = None  # use at most this many questions (a seeded sample)
    seed: int = 0  # picks the wrong option per question, the max_pairs sample and the probe split

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ClinqaError(f"unknown position {self.position!r}: use one of {', '.join(POSITIONS)}")
        if self.aggregator not in AGGREGATORS:
            raise ClinqaError(f"unknown aggregator {self.aggregator!r}: use one of {', '.join(AGGREGATORS)}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ClinqaError(f"max_pairs must be at least 1, got {self.max_pairs}")


def _require_local(predictor: Any) -> LocalModel:
    if not all(hasattr(predictor, a) for a in ("layers", "model", "encode_pair")):
        backend = getattr(getattr(predictor, "info", None), "backend", type(predictor).__name__)
        raise ClinqaError(f"steering needs a local transformers model (hidden states and hooks); got {backend}. "
                          "Put +steer: right after the base model (or its +lora:), e.g. default+steer:vectors/NAME")
    return predictor


def resolve_layers(model: LocalModel, layers: Sequence[int] | None) -> list[int]:
    n = int(model.info.n_layers or len(model.layers))
    if layers is None:
        return [max(1, n - 1)]
    out = sorted({int(layer) for layer in layers})
    bad = [layer for layer in out if not 1 <= layer <= n]
    if bad or not out:
        raise ClinqaError(f"steering layers must be in 1..{n} (layer L = output of block L); got {list(layers)}")
    return out


def contrastive_pairs(questions: Sequence[Question], config: SteeringConfig) -> list[tuple[str, str, str]]:
    """(prompt, correct option, incorrect option) per question; the wrong option and the
    `max_pairs` sample are drawn with `config.seed`, so the pairs are reproducible."""
    rng = np.random.default_rng(config.seed)
    pairs = []
    for q in questions:
        wrong = [v for k, v in q.options.items() if k != q.answer]
        pairs.append((cloze_prompt(q), q.options[q.answer], wrong[int(rng.integers(len(wrong)))]))
    if config.max_pairs is not None and len(pairs) > config.max_pairs:
        keep = np.sort(np.random.default_rng(config.seed).permutation(len(pairs))[: config.max_pairs])
        pairs = [pairs[i] for i in keep]
    return pairs


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def answer_activations(model: LocalModel, texts: Sequence[tuple[str, str]], layers: Sequence[int],
                       position: str = "answer_last", progress: Progress | None = None) -> dict[int, np.ndarray]:
    """Block outputs at the answer of each teacher-forced (prompt, answer) text: {layer: [n, hidden]}."""
    encoded = []
    for prompt, answer in texts:
        ctx, cont = model.encode_pair(prompt, " " + answer)
        ids = (ctx + cont)[-model.max_length:]
        encoded.append((ids, len(ids) - len(cont)))
    out = {layer: np.zeros((len(texts), model.model.config.hidden_size), dtype=np.float64) for layer in layers}
    captured: dict[int, torch.Tensor] = {}
    hooks = [model.layers[layer - 1].register_forward_hook(
        lambda _m, _a, o, layer=layer: captured.__setitem__(layer, _block_output(o))) for layer in layers]
    scope = model._adapter_scope() if hasattr(model, "_adapter_scope") else nullcontext()
    done = 0
    try:
        with scope:
            for batch in length_batches([len(ids) for ids, _ in encoded]):
                width = len(encoded[batch[0]][0])
                ids = torch.full((len(batch), width), model.pad_id, dtype=torch.long)
                for row, i in enumerate(batch):  # right padding: causal attention keeps pads invisible
                    ids[row, : len(encoded[i][0])] = torch.tensor(encoded[i][0])
                model._decoder(input_ids=ids.to(getattr(model, "device", ids.device)), use_cache=False)
                for row, i in enumerate(batch):
                    start, end = encoded[i][1], len(encoded[i][0])
                    for layer in layers:
                        h = captured[layer][row].float().cpu()
                        out[layer][i] = (h[end - 1] if position == "answer_last" else h[start:end].mean(0)).numpy()
                done += len(batch)
                if progress:
                    progress(done, len(texts))
    finally:
        for h in hooks:
            h.remove()
    return out


def _probe(X: np.ndarray, y: np.ndarray, seed: int):
    """Logistic regression on standardised features; returns (predict, direction in raw space)."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = X.mean(0), X.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit((X - mu) / sd, y)
    return (lambda Z: clf.predict((Z - mu) / sd)), clf.coef_[0] / sd


def probe_accuracy(pos: np.ndarray, neg: np.ndarray, seed: int = 0, test_share: float = 0.25) -> float | None:
    """Held-out accuracy of a probe telling right from wrong answers; pairs are split (seeded)
    so both texts of a question land on the same side. None with fewer than 4 pairs."""
    n = len(pos)
    if n < 4:
        return None
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_share)))
    test, train = perm[:n_test], perm[n_test:]
    X = np.concatenate([pos[train], neg[train]])
    y = np.r_[np.ones(len(train)), np.zeros(len(train))]
    predict, _ = _probe(X, y, seed)
    Xt = np.concatenate([pos[test], neg[test]])
    yt = np.r_[np.ones(len(test)), np.zeros(len(test))]
    return float((predict(Xt) == yt).mean())


def aggregate(pos: np.ndarray, neg: np.ndarray, aggregator: str = "mean_diff", seed: int = 0) -> np.ndarray:
    """One (unnormalised) direction from paired activations [n, hidden], pointing wrong -> right."""
    diffs = pos - neg
    if aggregator == "mean_diff":
        return diffs.mean(0)
    if len(diffs) < 2:
        raise ClinqaError(f"the {aggregator} aggregator needs at least 2 pairs; use mean_diff or more questions")
    if aggregator == "pca":
        from sklearn.decomposition import PCA

        direction = PCA(n_components=1, svd_solver="full").fit(diffs).components_[0]
        return -direction if direction @ diffs.mean(0) < 0 else direction
    if aggregator == "probe":
        X = np.concatenate([pos, neg])
        return _probe(X, np.r_[np.ones(len(pos)), np.zeros(len(neg))], seed)[1]
    raise ClinqaError(f"unknown aggregator {aggregator!r}: use one of {', '.join(AGGREGATORS)}")


def weights_hash(model: LocalModel) -> str:
    """A sha256 fingerprint of the base weights (first, middle and last parameter tensors, up to
    64k values each, with their names and shapes); LoRA parameters are left out."""
    params = [(n.replace("base_layer.", ""), p) for n, p in model.model.named_parameters() if "lora_" not in n]
    h = hashlib.sha256()
    for name, p in (params[0], params[len(params) // 2], params[-1]):
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(p.detach().reshape(-1)[: 1 << 16].float().cpu().numpy().tobytes())
    return h.hexdigest()


def build_steering_vector(predictor: Any, questions: Sequence[Question], config: SteeringConfig | None = None, *,
                          progress: Progress | None = None, name: str = "steering", category: str | None = None,
                          data: str | None = None) -> "SteeringVector":
    """Extract a steering vector (right minus wrong answers) from labelled questions."""
    started = time.perf_counter()
    model = _require_local(predictor)
    config = config or SteeringConfig()
    layers = resolve_layers(model, config.layers)
    pairs = contrastive_pairs(questions, config)
    if not pairs:
        raise ClinqaError("no questions to build a steering vector from")
    texts = [(p, right) for p, right, _ in pairs] + [(p, wrong) for p, _, wrong in pairs]
    acts = answer_activations(model, texts, layers, config.position, progress)
    n = len(pairs)
    directions, stds, norms, probe_acc = {}, {}, {}, {}
    for layer in layers:
        pos, neg = acts[layer][:n], acts[layer][n:]
        raw = aggregate(pos, neg, config.aggregator, config.seed)
        length = float(np.linalg.norm(raw))
        if not math.isfinite(length) or length == 0:
            raise ClinqaError(f"layer {layer}: right and wrong answers give identical activations; nothing to steer")
        unit = raw / length
        directions[layer] = torch.tensor(unit, dtype=torch.float32)
        stds[layer] = float((acts[layer] @ unit).std())  # spread of all answer activations along the direction
        norms[layer] = float(((pos - neg) @ unit).mean())  # mean right-minus-wrong separation along it
        probe_acc[layer] = probe_accuracy(pos, neg, config.seed)
    from clinqa import __version__

    return SteeringVector(
        directions=directions, stds=stds, norms=norms, probe_accuracy=probe_acc,
        model_name=model.info.name, model_hash=weights_hash(model), hidden_size=int(model.model.config.hidden_size),
        model_type=str(getattr(model.model.config, "model_type", "") or ""), position=config.position,
        aggregator=config.aggregator, n_pairs=n, name=name, category=category,
        provenance={"data": data, "n_questions": len(questions), "question_ids_sha256": hashlib.sha256(
                        "\n".join(q.id for q in questions).encode()).hexdigest(),
                    "seed": config.seed, "max_pairs": config.max_pairs, "adapter": getattr(model, "adapter", None),
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "build_seconds": round(time.perf_counter() - started, 3), "clinqa_version": __version__},
    )


# --------------------------------------------------------------------------- the vector


def _by_layer(d: Mapping[Any, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in d.items()}


@dataclass
class SteeringVector:
    directions: dict[int, torch.Tensor]  # layer -> unit direction [hidden], float32
    stds: dict[int, float]  # std of answer activations projected on the unit direction: the unit of alpha
    norms: dict[int, float]  # mean right-minus-wrong separation along the unit direction
    probe_accuracy: dict[int, float | None]  # held-out right-vs-wrong probe accuracy per layer
    model_name: str
    model_hash: str
    hidden_size: int
    position: str = "answer_last"
    aggregator: str = "mean_diff"
    n_pairs: int = 0
    name: str = "steering"
    category: str | None = None
    model_type: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def best_layer(self) -> int:
        """The layer whose probe separates right from wrong answers best (ties: the deeper one)."""
        return max(self.layers, key=lambda layer: (self.probe_accuracy.get(layer) or 0.0, layer))

    def delta(self, layer: int, alpha: float) -> torch.Tensor:
        """What steering adds at `layer`: alpha activation-stds along the unit direction."""
        return self.directions[layer] * float(alpha * self.stds[layer])

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "name": self.name, "category": self.category,
            "model": {"name": self.model_name, "sha256": self.model_hash, "hidden_size": self.hidden_size,
                      "model_type": self.model_type},
            "layers": self.layers,
            "layer_numbering": "hidden-state index: 0 = embeddings, L = output of decoder block L (1-based)",
            "position": self.position, "aggregator": self.aggregator, "n_pairs": self.n_pairs,
            "stds": {str(k): v for k, v in self.stds.items()},
            "norms": {str(k): v for k, v in self.norms.items()},
            "probe_accuracy": {str(k): v for k, v in self.probe_accuracy.items()},
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        """Write `path/vector.safetensors` (the unit directions) and `path/vector.json`."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({f"direction.{k}": v.contiguous() for k, v in self.directions.items()}, str(path / "vector.safetensors"),
                  metadata={"format": FORMAT})
        (path / "vector.json").write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVector":
        from safetensors.torch import load_file

        path = Path(path)
        if path.name == "vector.json":
            path = path.parent
        if not (path / "vector.json").is_file() or not (path / "vector.safetensors").is_file():
            raise ClinqaError(f"{path} is not a steering vector folder (needs vector.json and vector.safetensors)")
        meta = json.loads((path / "vector.json").read_text())
        if meta.get("format") != FORMAT:
            raise ClinqaError(f"{path / 'vector.json'} is not a clinqa steering vector (format {meta.get('format')!r})")
        tensors = load_file(str(path / "vector.safetensors"))
        m = meta["model"]
        return cls(
            directions={int(k.split(".", 1)[1]): v.float() for k, v in tensors.items()},
            stds=_by_layer(meta["stds"]), norms=_by_layer(meta["norms"]), probe_accuracy=_by_layer(meta["probe_accuracy"]),
            model_name=m["name"], model_hash=m["sha256"], hidden_size=int(m["hidden_size"]), model_type=m.get("model_type", ""),
            position=meta["position"], aggregator=meta["aggregator"], n_pairs=int(meta["n_pairs"]),
            name=path.name, category=meta.get("category"), provenance=meta.get("provenance") or {},
        )

    def export_gguf(self, path: str | Path, *, alpha: float = 1.0, layers: Sequence[int] | None = None) -> Path:
        """Write a llama.cpp control vector (`--control-vector-scaled FILE STRENGTH`).

        Tensors are `direction.{k}` float32 [n_embd] holding `alpha * std * unit_direction`, so a
        llama.cpp strength of 1 matches clinqa's alpha. Layer mapping: llama.cpp adds `direction.k`
        to the output of its 0-based block k (common_control_vector_load_one stores it in tensor k,
        llama_adapter_cvec::apply_to adds tensor il after block il), which is clinqa layer k + 1.
        So clinqa layer L is written as `direction.{L-1}`; layer 1 (the first block's output) has no
        llama.cpp equivalent (k = 0 is rejected) and is skipped. Unlike clinqa, llama.cpp adds the
        vector at every position, prompt included.
        """
        import gguf

        wanted = self.layers if layers is None else [int(x) for x in layers]
        missing = [x for x in wanted if x not in self.directions]
        if missing:
            raise ClinqaError(f"layers {missing} are not in this vector (it has {self.layers})")
        exported = [x for x in wanted if x >= 2]
        if len(exported) < len(wanted):
            warnings.warn("layer 1 cannot be expressed as a llama.cpp control vector (direction.0 is rejected); skipped")
        if not exported:
            raise ClinqaError("nothing to export: llama.cpp control vectors start at clinqa layer 2")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", self.model_type or self.model_name)
        writer.add_int32("controlvector.layer_count", len(exported))
        for layer in exported:
            writer.add_tensor(f"direction.{layer - 1}", self.delta(layer, alpha).numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path


# --------------------------------------------------------------------------- application

# The steering handles active in the current context (thread/task): a hook whose key is absent
# passes its input through, so a model shared across threads is only steered where steer() runs.
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("clinqa_steer_active", default=frozenset())


def _steering_hook(key: object, delta: torch.Tensor):
    def hook(_module, _args, output):
        if key not in _ACTIVE.get():
            return None
        hidden = _block_output(output)
        vec = delta if (delta.dtype, delta.device) == (hidden.dtype, hidden.device) else delta.to(hidden.device, hidden.dtype)
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
        raise ClinqaError(f"steering vector {vector.name!r} was built on {vector.model_name} (hidden size "
                          f"{vector.hidden_size}); this model has hidden size {hidden}")
    if weights_hash(model) != vector.model_hash:
        warnings.warn(f"steering vector {vector.name!r} was built on {vector.model_name} with different weights; "
                      "its directions may not mean the same here")


@contextmanager
def steer(model: LocalModel, vector: SteeringVector, alpha: float = 1.0, *,
          layers: Sequence[int] | None = None) -> Iterator[None]:
    """Within the block, forwards of `model` add `alpha * std * direction` to the output of each
    steered block at answer-side positions (>= STEER_START per row; every position of a cached
    decode step; every position when no window is set). Hooks are removed on exit, errors included."""
    use = vector.layers if layers is None else [int(x) for x in layers]
    missing = [x for x in use if x not in vector.directions]
    if missing:
        raise ClinqaError(f"layer(s) {missing} not in steering vector {vector.name!r} (it has {vector.layers})")
    if max(use, default=1) > len(model.layers):
        raise ClinqaError(f"steering vector {vector.name!r} uses layer {max(use)}; "
                          f"this model has {len(model.layers)} layers")
    key = object()
    handles = []
    try:
        for layer in use:
            handles.append(model.layers[layer - 1].register_forward_hook(_steering_hook(key, vector.delta(layer, alpha))))
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
    question to a category or None (None = unsteered). `hidden_states` is always unsteered.
    """

    def __init__(self, model: LocalModel, vectors: SteeringVector | Mapping[str, SteeringVector], *, alpha: float = 1.0,
                 layer: int | None = None, router: Any = None, spec: str | None = None):
        self.base = _require_local(model)
        self.routed = not isinstance(vectors, SteeringVector)
        self.vectors: dict[str | None, SteeringVector] = (
            dict(vectors) if self.routed else {None: vectors})  # type: ignore[arg-type, dict-item]
        if self.routed and router is None:
            raise ClinqaError("per-category steering vectors need a router")
        self.router, self.alpha = router, float(alpha)
        self.steer_layers = None if layer is None else [int(layer)]
        for vec in self.vectors.values():
            check_compatible(self.base, vec)
            if layer is not None and int(layer) not in vec.directions:
                raise ClinqaError(f"layer={layer} is not stored in steering vector {vec.name!r} (it has {vec.layers})")
        self._routes: dict[str, str | None] = {}
        about = {"vectors": sorted({vec.name for vec in self.vectors.values()}), "alpha": self.alpha,
                 "layers": self.steer_layers, "routed": self.routed}
        self.info = ModelInfo(**{**self.base.info.__dict__, "spec": spec or f"{self.base.info.spec}+steer",
                                 "extra": {**self.base.info.extra, "steer": about}})

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
            scope = nullcontext() if unsteered else steer(self.base, self.vectors[key], self.alpha, layers=self.steer_layers)
            with scope:
                for i, r in zip(idx, run(idx)):
                    out[i] = r
        return out

    def cost(self) -> dict:
        """For `compare`: the directions applied plus the router's weights as extra parameters, and the
        seconds it took to build them (added to whatever the wrapped model, e.g. a LoRA view, reports)."""
        inner = getattr(self.base, "cost", None)
        cost = {"extra_params": 0, "training_s": 0.0, **(inner() if inner else {})}
        vectors = list(self.vectors.values())
        cost["extra_params"] += sum(v.directions[layer].numel() for v in vectors for layer in (self.steer_layers or v.layers))
        cost["training_s"] += sum(float(v.provenance.get("build_seconds") or 0.0) for v in vectors)
        if self.router is not None:
            cost["extra_params"] += int(np.size(self.router.coef) + np.size(self.router.intercept))
            cost["training_s"] += float(self.router.metrics.get("fit_seconds") or 0.0)
        return cost

    # Predictor protocol
    def score_continuations(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[ContinuationScore]]:
        return self._split([ctx for ctx, _ in groups], lambda idx: self.base.score_continuations([groups[i] for i in idx]))

    def next_token_logprobs(self, contexts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        rows = self._split(list(contexts),
                           lambda idx: list(self.base.next_token_logprobs([contexts[i] for i in idx], candidates)))
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
    raise ClinqaError(f"{path} is neither a steering vector folder (vector.json) nor a category folder (vectors.json): "
                      "build one with clinqa.adapt.steering.build_steering_vector(...).save(path) "
                      "or clinqa.adapt.router.build_category_vectors")


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

        lines = [f"Unsteered accuracy {self.base_accuracy:.3f} (n={self.n})", "",
                 "| layer | alpha | accuracy | Δ | wrong→right | right→wrong | p |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            gained, lost = round(r["wrong_to_right"] * r["n"]), round(r["right_to_wrong"] * r["n"])
            p = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
            lines.append(f"| {r['layer']} | {r['alpha']:g} | {r['accuracy']:.3f} | {r['accuracy'] - self.base_accuracy:+.3f} "
                         f"| {r['wrong_to_right']:.3f} | {r['right_to_wrong']:.3f} | {p:.2f} |")
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


def sweep(predictor: Any, questions: Sequence[Question], vector: SteeringVector, layers: Sequence[int],
          alphas: Sequence[float], *, method: str = "option", shuffles: int = 1, seed: int = 0,
          out: str | Path | None = None, progress: Progress | None = None) -> SweepResult:
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
        raise ClinqaError(f"{out} holds a sweep written by an older clinqa (sweep.json, no run.json): move it aside or "
                          "delete it and re-run to redo the sweep in the current format (its rows stay in sweep.csv)")
    directions = b"".join(vector.directions[x].numpy().tobytes() for x in vector.layers)
    key = {"vector": vector.name, "model_sha256": vector.model_hash, "method": method, "shuffles": shuffles,
           "seed": seed, "directions_sha256": hashlib.sha256(directions).hexdigest()}
    with RunFolder.open(out, key, kind="steer-sweep", sample_type=SweepRow, samples_file="sweep.jsonl",
                        data=questions_fingerprint(questions), data_may_grow=False) as run:
        if run.meta.get("base") is None:
            run.meta["base"] = score(model).tolist()
            run.save_meta()
        base = np.array(run.meta["base"], dtype=bool)
        done = {(r.layer, r.alpha): r.model_dump() for r in run.samples()}
        result = _sweep_grid(model, vector, grid, base, score, done, run, progress, len(items))
        atomic_write_text(out / "sweep.csv", ",".join(_SWEEP_FIELDS) + "\n"
                          + "".join(",".join(str(r[c]) for c in _SWEEP_FIELDS) + "\n" for r in result.rows))
        atomic_write_text(out / "sweep.json", json.dumps({"config": key, "base_accuracy": result.base_accuracy,
                                                          "n": result.n, "rows": result.rows}, indent=1) + "\n")
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
            row = SweepRow(layer=layer, alpha=alpha, accuracy=float(hit.mean()), wrong_to_right=float((~base & hit).mean()),
                           right_to_wrong=float((base & ~hit).mean()), n=len(hit))
            done[(layer, alpha)] = row.model_dump()
            if run is not None:
                run.append([row])
        rows.append(done[(layer, alpha)])
        if progress:
            progress(k + 1, len(grid))
    return SweepResult(base_accuracy=float(base.mean()), n=n, rows=rows)


__all__ = [
    "AGGREGATORS", "POSITIONS", "SteeredPredictor", "SteeringConfig", "SteeringVector", "SweepResult",
    "aggregate", "answer_activations", "apply_modifier", "build_steering_vector", "check_compatible",
    "contrastive_pairs", "probe_accuracy", "resolve_layers", "steer", "sweep", "weights_hash",
]
