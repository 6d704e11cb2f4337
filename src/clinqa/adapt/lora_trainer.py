"""LoRA training with transformers' `Trainer`: the answer-only loss, the seeded length-grouped epoch
order, validation loss and early stopping, checkpoints that resume to the same weights, the
progress callback, and data parallelism under `accelerate launch` / `torchrun`.

What the Trainer does for us: AdamW, the linear warmup/decay schedule, gradient clipping and
accumulation, mixed precision (bf16/fp16 autocast with fp32 LoRA weights), gradient checkpointing,
DDP over several processes, and checkpoints holding the adapter, optimizer, scheduler, RNG states
(every process's) and its own state, which `resume_from_checkpoint` restores. What clinqa adds:
- `compute_loss`: the summed cross-entropy over answer tokens divided by the number of answer
  tokens in the whole optimizer step (all micro-batches, all processes: the Trainer's
  `num_items_in_batch`), so the gradient is that of the mean answer-token loss whatever the
  accumulation or the number of devices;
- `_get_train_sampler`: an epoch order that is a function of (seed, epoch) alone, so a resumed run
  replays the epoch it stopped in;
- `evaluate`: the mean answer-token loss on the held-out questions (the number early stopping and
  the best-epoch choice compare), computed the same way on every process;
- a callback that reports progress, asks for a checkpoint every `checkpoint_every` steps, keeps the
  history and cost counters, and writes them into each checkpoint (`clinqa_state.json`, written
  last: its presence marks a complete checkpoint).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from clinqa.adapt.lora_config import LoraTrainConfig, ProgressFn
from clinqa.adapt.lora_data import (
    AnswerCollator,
    EpochSampler,
    answer_loss_sum,
    mean_answer_loss,
)
from clinqa.errors import ClinqaError

BOOK_FILE = "clinqa_state.json"


class Book:
    """The numbers a training reports that the Trainer does not keep: per-epoch history, initial
    validation loss, tokens and seconds. Saved into every checkpoint, restored on resume."""

    SAVED = (
        "history",
        "initial_val_loss",
        "epoch_loss_sum",
        "epoch_tokens",
        "train_tokens",
        "step_seconds",
        "train_seconds",
        "resumes",
        "world_size",
    )

    def __init__(self, world_size: int = 1):
        self.history: list[dict[str, Any]] = []
        self.initial_val_loss: float | None = None
        self.epoch_loss_sum, self.epoch_tokens, self.train_tokens = 0.0, 0, 0
        self.step_seconds, self.train_seconds, self.resumes, self.world_size = 0.0, 0.0, 0, world_size
        self._step_loss = self._step_tokens = self._step_real = None  # device tensors between optimizer steps

    def add(self, loss_sum: torch.Tensor, n_answer: int, n_real: torch.Tensor) -> None:
        """One micro-batch's summed answer loss, answer tokens and real (non-pad) tokens."""
        loss_sum = loss_sum.detach().float()
        if self._step_loss is None:
            self._step_loss, self._step_tokens, self._step_real = loss_sum, n_answer, n_real.detach()
        else:
            self._step_loss, self._step_tokens, self._step_real = (
                self._step_loss + loss_sum,
                self._step_tokens + n_answer,
                self._step_real + n_real.detach(),
            )

    def end_step(self) -> float | None:
        """Close an optimizer step: its mean answer-token loss on this process."""
        if self._step_loss is None:
            return None
        loss, n, real = float(self._step_loss), self._step_tokens, int(self._step_real)
        self._step_loss = self._step_tokens = self._step_real = None
        self.epoch_loss_sum += loss
        self.epoch_tokens += n
        self.train_tokens += real
        return loss / max(n, 1)

    def end_epoch(self, epoch: int, step: int) -> None:
        loss_sum, tokens = _sum_over_processes([self.epoch_loss_sum, float(self.epoch_tokens)])
        self.history.append({"epoch": epoch, "train_loss": loss_sum / max(tokens, 1), "val_loss": None, "step": step})
        self.epoch_loss_sum, self.epoch_tokens = 0.0, 0

    def record_val(self, step: int, val_loss: float | None) -> None:
        if self.history and self.history[-1]["step"] == step:
            self.history[-1]["val_loss"] = val_loss

    def to_json(self, **overrides) -> str:
        return json.dumps({k: getattr(self, k) for k in self.SAVED} | overrides, indent=2)

    ADDITIVE = ("epoch_loss_sum", "epoch_tokens", "train_tokens")  # per process in memory, summed in a checkpoint

    def totals(self) -> dict[str, float]:
        """The additive counters summed over all processes (a collective: every process calls it)."""
        loss, tokens, real = _sum_over_processes(
            [self.epoch_loss_sum, float(self.epoch_tokens), float(self.train_tokens)]
        )
        return {"epoch_loss_sum": loss, "epoch_tokens": int(tokens), "train_tokens": int(real)}

    @classmethod
    def load(cls, path: Path) -> Book:
        book = cls()
        for k, v in json.loads(path.read_text()).items():
            if k in cls.SAVED:
                setattr(book, k, v)
        return book


