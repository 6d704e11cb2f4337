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
3. Application lives in `clinqa.adapt.control` (repeng's ControlModel): hooks that add the vector,
   `SteeredPredictor`, the `+steer:` modifier and the layer x alpha sweep. This module never
   imports it, so the value type and its extraction stand alone.

Layer numbering is the hidden-state one used everywhere in clinqa (Hugging Face's): layer 0 is the
embeddings, layer L (1..n_layers) is the output of decoder block L (1-based, `model.layers[L-1]`).
Steering at layer 0 is not supported. Note that Hugging Face's `hidden_states[n_layers]` is taken
after the final norm; we always read (and steer) the block output itself.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate.prompts import cloze_prompt
from clinqa.models.base import Predictor
from clinqa.models.local import LocalModel, length_batches
from clinqa.runs import Progress

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
    """The predictor, when it is a local transformers model (a LoRA view is one); steering reads its
    blocks, tokenizer and weights, which no wrapper passes on."""
    if not isinstance(predictor, LocalModel):
        info = predictor.info if isinstance(predictor, Predictor) else None
        backend = f"{info.spec} ({type(predictor).__name__})" if info is not None else type(predictor).__name__
        raise ClinqaError(
            f"steering needs a local transformers model (hidden states and hooks); got {backend}. "
            "Put +steer: right after the base model (or its +lora:), e.g. default+steer:vectors/NAME"
        )
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
def answer_activations(
    model: LocalModel,
    texts: Sequence[tuple[str, str]],
    layers: Sequence[int],
    position: str = "answer_last",
    progress: Progress | None = None,
) -> dict[int, np.ndarray]:
    """Block outputs at the answer of each teacher-forced (prompt, answer) text: {layer: [n, hidden]}."""
    encoded = []
    for prompt, answer in texts:
        ctx, cont = model.encode_pair(prompt, " " + answer)
        ids = (ctx + cont)[-model.max_length :]
        encoded.append((ids, len(ids) - len(cont)))
    out = {layer: np.zeros((len(texts), model.model.config.hidden_size), dtype=np.float64) for layer in layers}
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        model.layers[layer - 1].register_forward_hook(
            lambda _m, _a, o, layer=layer: captured.__setitem__(layer, _block_output(o))
        )
        for layer in layers
    ]
    scope = model._adapter_scope()
    done = 0
    try:
        with scope:
            for batch in length_batches([len(ids) for ids, _ in encoded]):
                width = len(encoded[batch[0]][0])
                ids = torch.full((len(batch), width), model.pad_id, dtype=torch.long)
                for row, i in enumerate(batch):  # right padding: causal attention keeps pads invisible
                    ids[row, : len(encoded[i][0])] = torch.tensor(encoded[i][0])
                model._decoder(input_ids=ids.to(model.device), use_cache=False)
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


def build_steering_vector(
    predictor: Any,
    questions: Sequence[Question],
    config: SteeringConfig | None = None,
    *,
    progress: Progress | None = None,
    name: str = "steering",
    category: str | None = None,
    data: str | None = None,
) -> SteeringVector:
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
        directions=directions,
        stds=stds,
        norms=norms,
        probe_accuracy=probe_acc,
        model_name=model.info.name,
        model_hash=weights_hash(model),
        hidden_size=int(model.model.config.hidden_size),
        model_type=str(getattr(model.model.config, "model_type", "") or ""),
        position=config.position,
        aggregator=config.aggregator,
        n_pairs=n,
        name=name,
        category=category,
        provenance={
            "data": data,
            "n_questions": len(questions),
            "question_ids_sha256": hashlib.sha256("\n".join(q.id for q in questions).encode()).hexdigest(),
            "seed": config.seed,
            "max_pairs": config.max_pairs,
            "adapter": model.adapter,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - started, 3),
            "clinqa_version": __version__,
        },
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
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "category": self.category,
            "model": {
                "name": self.model_name,
                "sha256": self.model_hash,
                "hidden_size": self.hidden_size,
                "model_type": self.model_type,
            },
            "layers": self.layers,
            "layer_numbering": "hidden-state index: 0 = embeddings, L = output of decoder block L (1-based)",
            "position": self.position,
            "aggregator": self.aggregator,
            "n_pairs": self.n_pairs,
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
        save_file(
            {f"direction.{k}": v.contiguous() for k, v in self.directions.items()},
            str(path / "vector.safetensors"),
            metadata={"format": FORMAT},
        )
        (path / "vector.json").write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
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
            stds=_by_layer(meta["stds"]),
            norms=_by_layer(meta["norms"]),
            probe_accuracy=_by_layer(meta["probe_accuracy"]),
            model_name=m["name"],
            model_hash=m["sha256"],
            hidden_size=int(m["hidden_size"]),
            model_type=m.get("model_type", ""),
            position=meta["position"],
            aggregator=meta["aggregator"],
            n_pairs=int(meta["n_pairs"]),
            name=path.name,
            category=meta.get("category"),
            provenance=meta.get("provenance") or {},
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
            warnings.warn(
                "layer 1 cannot be expressed as a llama.cpp control vector (direction.0 is rejected); skipped",
                stacklevel=2,
            )
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


__all__ = [
    "AGGREGATORS",
    "POSITIONS",
    "SteeringConfig",
    "SteeringVector",
    "aggregate",
    "answer_activations",
    "build_steering_vector",
    "contrastive_pairs",
    "probe_accuracy",
    "resolve_layers",
    "weights_hash",
]
