"""Evaluation runs on disk: ``clinqa.runs.RunFolder`` of `Sample`s, identified by an `EvalConfig`
and the content of the questions (never their path).

Samples are appended and fsynced per finished batch, so a killed run loses at most one batch and
re-running the same command resumes. A different config or changed questions pointed at the same
folder are refused, saying what changed; a second process writing the same folder is refused by
the folder's lock. See docs/run-folders.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from clinqa.evaluate.sample import Sample
from clinqa.runs import RUN_FILE, SAMPLES_FILE, Progress, RunFolder, fingerprint, git_hash  # noqa: F401  (re-exported)
from clinqa.runs import now as _now  # noqa: F401  (kept for importers of the old name)
from clinqa.runs import versions as _versions  # noqa: F401


@dataclass(frozen=True)
class EvalConfig:
    """Everything that determines a run's results; serialised into run.json as it is."""

    model: str
    data: str
    method: str = "option"
    shuffles: int = 1
    seed: int = 0
    limit: int | None = None
    specialties: tuple[str, ...] = ()
    data_format: str | None = None
    skip_invalid: bool = False
    max_new_tokens: int = 128
    extra: dict[str, Any] = field(default_factory=dict)
    # where a local model ran (bf16 and fp32 predictions can differ); None: the current runtime's
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.device is None or self.dtype is None:
            from clinqa.models.runtime import current_runtime

            rt = (
                {"device": "server", "dtype": "server"}
                if self.model.startswith("openai:")
                else current_runtime().identity()
            )
            object.__setattr__(self, "device", self.device or rt["device"])
            object.__setattr__(self, "dtype", self.dtype or rt["dtype"])

    def identity(self) -> str:
        """The identity a run folder held before store version 2 (a hash of every field, the data
        path included); used to recognise and upgrade such folders. Such folders predate device and
        dtype, so a run on the CPU in float32 (or on a server) hashes without them."""
        cfg = dataclasses.asdict(self)
        if (cfg["device"], cfg["dtype"]) in (("cpu", "float32"), ("server", "server")):
            del cfg["device"], cfg["dtype"]
        blob = json.dumps(cfg, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


QUESTION_FIELDS = ("question", "options", "answer", "specialties", "source", "meta")


def questions_fingerprint(questions: Sequence) -> dict[str, Any]:
    """The content of the questions a run evaluates, per question and field (see clinqa.runs.fingerprint)."""
    return fingerprint(((q.id, {f: getattr(q, f) for f in QUESTION_FIELDS}) for q in questions), noun="questions")


def _without_data_path(cfg: dict) -> dict:
    cfg.pop("data", None)
    return cfg


class Run(RunFolder[Sample]):
    """A run folder of `Sample`s. Create or resume with `Run.open(path, config, questions=...)` (it holds
    the folder's lock until `close()` or the end of a `with` block); read with `Run.load(path)`."""

    def __init__(self, path: str | Path, meta: dict, sample_type: type = Sample, *, samples_file: str = SAMPLES_FILE):
        super().__init__(path, meta, sample_type, samples_file=samples_file)

    @classmethod
    def open(
        cls,
        path: str | Path,
        config: EvalConfig | dict,
        kind: str = "eval",
        *,  # type: ignore[override]
        questions: Sequence | None = None,
        lock: bool = True,
    ) -> Run:
        """With `questions`, the identity is the config without its data path plus the questions'
        content; without, the whole config (the data path included)."""
        legacy = (
            config.identity()
            if isinstance(config, EvalConfig)
            else hashlib.sha256(
                json.dumps(
                    dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
                    sort_keys=True,
                    default=str,
                ).encode()
            ).hexdigest()[:16]
        )
        data = questions_fingerprint(questions) if questions is not None else None
        return super().open(
            path,
            config,
            kind=kind,
            sample_type=Sample,
            data=data,
            identity_keys=_without_data_path if data is not None else None,
            legacy_identity=legacy,
            lock=lock,
        )

    @classmethod
    def load(cls, path: str | Path) -> Run:  # type: ignore[override]
        return super().load(path, Sample)


def run_items(
    run: Run,
    items: Sequence,
    key: Callable[[Any], tuple],
    score_batch: Callable[[Sequence], list],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list:
    """Score the items not already in the run, batch by batch, appending as each batch finishes.

    `progress(done, total)` is called after the resume check and after every batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    done = run.done_keys(lambda s: s.key)
    todo = [it for it in items if key(it) not in done]
    total, finished = len(items), len(items) - len(todo)
    if progress:
        progress(finished, total)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        t0 = time.perf_counter()
        samples = score_batch(batch)
        run.add_compute(time.perf_counter() - t0)
        run.append(samples)
        finished += len(batch)
        if progress:
            progress(finished, total)
    run.save_meta()
    return run.samples()
