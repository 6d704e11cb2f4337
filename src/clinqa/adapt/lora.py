"""LoRA fine-tuning on clinical questions, and the `+lora:` spec modifier.

PEFT's style: a config dataclass plus plain functions.

    from clinqa.adapt.lora import LoraTrainConfig, finetune
    questions = load_questions("bundled", specialties=["cardiology"]).questions
    result = finetune("default", questions, LoraTrainConfig(epochs=3), "adapters/cardio")
    # then evaluate `default+lora:adapters/cardio`

The pieces live in their own modules; this one is the public entry and re-exports their names:
- `lora_config`: `LoraTrainConfig` (everything that decides an adapter) and `AdapterResult`;
- `lora_data`: the examples (the loss is on the answer only: the prompt is one of the scoring
  prompts, tokenised exactly as `LocalModel.encode_pair` does, so training and scoring see the same
  token boundaries; the answer ends with EOS), `TextExample`, the split and balancing, the collator,
  the seeded epoch order and the answer-only loss;
- `lora_model`: the model trained (a fresh copy, never the caller's), device and precision, QLoRA,
  the target modules and the memory fixes;
- `lora_trainer`: the training itself, transformers' `Trainer` (AdamW, linear warmup and decay,
  gradient clipping, mixed precision, gradient checkpointing, data parallelism), deterministic for a
  seed and resumable: every `checkpoint_every` optimizer steps and after every epoch a checkpoint
  (adapter, optimizer, scheduler, RNG states, counters) goes to `out_dir/checkpoint/checkpoint-N/`;
  re-running the same call resumes from the newest and ends with the weights an uninterrupted run
  would have produced. Early stopping on the validation loss (mean per answer token) with
  `patience`; the adapter saved is the best epoch's;
- `lora_adapter`: the folder as a run folder (identity, upgrading older folders), its metadata,
  and the `+lora:` modifier.

Devices: the CPU in float32; a CUDA GPU with bf16 mixed precision (QLoRA when bitsandbytes is
installed); several GPUs by launching the same command under `accelerate launch` or `torchrun`
(docs/training.md). Cost on CPU (SmolLM2-135M, rank 32, batch 8 of ~60-token questions): about 2 MB
of activations per token in a batch on top of two copies of the weights, so batch_size x max_length
bounds memory; on a shared 2-core machine torch.set_num_threads(1) is several times faster than 2
threads (benchmarks/lora_train.py --threads).

Output: an adapter folder is a run folder of the one run store (`clinqa.runs.RunFolder`, kind
"lora"): `run.json` (the identity config from `lora_adapter.run_config`: the training settings, base
model spec, starting adapter's hash and labels; the training questions' fingerprint; versions, git,
host, times, compute) and `samples.jsonl` (one `TrainingEpoch` per finished epoch, appended as its
checkpoint completes); the same call resumes it, anything else is refused by the store naming what
differs. Then PEFT's `adapter_config.json` + `adapter_model.safetensors`, and `clinqa_adapter.json`
(what it was trained on and how, and what it cost), written last, so its presence marks a finished
folder, which `finetune` returns at once. Folders written before (no run.json) are upgraded when
they match and refused otherwise (`lora_adapter.adopt_legacy`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinqa.adapt.lora_adapter import (
    CHECKPOINT_DIR,
    COUNTS,
    METADATA_FILE,
    apply_modifier,
    atomic_write_text,
    is_finished,
    load_adapter_metadata,
    now,
    open_adapter_run,
    read_init_adapter,
    run_config,
    versions,
)
from clinqa.adapt.lora_config import (
    AdapterResult,
    LoraTrainConfig,
    ProgressFn,
    TrainingEpoch,
    identity_config,
)
from clinqa.adapt.lora_data import (
    Example,
    TextExample,
    balance_by_specialty,
    build_examples,
    data_fingerprint,
    fingerprint,
    mean_answer_loss,
    prepare_questions,
    split_train_val,
)
from clinqa.adapt.lora_model import (
    attach_lora,
    find_target_modules,
    fix_mmap_threshold,
    fresh_model,
    resolve_device,
    resolve_precision,
    resolve_quantization,
)
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError

__all__ = [
    "METADATA_FILE",
    "AdapterResult",
    "LoraTrainConfig",
    "TextExample",
    "answer_loss",
    "apply_modifier",
    "balance_by_specialty",
    "build_examples",
    "find_target_modules",
    "finetune",
    "fix_mmap_threshold",
    "identity_config",
    "load_adapter_metadata",
    "split_train_val",
]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def _main_process_first(device: str | None):
    """Under several processes (accelerate launch / torchrun): the main process runs the block first,
    the others after it; a single process just runs it."""
    if not _distributed():
        yield
        return
    from accelerate import PartialState

    with PartialState(cpu=resolve_device(device) == "cpu").main_process_first():
        yield


def _record_epochs(run, history: Sequence[Mapping[str, Any]]) -> None:
    """Append the finished epochs not yet in the run's samples.jsonl (a resumed run replays an epoch
    whose checkpoint was not complete; its line is written once)."""
    done = run.done_keys(lambda e: e.epoch)
    run.append(
        TrainingEpoch(epoch=h["epoch"], step=h["step"], train_loss=h["train_loss"], val_loss=h["val_loss"])
        for h in history
        if h["epoch"] not in done
    )


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _holding_folder_lock(fn):
    """One writer per adapter folder: a second `clinqa finetune --out SAME` gets a one-line error. Under
    several processes of one launch only the main one takes the lock; the others follow its lead."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        from clinqa.runs import lock_path

        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        lock = lock_path(bound.arguments["out_dir"], folder=True) if _is_main_process() else contextlib.nullcontext()
        with lock:
            return fn(*args, **kwargs)

    return locked


