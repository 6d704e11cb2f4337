"""LoRA fine-tuning on clinical questions, and the `+lora:` spec modifier.

PEFT's style: a config dataclass plus plain functions.

    from clinqa.adapt.lora import LoraTrainConfig, finetune
    questions = load_questions("bundled", specialties=["cardiology"]).questions
    result = finetune("default", questions, LoraTrainConfig(epochs=3), "adapters/cardio")
    # then evaluate `default+lora:adapters/cardio`

Decisions:
- The loss is on the answer only: the prompt is one of the scoring prompts (`cloze`: the `option`
  method's context and " " + correct option text; `letter`: the `letter` method's prompt and " X"),
  tokenised exactly as `LocalModel.encode_pair` (lm-eval's `_encode_pair`) does, so training and
  scoring see the same token boundaries; the answer ends with EOS.
- Training never touches a base model someone else holds: a spec string is loaded afresh from the
  folder it resolves to, a `LocalModel` is deep-copied (any LoRA adapters already loaded into it are
  stripped from the copy). CPU training is float32.
- A plain torch loop (AdamW, linear warmup and decay, gradient clipping) that is deterministic for a
  seed and resumable: every `checkpoint_every` optimizer steps and after every epoch the adapter,
  best adapter, optimizer, scheduler, RNG states and counters go into one file
  `out_dir/checkpoint/state.pt`, written to a temporary name and renamed. Re-running the same call
  resumes from it and ends with the same weights an uninterrupted run would have produced.
- Early stopping on the validation loss (mean per answer token) with `patience`; the adapter saved is
  the best epoch's.
- Device: CPU in float32; CUDA when available (QLoRA needs it; untested on these CPU machines).
- Cost on CPU (SmolLM2-135M, rank 32, batch 8 of ~60-token questions): about 2 MB of activations
  per token in a batch on top of two copies of the weights, so batch_size x max_length bounds
  memory; on a shared 2-core machine torch.set_num_threads(1) is several times faster than 2
  threads (benchmarks/lora_train.py --threads).
- Output: PEFT's `adapter_config.json` + `adapter_model.safetensors`, and `clinqa_adapter.json`
  (what it was trained on and how, and what it cost). `clinqa_adapter.json` is written last, so its
  presence marks a finished folder, which `finetune` returns at once.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate.prompts import cloze_prompt, letter_prompt

__all__ = [
    "AdapterResult",
    "LoraTrainConfig",
    "TextExample",
    "METADATA_FILE",
    "answer_loss",
    "apply_modifier",
    "balance_by_specialty",
    "build_examples",
    "finetune",
    "find_target_modules",
    "load_adapter_metadata",
    "split_train_val",
]

METADATA_FILE = "clinqa_adapter.json"
TRAIN_FILE = "clinqa_train.json"  # identity of an unfinished training run; removed when it finishes
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
PROMPT_FORMATS = ("cloze", "letter")
QUANTIZATION = ("auto", "none", "4bit")
IGNORE = -100

ProgressFn = Callable[[int, int, "float | None"], None]


# --------------------------------------------------------------------------------------------------
# Configuration


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
        end of the last planned epoch.
    batch_size, grad_accum: questions per forward pass and passes per optimizer step.
    max_length: tokens per example; the prompt is cut from the left (as lm-eval does when scoring).
    val_fraction, seed: the held-out share (chosen by `split_train_val`) and the seed for the
        split, LoRA initialisation, data order and dropout.
    prompt_format: "cloze" (cloze_prompt(q) + " " + correct option text: the `option` method) or
        "letter" (letter_prompt(q, q.options) + " " + answer letter: the `letter` method).
    target_modules: module names to adapt; None means every nn.Linear inside the decoder blocks
        (all attention and MLP projections, never lm_head), found from the model.
    quantization: "auto" is QLoRA (4-bit NF4 base via bitsandbytes) when CUDA and bitsandbytes are
        available and plain LoRA otherwise; "none" and "4bit" force one. Metadata records which ran.
    balance: subsample every specialty to the size of the smallest (`balance_by_specialty`).
    gradient_checkpointing: recompute each decoder block's activations during the backward pass
        instead of keeping them (and fix glibc's mmap threshold, `fix_mmap_threshold`): for long
        examples (PubMedQA abstracts, patient records) peak memory fell 7x (15.8 -> 2.2 GB, batch
        8 x 512 tokens, embedded model) for 1.35x the time (benchmarks/lora_train.py
        --compare-checkpointing). The weights come out the same
        (dropout masks are replayed), so it is not part of an adapter's identity and may be switched
        on when resuming.
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

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ClinqaError:
            return ClinqaError(f"LoraTrainConfig.{name} = {getattr(self, name)!r}: {why}")

        if int(self.rank) != self.rank or self.rank < 1:
            raise bad("rank", "must be a positive integer")
        if not self.alpha > 0:
            raise bad("alpha", "must be positive")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1)")
        if int(self.epochs) != self.epochs or self.epochs < 1:
            raise bad("epochs", "must be a positive integer")
        if self.patience is not None and (int(self.patience) != self.patience or self.patience < 0):
            raise bad("patience", "must be a non-negative integer or None")
        if not self.learning_rate > 0:
            raise bad("learning_rate", "must be positive")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise bad("batch_size", "must be a positive integer")
        if int(self.grad_accum) != self.grad_accum or self.grad_accum < 1:
            raise bad("grad_accum", "must be a positive integer")
        if int(self.max_length) != self.max_length or self.max_length < 2:
            raise bad("max_length", "must be an integer of at least 2")
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

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def identity(self) -> dict[str, Any]:
        """The settings that decide the trained weights (memory/speed knobs left out)."""
        return identity_config(self.to_dict())


_NOT_IDENTITY = ("gradient_checkpointing",)


def identity_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A LoRA config dict (``LoraTrainConfig.to_dict()`` or part of one) without the memory/speed
    knobs, which do not change the trained weights: what two trainings must agree on."""
    return {k: v for k, v in config.items() if k not in _NOT_IDENTITY}


