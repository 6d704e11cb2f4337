"""Training data for LoRA: (prompt, answer) examples tokenised the way scoring tokenises them, the
train/validation split, specialty balancing, the collator and the epoch sampler the Trainer uses,
and the answer-only loss."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from clinqa.adapt.lora_config import IGNORE, LoraTrainConfig
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate.prompts import cloze_prompt, letter_prompt


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
        ctx = list(ctx)[-(config.max_length - len(target)) :]
        if not ctx:  # an empty prompt is conditioned on BOS/EOS, as in scoring
            ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]
        out.append({"id": q.id, "input_ids": ctx + target, "labels": [IGNORE] * len(ctx) + target})
    return out


def balance_by_specialty(
    questions_by_specialty: Mapping[str, Sequence[Question]], seed: int = 0
) -> dict[str, list[Question]]:
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
    return [q for i, q in enumerate(questions) if i not in val_idx], [
        q for i, q in enumerate(questions) if i in val_idx
    ]


def _resolve_label(label: str) -> str:
    from clinqa.specialties.taxonomy import resolve_specialty

    try:
        return resolve_specialty(label)
    except ClinqaError:
        return label  # e.g. "control": kept as given


def prepare_questions(questions, config: LoraTrainConfig) -> tuple[list[Example], list[str]]:
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
    seen: dict[str, Example] = {}
    for qs in groups.values():
        for q in qs:
            seen.setdefault(q.id, q)
    return list(seen.values()), list(groups)


_QUESTION_FIELDS = ("question", "options", "answer", "contexts")
_TEXT_FIELDS = ("prompt", "target", "system", "chat")


def data_fingerprint(questions: Sequence[Example]) -> dict[str, Any]:
    """The run store's fingerprint of the training questions (`clinqa.runs.fingerprint`: a hash per
    question and field, in their order, which decides the batches), so a changed, added, missing or
    moved question is named: "1 training questions differ, first: q03 answer"."""
    from clinqa.runs import fingerprint as run_fingerprint

    kinds = {isinstance(q, TextExample) for q in questions}
    fields = (_TEXT_FIELDS if True in kinds else ()) + (_QUESTION_FIELDS if False in kinds else ())

    def values(q: Example) -> dict[str, Any]:
        if isinstance(q, TextExample):
            got = {"prompt": q.prompt, "target": q.target, "system": q.system, "chat": q.chat}
        else:
            got = {"question": q.question, "options": q.options, "answer": q.answer, "contexts": q.meta.get("contexts")}
        return {f: got.get(f) for f in fields}

    return run_fingerprint(((q.id, values(q)) for q in questions), noun="training questions")


def fingerprint(questions: Sequence[Example], labels: Sequence[str]) -> str:
    """A hash of the training data (ids and content, order-free) and its labels: the identity adapter
    folders held before they were run folders (`data_fingerprint` in clinqa_adapter.json)."""
    rows = sorted(
        json.dumps(
            [q.id, q.prompt, q.target, q.system, q.chat]
            if isinstance(q, TextExample)
            else [q.id, q.question, q.options, q.answer, q.meta.get("contexts")],
            sort_keys=True,
            default=str,
        )
        for q in questions
    )
    return hashlib.sha256(json.dumps([rows, sorted(labels)]).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# What the Trainer consumes


class AnswerCollator:
    """Pads a list of `build_examples` rows on the right: input_ids (pad), attention_mask (0), labels (-100)."""

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            attn[row, :n] = 1
            labels[row, :n] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group: int = 16) -> list[list[int]]:
    """This epoch's batches, a function of (seed, epoch) only, so a resumed run replays them.

    Shuffled, then grouped by length (as transformers' `group_by_length`): each run of
    `group` x batch_size shuffled examples is sorted by length and cut into batches, and the order of
    the full batches is shuffled again; a short last batch stays last. Less padding, still random."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    span = group * batch_size
    batches = []
    for start in range(0, len(perm), span):
        chunk = sorted(perm[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    short = [b for b in batches if len(b) < batch_size]
    full = [b for b in batches if len(b) == batch_size]
    order = torch.randperm(len(full), generator=gen).tolist()
    return [full[i] for i in order] + short


class EpochSampler(torch.utils.data.Sampler):
    """The Trainer's training sampler: `epoch_batches` flattened, so the DataLoader's consecutive
    `batch_size` chunks are those batches. The Trainer (and accelerate, through its data-parallel
    shards) calls `set_epoch` before every epoch, including the one a resumed run starts in."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), int(batch_size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        for batch in epoch_batches(self.lengths, self.batch_size, self.seed, self.epoch):
            yield from batch


# --------------------------------------------------------------------------------------------------
# The loss


def answer_loss_sum(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over answer tokens (the positions whose next label is not -100).

    The LM head runs only at the positions that predict an answer token (a few per example), not over
    the whole vocabulary at every prompt position: transformers' `logits_to_keep` with a boolean
    mask where the model takes one (transformers >= 5), the full logits otherwise. `model` may be
    wrapped (PEFT, DDP): it is called, never taken apart, so data-parallel gradients synchronise."""
    mask = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][mask]
    logits = None
    if _takes_logits_mask(model):
        keep = torch.nn.functional.pad(mask, (0, 1))  # position i predicts token i + 1
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
        if out.dim() == 2 and out.shape[0] == targets.numel():
            logits = out
        else:  # this model slices its hidden states the old way: remember, and never ask again
            _NO_MASK.add(_model_class(model))
    if logits is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][mask]
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, int(targets.numel())


_NO_MASK: set[type] = set()


def _model_class(model) -> type:
    inner = getattr(model, "module", model)  # DDP
    get_base = getattr(inner, "get_base_model", None)  # PEFT
    return type(get_base() if callable(get_base) else inner)


def _takes_logits_mask(model) -> bool:
    import inspect

    cls = _model_class(model)
    if cls in _NO_MASK:
        return False
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401  (boolean masks: transformers >= 5)
    except ImportError:
        return False
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def mean_answer_loss(
    model, examples: Sequence[dict], batch_size: int, pad_id: int, device, autocast=None
) -> float | None:
    """Mean answer-token cross-entropy of `model` on `examples` (the validation loss), batched by length."""
    import contextlib

    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    collate = AnswerCollator(pad_id)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    with torch.no_grad(), (autocast or contextlib.nullcontext)():
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start : start + batch_size]])
            loss, n = answer_loss_sum(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")))
            total += float(loss)
            count += n
    model.train(was_training)
    return total / max(count, 1)