def _sum_over_processes(values: Sequence[float]) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint-N folder (one whose clinqa_state.json was written)."""
    found = (
        [
            (int(m.group(1)), p)
            for p in folder.glob("checkpoint-*")
            if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / BOOK_FILE).is_file()
        ]
        if folder.is_dir()
        else []
    )
    return max(found)[1] if found else None


def _trainer_class():
    from transformers import Trainer

    class AnswerOnlyTrainer(Trainer):
        """transformers' Trainer with clinqa's loss, epoch order and validation loss (module docstring)."""

        def __init__(self, *args, book: Book, val_examples: list[dict], pad_id: int, sampler: EpochSampler, **kwargs):
            super().__init__(*args, **kwargs)
            self.book, self.val_examples, self.pad_id, self.epoch_sampler = book, val_examples, pad_id, sampler
            # the Trainer then counts the answer tokens of a whole optimizer step (num_items_in_batch),
            # and our loss, already divided by that count, is not divided again by the accumulation steps
            self.model_accepts_loss_kwargs = True
            self.loss_is_scaled_for_ga = True

        def _get_train_sampler(self, train_dataset=None):
            return self.epoch_sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss_sum, n = answer_loss_sum(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            self.book.add(loss_sum, n, inputs["attention_mask"].sum())
            if num_items_in_batch is None:  # not counted by the Trainer (evaluation paths): a per-batch mean
                loss = loss_sum / max(n, 1) / self.current_gradient_accumulation_steps
            else:
                loss = loss_sum / num_items_in_batch
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
            return (loss, None) if return_outputs else loss

        def validation_loss(self) -> float | None:
            model = self.accelerator.unwrap_model(self.model)
            with self.accelerator.autocast():
                return mean_answer_loss(
                    model, self.val_examples, self.args.per_device_eval_batch_size, self.pad_id, self.args.device
                )

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            val = self.validation_loss()
            self.book.record_val(self.state.global_step, val)
            metrics = {f"{metric_key_prefix}_loss": val, "epoch": self.state.epoch}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return AnswerOnlyTrainer


def _callback_class():
    from transformers import TrainerCallback

    class ClinqaCallback(TrainerCallback):
        """Progress, mid-epoch checkpoints every `checkpoint_every` steps, history and counters."""

        def __init__(
            self,
            book: Book,
            progress: ProgressFn | None,
            checkpoint_every: int,
            sampler: EpochSampler,
            on_saved: Callable[[list[dict[str, Any]]], None] | None = None,
        ):
            self.book, self.progress, self.every, self.sampler = book, progress, checkpoint_every, sampler
            self.on_saved = on_saved
            self.t_run = self.t_step = time.perf_counter()
            self.seconds_before = book.train_seconds

        def on_train_begin(self, args, state, control, **kwargs):
            self.t_run = time.perf_counter()
            self.seconds_before = self.book.train_seconds
            if self.progress and state.is_world_process_zero:
                self.progress(state.global_step, state.max_steps, None)

        def on_epoch_begin(self, args, state, control, **kwargs):
            # The Trainer's set_epoch does not reach a sampler under both a data-parallel shard and the
            # resumed run's batch skipper; the epoch a step count falls in is what the order depends on.
            self.sampler.set_epoch(state.global_step // _steps_per_epoch(args, state))

        def on_step_begin(self, args, state, control, **kwargs):
            self.t_step = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.book.step_seconds += time.perf_counter() - self.t_step
            loss = self.book.end_step()
            if state.global_step % self.every == 0 and state.global_step % _steps_per_epoch(args, state) != 0:
                control.should_save = True  # epoch ends are saved anyway (save_strategy="epoch")
            if self.progress and state.is_world_process_zero:
                self.progress(state.global_step, state.max_steps, loss)

        def on_epoch_end(self, args, state, control, **kwargs):
            self.book.end_epoch(round(state.epoch), state.global_step)

        def on_save(self, args, state, control, **kwargs):
            self.book.train_seconds = self.seconds_before + time.perf_counter() - self.t_run
            totals = self.book.totals()  # every process saves (on_save runs on all), so the collective is safe
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (folder / BOOK_FILE).write_text(self.book.to_json(**totals))  # last: marks the checkpoint complete
                if self.on_saved:  # the epochs in this checkpoint, never ahead of the newest complete one
                    self.on_saved(self.book.history)

        def on_train_end(self, args, state, control, **kwargs):
            self.book.train_seconds = self.seconds_before + time.perf_counter() - self.t_run

    return ClinqaCallback


def _steps_per_epoch(args, state) -> int:
    return max(1, state.max_steps // max(1, int(args.num_train_epochs)))


def training_arguments(
    config: LoraTrainConfig, output_dir: Path, *, device: str, precision: str, has_val: bool, warmup_steps: int
):
    """transformers.TrainingArguments for `config` (the mapping, one place)."""
    import dataclasses

    from transformers import TrainingArguments

    # transformers >= 5 calls gradient checkpointing "activation checkpointing" (the old name warns)
    ckpt = (
        "activation_checkpointing"
        if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
        else "gradient_checkpointing"
    )
    return TrainingArguments(
        **{
            ckpt: config.gradient_checkpointing,
            # non-reentrant: works with a frozen embedding layer and replays dropout's RNG state
            f"{ckpt}_kwargs": {"use_reentrant": False} if config.gradient_checkpointing else None,
        },
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps,
        optim="adamw_torch",
        seed=config.seed,
        data_seed=config.seed,
        bf16=precision == "bfloat16",
        fp16=precision == "float16",
        use_cpu=device == "cpu",
        eval_strategy="epoch" if has_val else "no",
        save_strategy="epoch",
        save_total_limit=2,  # the newest checkpoint and the best epoch's
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience counter
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        ddp_find_unused_parameters=False,
    )


def steps_per_epoch(n_train: int, config: LoraTrainConfig, world_size: int) -> int:
    """Optimizer steps in one epoch: batches per process (accelerate deals whole batches round-robin),
    grouped by the accumulation steps."""
    batches = math.ceil(math.ceil(n_train / config.batch_size) / world_size)
    return math.ceil(batches / config.grad_accum)


def train(
    peft_model,
    tokenizer,
    train_ex: list[dict],
    val_ex: list[dict],
    config: LoraTrainConfig,
    ckpt_dir: Path,
    *,
    device: str,
    precision: str,
    progress: ProgressFn | None,
    checkpoint_every: int,
    on_saved: Callable[[list[dict[str, Any]]], None] | None = None,
):
    """Train `peft_model` in place; the best epoch's weights are loaded at the end.
    `on_saved(history)` is called on the main process after every complete checkpoint with the
    per-epoch history so far ({"epoch", "train_loss", "val_loss", "step"} per finished epoch).
    Returns (trainer, book, resumed_from step or None)."""
    import os

    from transformers import EarlyStoppingCallback

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = steps_per_epoch(len(train_ex), config, world_size)
    warmup = math.ceil(config.warmup_fraction * per_epoch * config.epochs)
    args = training_arguments(
        config, ckpt_dir, device=device, precision=precision, has_val=bool(val_ex), warmup_steps=warmup
    )
    resume = latest_checkpoint(ckpt_dir)
    book = Book.load(resume / BOOK_FILE) if resume else Book(world_size)
    if resume and int(os.environ.get("RANK", "0")) != 0:
        for k in Book.ADDITIVE:  # the checkpoint holds the totals over all processes: count them once, on the main one
            setattr(book, k, 0.0 if k == "epoch_loss_sum" else 0)
    if resume and book.world_size != world_size:
        raise ClinqaError(
            f"{ckpt_dir} holds a checkpoint of a training on {book.world_size} process(es); this run has {world_size}: "
            f"resume it with {book.world_size}, or delete {ckpt_dir.parent} to start again"
        )
    sampler = EpochSampler([len(e["input_ids"]) for e in train_ex], config.batch_size, config.seed)
    callbacks = [_callback_class()(book, progress, checkpoint_every, sampler, on_saved)]
    if val_ex and config.patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=int(config.patience)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = _trainer_class()(
        model=peft_model,
        args=args,
        train_dataset=train_ex,
        eval_dataset=val_ex or None,
        data_collator=AnswerCollator(pad_id),
        callbacks=callbacks,
        book=book,
        val_examples=val_ex,
        pad_id=pad_id,
        sampler=sampler,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; progress goes through `progress`
    if resume:
        book.resumes += 1
    else:
        book.initial_val_loss = trainer.validation_loss()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    book.train_tokens = int(_sum_over_processes([float(book.train_tokens)])[0])
    return trainer, book, None if resume is None else _step_of(resume)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])