def fix_mmap_threshold(nbytes: int = 1 << 16) -> bool:
    """Keep glibc's mmap threshold at ``nbytes`` for the rest of the process; True if it was set.

    glibc raises the threshold after large blocks are freed, so the activation buffers a training
    step frees afterwards land in the heap, fragment it and are never returned: resident memory
    then grows far beyond what is live. A fixed threshold maps large buffers separately and gives
    them back when freed. Measured on checkpointed LoRA training with PubMedQA-length examples:
    peak 7.9 -> 2.2 GB, about 10% slower (benchmarks/lora_train.py). Applied with gradient
    checkpointing, the setting chosen for memory; a no-op off Linux/glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


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


# --------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class TextExample:
    """A (prompt, target) training pair for tasks that are not multiple choice (the two record stages).

    The loss is on `target` (then EOS) only. With `chat=True` the prompt is wrapped in the tokenizer's
    chat template with `system`, exactly as `LocalModel.generate` formats it, so an adapter trained
    here sees at inference the tokens it was trained on; with `chat=False` it is used as is, as the
    scoring calls (`next_token_logprobs`) use prompts. `label` groups examples (recorded in the
    adapter's metadata, used by `balance`)."""

    id: str
    prompt: str
    target: str
    system: str | None = None
    chat: bool = False
    label: str | None = None

    def __post_init__(self) -> None:
        if not str(self.id):
            raise ClinqaError("TextExample.id is empty")
        if not self.target:
            raise ClinqaError(f"TextExample {self.id}: empty target")

    @property
    def specialties(self) -> tuple[str, ...]:
        return (self.label,) if self.label else ()


Example = Question | TextExample


class _Encoder:
    """Just enough of a LocalModel for `LocalModel.encode_pair`, so training tokenises with the very
    code that scoring uses."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids


def _prompt_and_answer(q: Example, prompt_format: str, tokenizer=None) -> tuple[str, str]:
    if isinstance(q, TextExample):
        if not q.chat:
            return q.prompt, q.target
        from clinqa.models.base import GenerationConfig
        from clinqa.models.local import LocalModel

        return LocalModel.format_prompt(_Encoder(tokenizer), q.prompt, GenerationConfig(system=q.system)), q.target
    if prompt_format == "cloze":
        return cloze_prompt(q), " " + q.options[q.answer]
    return letter_prompt(q, q.options), " " + q.answer


def build_examples(tokenizer, questions: Sequence[Example], config: LoraTrainConfig) -> list[dict[str, Any]]:
    """One training example per question (or `TextExample`): {"id", "input_ids", "labels"}.

    input_ids = prompt tokens + answer tokens + EOS, split as `LocalModel.encode_pair(prompt, answer)`
    splits them; labels are -100 on the prompt so the loss is on the answer (and EOS) only. Too long
    an example loses prompt tokens from the left, keeping at least one.
    """
    from clinqa.models.local import LocalModel

    enc = _Encoder(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ClinqaError("the tokenizer has no EOS token, which training appends to every answer")
    out = []
    for q in questions:
        prompt, answer = _prompt_and_answer(q, config.prompt_format, tokenizer)
        ctx, cont = LocalModel.encode_pair(enc, prompt, answer)
        if not cont:
            raise ClinqaError(f"question {q.id}: the answer {answer!r} encodes to no tokens")
        target = list(cont) + [eos]
        if len(target) > config.max_length - 1:
            target = target[: config.max_length - 1]
        ctx = list(ctx)[-(config.max_length - len(target)):]
        if not ctx:  # an empty prompt is conditioned on BOS/EOS, as in scoring
            ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]
        out.append({"id": q.id, "input_ids": ctx + target, "labels": [IGNORE] * len(ctx) + target})
    return out


def balance_by_specialty(questions_by_specialty: Mapping[str, Sequence[Question]], seed: int = 0) -> dict[str, list[Question]]:
    """Subsample every specialty to the size of the smallest, deterministically for a seed.

    Each kept subset stays in its original order; which questions are kept depends only on the seed,
    the specialty name and the question ids.
    """
    if not questions_by_specialty:
        return {}
    smallest = min(len(qs) for qs in questions_by_specialty.values())
    out: dict[str, list[Question]] = {}
    for label, qs in questions_by_specialty.items():
        rng = random.Random(f"{seed}:{label}")
        keep = set(rng.sample(range(len(qs)), smallest))
        out[label] = [q for i, q in enumerate(qs) if i in keep]
    return out


def split_train_val(questions: Sequence[Any], val_fraction: float, seed: int = 0,
                    max_val: int | None = None) -> tuple[list[Any], list[Any]]:  # fmt: skip
    """(train, val): round(n * val_fraction) items with an `id` (at least 1 when val_fraction > 0 and
    n >= 2, at most `max_val`) held out. The choice depends on the seed and the ids, not on their
    order; both parts keep the input order."""
    if not 0 <= val_fraction < 1:
        raise ClinqaError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(questions)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0), n if max_val is None else max_val)
    rank = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{questions[i].id}".encode()).hexdigest())
    val_idx = set(rank[:n_val])
    return [q for i, q in enumerate(questions) if i not in val_idx], [q for i, q in enumerate(questions) if i in val_idx]


def _resolve_label(label: str) -> str:
    from clinqa.specialties.taxonomy import resolve_specialty

    try:
        return resolve_specialty(label)
    except ClinqaError:
        return label  # e.g. "control": kept as given


def _prepare_questions(questions, config: LoraTrainConfig) -> tuple[list[Question], list[str]]:
    """The question list to train on (balanced if asked) and the labels it covers."""
    if isinstance(questions, Mapping):
        groups = {_resolve_label(k): list(v) for k, v in questions.items()}
    else:
        questions = list(questions)
        if not config.balance:
            labels = list(dict.fromkeys(s for q in questions for s in q.specialties))
            return questions, labels
        groups = {}
        for q in questions:
            if not q.specialties:
                raise ClinqaError(f"--balance needs a specialty label on every question; {q.id} has none")
            groups.setdefault(q.specialties[0], []).append(q)
    if config.balance:
        groups = balance_by_specialty(groups, config.seed)
    seen: dict[str, Question] = {}
    for qs in groups.values():
        for q in qs:
            seen.setdefault(q.id, q)
    return list(seen.values()), list(groups)


def _fingerprint(questions: Sequence[Example], labels: Sequence[str]) -> str:
    rows = sorted(json.dumps([q.id, q.prompt, q.target, q.system, q.chat] if isinstance(q, TextExample)
                             else [q.id, q.question, q.options, q.answer, q.meta.get("contexts")], sort_keys=True, default=str)
                  for q in questions)
    return hashlib.sha256(json.dumps([rows, sorted(labels)]).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# The model to train


def find_target_modules(model) -> list[str]:
    """Names (last component) of every linear layer inside the decoder blocks: for Llama q_proj,
    k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj. lm_head and embeddings are never included."""
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style projections

        linear_types += (Conv1D,)
    except ImportError:  # pragma: no cover
        pass
    blocks = None
    try:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        blocks = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    except (AttributeError, NotImplementedError):
        blocks = None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        BaseTunerLayer = ()  # type: ignore[assignment]
    names, tuned = [], []
    for n, m in (blocks if blocks is not None else model).named_modules():
        if any(n.startswith(t + ".") for t in tuned):
            continue  # inside a LoRA layer already injected (lora_A, base_layer, ...): its wrapper counts
        if isinstance(m, BaseTunerLayer):
            tuned.append(n)
        elif not isinstance(m, linear_types) or m is head:
            continue
        names.append(n.rsplit(".", 1)[-1])
    names = sorted(set(names))
    if not names:
        raise ClinqaError("found no linear layers in the model's decoder blocks: pass target_modules explicitly")
    return names


def _resolve_quantization(requested: str) -> str:
    import importlib.util

    available = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    if requested == "4bit" and not available:
        raise ClinqaError("quantization='4bit' (QLoRA) needs a CUDA GPU and the bitsandbytes package: use 'auto' or 'none'")
    if requested == "auto":
        return "4bit" if available else "none"
    return requested


def _spec_folder(spec: str) -> tuple[str, str]:
    """(folder or cached HF id, display name) that a model spec string loads from."""
    from clinqa.models.spec import parse_spec

    ms = parse_spec(spec)
    if ms.modifiers:
        raise ClinqaError(f"train a LoRA adapter on a base model, not on {spec!r}: drop the +{ms.modifiers[0].kind}: part")
    if ms.kind == "openai":
        raise ClinqaError("LoRA training needs local weights; an openai: endpoint has none (use a model folder, a .gguf file or 'default')")
    from clinqa.models.embedded import EMBEDDED_NAME, converted_gguf_dir, embedded_model_dir

    if ms.kind == "default":
        return str(embedded_model_dir()), EMBEDDED_NAME
    if ms.kind == "gguf":
        path = Path(ms.target)
        if not path.is_file():
            raise ClinqaError(f"no such GGUF file: {path}")
        return str(converted_gguf_dir(path)), path.stem
    path = Path(ms.target).expanduser()
    if ms.target.startswith((".", "/", "~")) and not path.exists():
        raise ClinqaError(f"no such model folder: {ms.target}")
    return (str(path) if path.exists() else ms.target), Path(ms.target).name


def _load_weights(source: str, quantization: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                            bnb_4bit_compute_dtype=torch.bfloat16),
                  "device_map": {"": 0}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError as exc:
        raise ClinqaError(f"could not load base model weights from {source}: {exc}") from exc
    if quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer


def _strip_clinqa_hooks(model) -> None:
    """Drop forward hooks clinqa registered (steering) from a copied model; transformers' own stay."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                owner = getattr(hook, "__module__", "") or getattr(getattr(hook, "__func__", None), "__module__", "") or ""
                if owner.startswith("clinqa."):
                    del hooks[key]


def _fresh_model(base, quantization: str, requested: str):
    """(model to train, tokenizer, base description, quantization used), never touching `base`."""
    from clinqa.models.local import LocalModel

    if isinstance(base, (str, Path)):
        spec = str(base)
        source, name = _spec_folder(spec)
        model, tokenizer = _load_weights(source, quantization)
        return model, tokenizer, {"spec": spec, "name": name, "source": source}, quantization
    if not isinstance(base, LocalModel):
        raise ClinqaError(f"LoRA training needs a local transformers model (a LocalModel or a spec string), not {type(base).__name__}")
    info = {"spec": base.info.spec, "name": base.info.name}
    if quantization == "4bit":
        # 4-bit weights are loaded from the folder the model came from; an in-memory model has none
        try:
            source, _ = _spec_folder(base.info.spec)
            if not Path(source).is_dir():
                raise ClinqaError(source)
        except ClinqaError:
            if requested == "4bit":
                raise ClinqaError(f"quantization='4bit' needs the base model's folder; {base.info.spec!r} is not one "
                                  "(pass the model spec string instead, or use quantization='none')") from None
            quantization = "none"
        else:
            model, tokenizer = _load_weights(source, quantization)
            return model, tokenizer, {**info, "source": source}, quantization
    peft = base._shared.get("peft")
    with base._shared["lock"], torch.inference_mode(False):  # no adapter switch mid-copy
        # a LocalModel with adapters loaded has LoRA layers injected into its modules: copy the
        # PeftModel and unload them from the copy, leaving the shared model as it is
        model = copy.deepcopy(peft).unload() if peft is not None else copy.deepcopy(base.model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    _strip_clinqa_hooks(model)
    return model.float(), base.tokenizer, {**info, "source": "in-memory copy"}, quantization


# --------------------------------------------------------------------------------------------------
# Training loop pieces


def _collate(examples: Sequence[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        attn[row, :n] = 1
        labels[row, :n] = torch.tensor(e["labels"])
    return ids.to(device), attn.to(device), labels.to(device)


def _answer_loss_sum(causal_lm, ids, attn, labels) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over answer tokens. The LM head runs only at positions that predict an
    answer token (a few per example), not over the whole vocabulary at every prompt position."""
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE, as_tuple=True)
    targets = labels[rows, cols + 1]
    try:
        decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        decoder = head = None
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        logits = head(hidden[rows, cols])
    else:
        logits = causal_lm(input_ids=ids, attention_mask=attn, use_cache=False).logits[rows, cols]
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, int(targets.numel())


def _mean_loss(causal_lm, examples: Sequence[dict], batch_size: int, pad_id: int, device) -> float | None:
    if not examples:
        return None
    was_training = causal_lm.training
    causal_lm.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start:start + batch_size]]
            loss, n = _answer_loss_sum(causal_lm, *_collate(batch, pad_id, device))
            total += float(loss)
            count += n
    causal_lm.train(was_training)
    return total / max(count, 1)


def _epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group: int = 16) -> list[list[int]]:
    """This epoch's batches, a function of (seed, epoch) only, so a resumed run replays them.

    Shuffled, then grouped by length (as transformers' `group_by_length`): each run of
    `group` x batch_size shuffled examples is sorted by length and cut into batches, and the batch
    order is shuffled again. Less padding, still random."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    span = group * batch_size
    batches = []
    for start in range(0, len(perm), span):
        chunk = sorted(perm[start:start + span], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def _record_epoch(state: dict[str, Any], epoch: int, val_loss: float | None, patience: int | None) -> bool:
    """Early-stopping bookkeeping after `epoch` (1-based): True when it is the new best (a lower
    validation loss, or any epoch when there is no validation set); sets state["done"] and
    state["stopped_early"] after `patience` epochs in a row without improvement."""
    improved = val_loss is None or state["best_val"] is None or val_loss < state["best_val"]
    if improved:
        state["best_val"], state["best_epoch"], state["bad_epochs"] = val_loss, epoch, 0
    else:
        state["bad_epochs"] += 1
        if patience and state["bad_epochs"] >= patience:
            state["stopped_early"] = state["done"] = True
    return improved


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import clinqa

    out = {"clinqa": clinqa.__version__}
    for pkg in ("torch", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _check_identity(out_dir: Path, found: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> None:
    """Refuse to mix two trainings in one folder, naming what differs."""
    diffs = []
    old_cfg = identity_config(found.get("config") or {})
    new_cfg = wanted["config"]
    for k in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(k) != new_cfg.get(k):
            diffs.append(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}")
    if (found.get("base") or {}).get("spec") != wanted["base"]["spec"]:
        diffs.append(f"base model: {(found.get('base') or {}).get('spec')!r} -> {wanted['base']['spec']!r}")
    if found.get("data_fingerprint") != wanted["data_fingerprint"]:
        diffs.append("training questions differ")
    def sha(v):  # metadata keeps {"path", "sha256"}; a run's identity the hash alone
        return v.get("sha256") if isinstance(v, Mapping) else v

    if sha(found.get("init_adapter")) != sha(wanted.get("init_adapter")):
        diffs.append(f"starting adapter: {sha(found.get('init_adapter'))!r} -> {sha(wanted.get('init_adapter'))!r}")
    if diffs:
        raise ClinqaError(f"{out_dir} holds {where} with a different setup ({'; '.join(diffs)}): "
                          "choose another output folder or delete this one")


def _read_init_adapter(path: Path, config: LoraTrainConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, identity) of a starting adapter, refusing one whose rank or targets differ from `config`."""
    from safetensors.torch import load_file

    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise ClinqaError(f"starting adapter {path} is not a LoRA adapter folder (no adapter_config.json / adapter_model.safetensors)")
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("r") != config.rank:
        raise ClinqaError(f"starting adapter {path} has rank {cfg.get('r')}; this training uses rank {config.rank}")
    if config.target_modules is not None and sorted(cfg.get("target_modules") or []) != sorted(config.target_modules):
        raise ClinqaError(f"starting adapter {path} targets {cfg.get('target_modules')}; this training targets {config.target_modules}")
    blob = (path / "adapter_model.safetensors").read_bytes()
    return load_file(str(path / "adapter_model.safetensors")), {"path": str(path), "sha256": hashlib.sha256(blob).hexdigest()[:16]}


def _is_finished(out_dir: Path) -> bool:
    return all((out_dir / f).is_file() for f in (METADATA_FILE, "adapter_config.json", "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------------
# finetune


def finetune(
    base,
    questions: Sequence[Example] | Mapping[str, Sequence[Example]],
    config: LoraTrainConfig | None = None,
    out_dir: str | Path = "adapter",
    *,
    init_adapter: str | Path | None = None,
    progress: ProgressFn | None = None,
    metadata: Mapping[str, Any] | None = None,
    checkpoint_every: int = 50,
    keep_checkpoint: bool = False,
) -> AdapterResult:
    """Train a LoRA adapter on `questions` and save it to `out_dir`; resumable, idempotent.

    base: a `LocalModel` (its weights are copied, never modified) or a model spec string (loaded
        afresh from the folder the spec resolves to).
    questions: a list of `Question`s (multiple choice, prompted by `config.prompt_format`) and/or
        `TextExample`s (any prompt and target), or {specialty label: such a list} (the labels are
        recorded in the metadata and used by `balance`).
    init_adapter: an adapter folder (same rank and target modules) to start from instead of a fresh
        LoRA initialisation: training continues it on new data (sequential training, as in the
        records pipeline's forgetting experiment). Its weights' hash is part of the run's identity.
    progress(step, total_steps, loss): called once at the start (loss None; step is where a resumed
        run picks up) and after every optimizer step with that step's mean answer-token loss.
    metadata: free-form facts recorded under "extra" in clinqa_adapter.json; its "control" flag
        (a control adapter trained on non-specialty data) is recorded at the top level.
    checkpoint_every: optimizer steps between checkpoints (there is always one after every epoch).
    keep_checkpoint: keep out_dir/checkpoint/ (optimizer state: about 3x the adapter) after finishing.

    A KeyboardInterrupt or kill leaves the last checkpoint; calling again with the same arguments
    resumes from it. A folder with a finished adapter is returned as it is.
    """
    from peft import LoraConfig, get_peft_model

    config = config or LoraTrainConfig()
    out_dir = Path(out_dir)
    if checkpoint_every < 1:
        raise ClinqaError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    qs, labels = _prepare_questions(questions, config)
    if len(qs) < 1:
        raise ClinqaError("no questions to train on")
    base_desc = ({"spec": str(base), "name": None} if isinstance(base, (str, Path))
                 else {"spec": getattr(getattr(base, "info", None), "spec", type(base).__name__),
                       "name": getattr(getattr(base, "info", None), "name", None)})
    identity = {"config": config.identity(), "base": {"spec": base_desc["spec"]}, "data_fingerprint": _fingerprint(qs, labels)}
    init_weights, init_info = None, None
    if init_adapter is not None:
        init_weights, init_info = _read_init_adapter(Path(init_adapter), config)
        identity["init_adapter"] = init_info["sha256"]  # its weights, wherever the folder lives

    # -- an existing folder: finished, resumable, or someone else's --------------------------------
    if _is_finished(out_dir):
        meta = load_adapter_metadata(out_dir)
        _check_identity(out_dir, meta, identity, "a finished adapter")
        (out_dir / TRAIN_FILE).unlink(missing_ok=True)  # left over if a kill came right after finishing
        return AdapterResult(out_dir, meta, cached=True)
    train_file = out_dir / TRAIN_FILE
    if train_file.is_file():
        _check_identity(out_dir, json.loads(train_file.read_text()), identity, "an unfinished training run")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ClinqaError(f"{out_dir} exists and is not a clinqa adapter folder: choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not train_file.is_file():
        _atomic_write_text(train_file, json.dumps({**identity, "started_at": _now()}, indent=2))

    train_q, val_q = split_train_val(qs, config.val_fraction, config.seed)
    if not train_q:
        raise ClinqaError("no training questions left after holding out the validation set")

    with torch.inference_mode(False), torch.enable_grad():
        quantization = _resolve_quantization(config.quantization)
        model, tokenizer, base_info, quantization = _fresh_model(base, quantization, config.quantization)
        base_info["name"] = base_info.get("name") or base_desc["name"]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_ex = build_examples(tokenizer, train_q, config)
        val_ex = build_examples(tokenizer, val_q, config)
        base_info.update(n_params=sum(p.numel() for p in model.parameters()),
                         n_layers=getattr(model.config, "num_hidden_layers", None),
                         hidden_size=getattr(model.config, "hidden_size", None))

        targets = config.target_modules or find_target_modules(model)
        _seed_all(config.seed)  # LoRA A is initialised from torch's RNG
        lora_cfg = LoraConfig(r=int(config.rank), lora_alpha=config.alpha, lora_dropout=config.dropout,
                              target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                peft_model = get_peft_model(model, lora_cfg)
        except ValueError as exc:
            raise ClinqaError(f"could not attach LoRA to modules {targets}: {exc}") from exc
        if init_weights is not None:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(peft_model, init_weights)
            missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
            if missing:
                raise ClinqaError(f"starting adapter {init_adapter} does not cover this model's LoRA layers "
                                  f"(e.g. {missing[0]}): was it trained on another base model or target modules?")
        if quantization != "4bit":
            peft_model.to(device)
        if config.gradient_checkpointing:
            fix_mmap_threshold()
            # non-reentrant: works with a frozen embedding layer and replays dropout's RNG state
            inner = peft_model.get_base_model()
            if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x name
                inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        causal_lm = peft_model.get_base_model()
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        n_trainable = sum(p.numel() for p in params.values())

        n_batches = math.ceil(len(train_ex) / config.batch_size)
        steps_per_epoch = math.ceil(n_batches / config.grad_accum)
        total_steps = steps_per_epoch * config.epochs
        warmup = math.ceil(config.warmup_fraction * total_steps)

        def lr_lambda(s: int) -> float:
            up = (s + 1) / max(1, warmup)
            down = (total_steps - s) / max(1, total_steps - warmup)
            return max(0.0, min(1.0, up, down))

        optimizer = torch.optim.AdamW(list(params.values()), lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

        state: dict[str, Any] = {
            "format": 1, "epoch": 0, "next_batch": 0, "step": 0, "best_val": None, "best_epoch": None,
            "bad_epochs": 0, "history": [], "initial_val_loss": None, "epoch_loss_sum": 0.0, "epoch_tokens": 0,
            "train_seconds": 0.0, "step_seconds": 0.0, "train_tokens": 0, "done": False, "stopped_early": False,
            "best_adapter": None, "resumes": 0,
        }
        ckpt_path = out_dir / CHECKPOINT_DIR / CHECKPOINT_FILE
        resumed_from = None
        if ckpt_path.is_file():
            saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            _check_identity(out_dir, saved["identity"], identity, "a checkpoint")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved["adapter"][n])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            _set_rng_state(saved["rng"])
            state.update({k: saved[k] for k in state if k in saved})
            state["resumes"] += 1
            resumed_from = state["step"]
        else:
            state["initial_val_loss"] = _mean_loss(causal_lm, val_ex, config.batch_size, pad_id, device)

        def save_checkpoint() -> None:
            _atomic_torch_save({
                **state, "identity": identity,
                "adapter": {n: p.detach().to("cpu", copy=True) for n, p in params.items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
            }, ckpt_path)
            _atomic_write_text(ckpt_path.with_name("progress.json"), json.dumps(
                {k: state[k] for k in ("epoch", "next_batch", "step", "best_val", "best_epoch", "history")}
                | {"total_steps": total_steps, "saved_at": _now()}, indent=2))

        if progress:
            progress(state["step"], total_steps, None)
        t_run = time.perf_counter()
        seconds_before = state["train_seconds"]
        peft_model.train()
        while not state["done"] and state["epoch"] < config.epochs:
            epoch = state["epoch"]
            batches = _epoch_batches([len(e["input_ids"]) for e in train_ex], config.batch_size, config.seed, epoch)
            groups = [batches[i:i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
            group_starts = list(range(0, len(batches), config.grad_accum))
            for g, (start, group) in enumerate(zip(group_starts, groups)):
                if start < state["next_batch"]:
                    continue  # done before the checkpoint we resumed from
                t_step = time.perf_counter()
                micro = [[train_ex[i] for i in b] for b in group]
                group_tokens = sum(sum(1 for t in e["labels"][1:] if t != IGNORE) for mb in micro for e in mb)
                step_loss, step_tokens = 0.0, 0
                for mb in micro:
                    ids, attn, labels_t = _collate(mb, pad_id, device)
                    loss_sum, n_tok = _answer_loss_sum(causal_lm, ids, attn, labels_t)
                    (loss_sum / max(group_tokens, 1)).backward()
                    step_loss += float(loss_sum.detach())
                    step_tokens += n_tok
                    state["train_tokens"] += int(attn.sum())
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["next_batch"] = start + len(group)
                state["epoch_loss_sum"] += step_loss
                state["epoch_tokens"] += step_tokens
                state["step_seconds"] += time.perf_counter() - t_step
                last_of_epoch = g == len(groups) - 1
                if not last_of_epoch and state["step"] % checkpoint_every == 0:
                    state["train_seconds"] = seconds_before + time.perf_counter() - t_run
                    save_checkpoint()
                if progress:
                    progress(state["step"], total_steps, step_loss / max(step_tokens, 1))

            # end of epoch: validation, best adapter, early stopping, checkpoint
            val_loss = _mean_loss(causal_lm, val_ex, config.batch_size, pad_id, device)
            train_loss = state["epoch_loss_sum"] / max(state["epoch_tokens"], 1)
            state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "step": state["step"]})
            if _record_epoch(state, epoch + 1, val_loss, config.patience):
                state["best_adapter"] = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
            state.update(epoch=epoch + 1, next_batch=0, epoch_loss_sum=0.0, epoch_tokens=0)
            if state["epoch"] >= config.epochs:
                state["done"] = True
            state["train_seconds"] = seconds_before + time.perf_counter() - t_run
            save_checkpoint()

        # -- final adapter: the best epoch's weights ---------------------------------------------------
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["best_adapter"][n])
        tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out_dir))
        try:
            peft_model.save_pretrained(str(tmp), safe_serialization=True)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                os.replace(tmp / name, out_dir / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    extra = dict(metadata or {})
    meta = {
        "format": 1,
        "kind": "lora",
        "base": {**base_info, "spec": base_desc["spec"]},
        "config": config.to_dict(),
        "quantization": "qlora-4bit" if quantization == "4bit" else "none",
        "device": str(device),
        "target_modules": list(targets),
        "data_fingerprint": identity["data_fingerprint"],
        "init_adapter": init_info,
        "specialties": labels,
        "control": bool(extra.get("control", False)),
        "n_train": len(train_q),
        "n_val": len(val_q),
        "train_ids": [q.id for q in train_q],
        "val_ids": [q.id for q in val_q],
        "prompt_format": config.prompt_format,
        "history": state["history"],
        "initial_val_loss": state["initial_val_loss"],
        "best_epoch": state["best_epoch"],
        "best_val_loss": state["best_val"],
        "stopped_early": state["stopped_early"],
        "epochs_run": len(state["history"]),
        "steps": state["step"],
        "total_steps": total_steps,
        "train_seconds": round(state["train_seconds"], 3),
        "train_tokens": state["train_tokens"],
        "tokens_per_second": round(state["train_tokens"] / state["step_seconds"], 1) if state["step_seconds"] else None,
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "trainable_params": n_trainable,
        "resumes": state["resumes"],
        "clinqa_version": _versions()["clinqa"],
        "versions": _versions(),
        "created_at": _now(),
        "extra": extra,
    }
    _atomic_write_text(out_dir / METADATA_FILE, json.dumps(meta, indent=2, default=str))
    train_file.unlink(missing_ok=True)
    if not keep_checkpoint:
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    del peft_model, causal_lm, model, optimizer
    return AdapterResult(out_dir, meta, cached=False, resumed_from=resumed_from)


def answer_loss(predictor, questions: Sequence[Question], config: LoraTrainConfig | None = None, batch_size: int = 8) -> float | None:
    """Mean answer-token cross-entropy of a LocalModel (with its adapter, if a view has one) on
    `questions`, exactly as `finetune` computes its validation loss. None for no questions."""
    from clinqa.models.local import LocalModel

    if not isinstance(predictor, LocalModel):
        raise ClinqaError("answer_loss needs a local model backend (a LocalModel)")
    config = config or LoraTrainConfig()
    tok = predictor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = build_examples(tok, questions, config)
    device = next(predictor.model.parameters()).device
    with predictor._adapter_scope():
        return _mean_loss(predictor.model, examples, batch_size, pad_id, device)


# --------------------------------------------------------------------------------------------------
# Reading adapters, and the +lora: modifier


def load_adapter_metadata(path: str | Path) -> dict[str, Any]:
    """The clinqa_adapter.json of an adapter folder trained by `finetune`."""
    path = Path(path)
    if not path.is_dir():
        raise ClinqaError(f"no such LoRA adapter folder: {path}")
    f = path / METADATA_FILE
    if not f.is_file():
        raise ClinqaError(f"{path} has no {METADATA_FILE}: not a finished clinqa adapter (train one with clinqa.adapt.lora.finetune)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ClinqaError(f"{f} is not valid JSON: {exc}") from exc


def apply_modifier(predictor, modifier):
    """`+lora:PATH[@name=NAME]`: load the adapter folder into a local model and use it.

    Adapters share the base weights: several `+lora:` specs on one loaded model cost one copy of it.
    """
    from clinqa.models.local import LocalModel

    unknown = set(modifier.params) - {"name"}
    if unknown:
        raise ClinqaError(f"unknown parameter(s) {', '.join(sorted(unknown))} for {modifier}: lora takes only @name=NAME")
    path = Path(modifier.target).expanduser()
    if not path.exists():
        raise ClinqaError(f"no such LoRA adapter folder: {modifier.target} (train one with `clinqa finetune`)")
    if not path.is_dir() or not (path / "adapter_config.json").is_file():
        raise ClinqaError(f"{modifier.target} is not a LoRA adapter folder (no adapter_config.json)")
    if not isinstance(predictor, LocalModel):
        backend = getattr(getattr(predictor, "info", None), "backend", type(predictor).__name__)
        raise ClinqaError(f"LoRA adapters need a local model backend (a model folder, a .gguf file or 'default'), not {backend}; "
                          "put +lora: first, before modifiers that wrap the model")
    if predictor.adapter is not None:
        raise ClinqaError(f"one LoRA adapter per model spec: {predictor.info.spec} already uses {predictor.adapter!r}")
    if (path / METADATA_FILE).is_file():
        trained_on = load_adapter_metadata(path).get("base", {})
        for key in ("hidden_size", "n_layers"):
            want, have = trained_on.get(key), getattr(predictor.info, key, None)
            if want is not None and have is not None and want != have:
                raise ClinqaError(f"adapter {modifier.target} was trained on {trained_on.get('name') or trained_on.get('spec')} "
                                  f"({key} {want}); this model ({predictor.info.name}) has {key} {have}")
    try:
        view = predictor.load_adapter(path, name=modifier.params.get("name"))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ClinqaError(f"could not load LoRA adapter {modifier.target} into {predictor.info.name}: {exc}") from exc
    view.info = dataclasses.replace(view.info, spec=f"{predictor.info.spec}+{modifier}")  # runs record which adapter answered
    return view