@_holding_folder_lock
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
        afresh from the folder the spec resolves to; needed for QLoRA's 4-bit loading).
    questions: a list of `Question`s (multiple choice, prompted by `config.prompt_format`) and/or
        `TextExample`s (any prompt and target), or {specialty label: such a list} (the labels are
        recorded in the metadata and used by `balance`).
    init_adapter: an adapter folder (same rank and target modules) to start from instead of a fresh
        LoRA initialisation: training continues it on new data (sequential training, as in the
        records pipeline's forgetting experiment). Its weights' hash is part of the run's identity.
    progress(step, total_steps, loss): called once at the start (loss None; step is where a resumed
        run picks up) and after every optimizer step with that step's mean answer-token loss (on the
        main process only, under several).
    metadata: free-form facts recorded under "extra" in clinqa_adapter.json; its "control" flag
        (a control adapter trained on non-specialty data) is recorded at the top level.
    checkpoint_every: optimizer steps between checkpoints (there is always one after every epoch).
    keep_checkpoint: keep out_dir/checkpoint/ (optimizer state: about 3x the adapter) after finishing.

    A KeyboardInterrupt or kill leaves the last checkpoint; calling again with the same arguments
    resumes from it. A folder with a finished adapter is returned as it is. Under `accelerate
    launch` / `torchrun` every process calls this with the same arguments; the main process writes
    the folder, and every process returns the same result.
    """
    config = config or LoraTrainConfig()
    out_dir = Path(out_dir)
    if checkpoint_every < 1:
        raise ClinqaError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    qs, labels = prepare_questions(questions, config)
    if len(qs) < 1:
        raise ClinqaError("no questions to train on")
    base_desc = (
        {"spec": str(base), "name": None}
        if isinstance(base, (str, Path))
        else {
            "spec": getattr(getattr(base, "info", None), "spec", type(base).__name__),
            "name": getattr(getattr(base, "info", None), "name", None),
        }
    )
    init_weights, init_info = None, None
    if init_adapter is not None:
        init_weights, init_info = read_init_adapter(Path(init_adapter), config)
    legacy_data = fingerprint(qs, labels)  # what clinqa_adapter.json records, and folders written before held

    # -- the run folder (main process): created, resumed, upgraded from an older clinqa, or refused -----
    run = None
    with _main_process_first(config.device):
        if _is_main_process():
            cfg = run_config(config, base_desc["spec"], init_info and init_info["sha256"], labels)
            run = open_adapter_run(out_dir, cfg, data_fingerprint(qs), legacy_data)
    # (opened without its own lock: `_holding_folder_lock` holds the folder's; `run` is None elsewhere)
    if is_finished(out_dir):
        meta = load_adapter_metadata(out_dir)
        if run is not None:
            _record_epochs(run, meta.get("history") or [])  # an upgraded folder gets its epochs too
        return AdapterResult(out_dir, meta, cached=True)
    t0 = time.perf_counter()
    device = resolve_device(config.device)
    precision = resolve_precision(config.dtype, device)

    train_q, val_q = split_train_val(qs, config.val_fraction, config.seed)
    if not train_q:
        raise ClinqaError("no training questions left after holding out the validation set")

    from clinqa.adapt import lora_trainer

    with torch.inference_mode(False), torch.enable_grad():
        quantization = resolve_quantization(config.quantization, device)
        model, tokenizer, base_info, quantization = fresh_model(
            base, quantization, config.quantization, device, precision
        )
        base_info["name"] = base_info.get("name") or base_desc["name"]
        train_ex = build_examples(tokenizer, train_q, config)
        val_ex = build_examples(tokenizer, val_q, config)
        base_info.update(
            n_params=sum(p.numel() for p in model.parameters()),
            n_layers=getattr(model.config, "num_hidden_layers", None),
            hidden_size=getattr(model.config, "hidden_size", None),
        )
        targets = config.target_modules or find_target_modules(model)
        _seed_all(config.seed)  # LoRA A is initialised from torch's RNG
        peft_model = attach_lora(model, config, targets, init_weights, init_adapter)
        n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        if config.gradient_checkpointing:
            fix_mmap_threshold()
        try:
            trainer, book, resumed_from = lora_trainer.train(
                peft_model,
                tokenizer,
                train_ex,
                val_ex,
                config,
                out_dir / CHECKPOINT_DIR,
                device=device,
                precision=precision,
                progress=progress,
                checkpoint_every=checkpoint_every,
                on_saved=(lambda history: _record_epochs(run, history)) if run is not None else None,
            )
        except BaseException:
            if run is not None:  # a kill or Ctrl-C: the time spent is kept with the checkpoint
                run.add_compute(time.perf_counter() - t0)
                run.save_meta()
            raise
        train_device = str(trainer.args.device)
        world_size = trainer.args.world_size
        state = trainer.state
        # -- final adapter: the best epoch's weights (the Trainer loaded them at the end) -----------
        if _is_main_process():
            tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out_dir))
            try:
                trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(tmp), safe_serialization=True)
                for name in ("adapter_config.json", "adapter_model.safetensors"):
                    os.replace(tmp / name, out_dir / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    history = book.history
    vals = [h["val_loss"] for h in history if h["val_loss"] is not None]
    best = min(range(len(history)), key=lambda i: (history[i]["val_loss"], i)) if vals else len(history) - 1
    extra = dict(metadata or {})
    meta = {
        "format": 1,
        "kind": "lora",
        "trainer": "transformers.Trainer",
        "base": {**base_info, "spec": base_desc["spec"]},
        "config": config.to_dict(),
        "quantization": "qlora-4bit" if quantization == "4bit" else "none",
        "device": train_device,
        "precision": precision,
        "world_size": world_size,
        "target_modules": list(targets),
        "data_fingerprint": legacy_data,
        "init_adapter": init_info,
        "specialties": labels,
        "control": bool(extra.get("control", False)),
        "n_train": len(train_q),
        "n_val": len(val_q),
        "train_ids": [q.id for q in train_q],
        "val_ids": [q.id for q in val_q],
        "prompt_format": config.prompt_format,
        "history": history,
        "initial_val_loss": book.initial_val_loss,
        "best_epoch": history[best]["epoch"] if history else None,
        "best_val_loss": history[best]["val_loss"] if history else None,
        "stopped_early": len(history) < config.epochs,
        "epochs_run": len(history),
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "train_seconds": round(book.train_seconds, 3),
        "train_tokens": book.train_tokens,
        "tokens_per_second": round(book.train_tokens / book.step_seconds, 1) if book.step_seconds else None,
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "peak_gpu_memory_mb": (
            round(torch.cuda.max_memory_allocated() / 2**20, 1) if train_device.startswith("cuda") else None
        ),
        "trainable_params": n_trainable,
        "resumes": book.resumes,
        "clinqa_version": versions()["clinqa"],
        "versions": versions(),
        "created_at": now(),
        "extra": extra,
    }
    if run is not None:
        _record_epochs(run, history)
        run.add_compute(time.perf_counter() - t0)
        run.finish(**{k: meta[m] for k, m in COUNTS.items()})
        atomic_write_text(out_dir / METADATA_FILE, json.dumps(meta, indent=2, default=str))  # last: finished
        if not keep_checkpoint:
            shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()  # the other processes return once the folder is complete
    del trainer, peft_model, model
    return AdapterResult(out_dir, meta, cached=False, resumed_from=resumed_from)


def answer_loss(
    predictor, questions: Sequence[Question], config: LoraTrainConfig | None = None, batch_size: int = 8
) -> float | None:
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
        return mean_answer_loss(predictor.model, examples, batch_size, pad_id, device)
