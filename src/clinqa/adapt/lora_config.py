"""The LoRA training configuration (PEFT's style: a config dataclass in its own file) and the result
of a training: `LoraTrainConfig`, `identity_config`, `TrainingEpoch` (one line of an adapter folder's
samples.jsonl), `AdapterResult`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clinqa.errors import ClinqaError

PROMPT_FORMATS = ("cloze", "letter")
QUANTIZATION = ("auto", "none", "4bit")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
IGNORE = -100

ProgressFn = Callable[[int, int, "float | None"], None]


@dataclass
class LoraTrainConfig:
    """Everything that determines a trained adapter. Saved into the adapter's metadata; a different
    config pointed at an existing output folder is refused rather than mixed in.

    rank, alpha, dropout: the LoRA update is (alpha / rank) * B A with dropout on its input. The
        defaults (32, 16, 0.1) are S-MedQA's.
    epochs, patience: at most `epochs` passes over the training questions; stop after `patience`
        epochs without a lower validation loss (None or 0: never stop early). The adapter kept is
        the best epoch's.
    learning_rate: 2e-4 is the standard LoRA rate (PEFT's examples; the QLoRA paper's setting for
        7B-13B, 1e-4 above) and sane for ~100M-1B models: the update scale alpha/rank is 0.5 and B
        starts at zero, so much smaller rates barely move the model in the few hundred steps a
        specialty's questions give, while rates near 1e-3 risk divergence without longer warmup.
        Linear warmup over `warmup_fraction` of the planned steps, then linear decay to zero at the
        end of the last planned epoch (transformers' "linear" schedule).
    batch_size, grad_accum: questions per forward pass on each device and passes per optimizer step
        (transformers' per_device_train_batch_size and gradient_accumulation_steps): on N devices an
        optimizer step sees batch_size x grad_accum x N questions.
    max_length: tokens per example; the prompt is cut from the left (as lm-eval does when scoring).
    val_fraction, seed: the held-out share (chosen by `split_train_val`) and the seed for the
        split, LoRA initialisation, data order and dropout.
    prompt_format: "cloze" (cloze_prompt(q) + " " + correct option text: the `option` method) or
        "letter" (letter_prompt(q, q.options) + " " + answer letter: the `letter` method).
    target_modules: module names to adapt; None means every nn.Linear inside the decoder blocks
        (all attention and MLP projections, never lm_head), found from the model.
    quantization: "auto" is QLoRA (4-bit NF4 base via bitsandbytes, the `gpu` extra) when training
        runs on CUDA and bitsandbytes is installed, plain LoRA otherwise; "none" and "4bit" force
        one. Metadata records which ran.
    balance: subsample every specialty to the size of the smallest (`balance_by_specialty`).
    gradient_checkpointing: recompute each decoder block's activations during the backward pass
        instead of keeping them (and fix glibc's mmap threshold, `fix_mmap_threshold`): for long
        examples (PubMedQA abstracts, patient records) peak memory fell 7x (15.8 -> 2.2 GB, batch
        8 x 512 tokens, embedded model) for 1.35x the time (benchmarks/lora_train.py
        --compare-checkpointing). The weights come out the same (dropout masks are replayed), so
        it is not part of an adapter's identity and may be switched on when resuming.
    device: where to train: None or "auto" (CUDA if present, then MPS, then the CPU), "cpu",
        "cuda" or "mps". Under `accelerate launch` / `torchrun` each process takes its own GPU.
        Not part of the identity (a run may resume elsewhere).
    dtype: the compute precision: None or "auto" (bfloat16 mixed precision on a GPU that supports
        it, float16 on one that does not, float32 on the CPU and MPS), or "float32", "bfloat16",
        "float16". Mixed precision keeps the LoRA weights and the optimizer in float32 (the base
        weights are loaded in the compute dtype on a GPU). Part of the identity only when set
        explicitly (bf16 and fp32 trainings give different weights).
    """

    rank: int = 32
    alpha: float = 16
    dropout: float = 0.1
    epochs: int = 10
    patience: int | None = 2
    learning_rate: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    val_fraction: float = 0.1
    seed: int = 0
    prompt_format: str = "cloze"
    target_modules: list[str] | None = None
    quantization: str = "auto"
    balance: bool = False
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ClinqaError:
            return ClinqaError(f"LoraTrainConfig.{name} = {getattr(self, name)!r}: {why}")

        def positive_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < minimum:
                raise bad(
                    name, "must be a positive integer" if minimum == 1 else f"must be an integer of at least {minimum}"
                )

        for name in ("rank", "epochs", "batch_size", "grad_accum"):
            positive_int(name)
        positive_int("max_length", 2)
        if not self.alpha > 0:
            raise bad("alpha", "must be positive")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1)")
        if self.patience is not None and (int(self.patience) != self.patience or self.patience < 0):
            raise bad("patience", "must be a non-negative integer or None")
        if not self.learning_rate > 0:
            raise bad("learning_rate", "must be positive")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", "must be in [0, 1)")
        if self.prompt_format not in PROMPT_FORMATS:
            raise bad("prompt_format", f"use one of {', '.join(PROMPT_FORMATS)}")
        if self.quantization not in QUANTIZATION:
            raise bad("quantization", f"use one of {', '.join(QUANTIZATION)}")
        if not 0 <= self.warmup_fraction < 1:
            raise bad("warmup_fraction", "must be in [0, 1)")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be non-negative")
        if not self.max_grad_norm > 0:
            raise bad("max_grad_norm", "must be positive")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(isinstance(m, str) and m for m in self.target_modules):
                raise bad("target_modules", "must be a list of module names, e.g. ['q_proj', 'v_proj'], or None")
            self.target_modules = list(self.target_modules)
        if self.device is not None:
            self.device = str(self.device).lower()
            if self.device.split(":")[0] not in DEVICES or (
                ":" in self.device and not self.device.split(":", 1)[1].isdigit()
            ):
                raise bad("device", f"use one of {', '.join(DEVICES)} or cuda:N")
            if self.device == "auto":
                self.device = None
        if self.dtype is not None:
            aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
            self.dtype = aliases.get(str(self.dtype).lower(), str(self.dtype).lower())
            if self.dtype not in DTYPES:
                raise bad("dtype", f"use one of {', '.join(DTYPES)}")
            if self.dtype == "auto":
                self.dtype = None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def identity(self) -> dict[str, Any]:
        """The settings that decide the trained weights (memory/speed knobs left out)."""
        return identity_config(self.to_dict())


# memory/speed knobs and where it runs: never part of an adapter's identity
_NOT_IDENTITY = ("gradient_checkpointing", "device")
# fields added after adapters were first written: part of the identity only when set, so folders
# trained before they existed (whose metadata lacks them) still match a config that leaves them at auto
_ADDED_LATER = {"dtype": None}


def identity_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A LoRA config dict (``LoraTrainConfig.to_dict()`` or part of one) without the memory/speed
    knobs, which do not change the trained weights: what two trainings must agree on."""
    return {
        k: v for k, v in config.items() if k not in _NOT_IDENTITY and not (k in _ADDED_LATER and v == _ADDED_LATER[k])
    }


@dataclass
class TrainingEpoch:
    """One finished epoch of a training: a line of the adapter folder's samples.jsonl (the run store's
    samples), appended once the epoch's checkpoint is complete. `val_loss` is None without a
    validation set; `step` is the optimizer step the epoch ended at."""

    epoch: int
    step: int
    train_loss: float
    val_loss: float | None = None


@dataclass
class AdapterResult:
    """A trained adapter folder and its metadata.

    `cached` is True when the folder was already finished and nothing was trained; `resumed_from`
    is the optimizer step a resumed run started from (None for a fresh run).
    """

    path: Path
    metadata: dict[str, Any]
    cached: bool = False
    resumed_from: int | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.metadata["history"]

    @property
    def best_epoch(self) -> int | None:
        return self.metadata["best_epoch"]

    @property
    def spec_modifier(self) -> str:
        """What to append to a model spec to use this adapter: `+lora:PATH`."""
        return f"+lora:{self.path}"
