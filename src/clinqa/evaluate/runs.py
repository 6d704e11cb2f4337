"""Runs on disk: a folder with run.json (config, versions, git hash, timings) and samples.jsonl.

Samples are appended and fsynced per finished batch, so a killed run loses at most one batch and
re-running the same command resumes. A run is identified by its config: a different config pointed
at the same folder is refused rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from clinqa.errors import ClinqaError
from clinqa.jsonl import read_appended
from clinqa.evaluate.sample import Sample

RUN_FILE = "run.json"
SAMPLES_FILE = "samples.jsonl"


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

            rt = {"device": "server", "dtype": "server"} if self.model.startswith("openai:") else current_runtime().identity()
            object.__setattr__(self, "device", self.device or rt["device"])
            object.__setattr__(self, "dtype", self.dtype or rt["dtype"])

    def identity(self) -> str:
        """Hash of the fields that change results (batch size etc. are not part of a config). Runs on
        the CPU in float32 hash as before device and dtype were recorded, so they still resume."""
        cfg = dataclasses.asdict(self)
        if (cfg["device"], cfg["dtype"]) in (("cpu", "float32"), ("server", "server")):
            del cfg["device"], cfg["dtype"]
        blob = json.dumps(cfg, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("clinqa", "torch", "transformers", "peft", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def git_hash() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if r.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Run:
    """A run folder. Create or reopen with `Run.open(path, config)`; read with `Run.load(path)`."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @classmethod
    def open(cls, path: str | Path, config: EvalConfig | dict, kind: str = "eval") -> "Run":
        path = Path(path)
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        identity = config.identity() if isinstance(config, EvalConfig) else hashlib.sha256(
            json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
        run_file = path / RUN_FILE
        if run_file.exists():
            meta = json.loads(run_file.read_text())
            if meta.get("identity") != identity:
                diff = {k: (meta["config"].get(k), v) for k, v in json.loads(json.dumps(cfg, default=str)).items()
                        if meta["config"].get(k) != v}
                shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()) or "config differs"
                raise ClinqaError(f"{path} holds a run with a different config ({shown}): choose another --out folder")
            meta["resumed_at"] = meta.get("resumed_at", []) + [_now()]
        else:
            if path.exists() and any(path.iterdir()):
                raise ClinqaError(f"{path} exists and is not a clinqa run folder: choose another --out folder")
            path.mkdir(parents=True, exist_ok=True)
            meta = {"kind": kind, "identity": identity, "config": json.loads(json.dumps(cfg, default=str)),
                    "versions": _versions(), "git": git_hash(), "host": platform.node(), "started_at": _now(),
                    "finished_at": None, "counts": {}}
        run = cls(path, meta)
        run.save_meta()
        return run

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        path = Path(path)
        if not (path / RUN_FILE).is_file():
            raise ClinqaError(f"{path} is not a run folder (no {RUN_FILE})")
        return cls(path, json.loads((path / RUN_FILE).read_text()))

    def save_meta(self) -> None:
        tmp = self.path / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(self.meta, indent=2, default=str))
        os.replace(tmp, self.path / RUN_FILE)

    # -- samples --------------------------------------------------------------------------------
    def samples(self) -> list[Sample]:
        """All complete samples; a half-written last line (a kill mid-write) is dropped and repaired."""
        return read_appended(self.path / SAMPLES_FILE, Sample.model_validate_json,
                             corrupt="corrupt sample line; move the run folder aside and re-run")

    def append(self, samples: Iterable[Sample]) -> None:
        data = "".join(s.model_dump_json() + "\n" for s in samples)
        if not data:
            return
        with open(self.path / SAMPLES_FILE, "a", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self, **counts: Any) -> None:
        self.meta["finished_at"] = _now()
        self.meta["counts"].update(counts)
        self.save_meta()


def run_items(run: Run, items: Sequence, key: Callable[[Any], tuple], score_batch: Callable[[Sequence], list],
              batch_size: int = 16, progress: Callable[[int, int], None] | None = None) -> list:
    """Score the items not already in the run, batch by batch, appending as each batch finishes.

    `progress(done, total)` is called after the resume check and after every batch.
    """
    done = {s.key for s in run.samples()}
    todo = [it for it in items if key(it) not in done]
    total, finished = len(items), len(items) - len(todo)
    if progress:
        progress(finished, total)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        t0 = time.perf_counter()
        samples = score_batch(batch)
        run.meta["compute_s"] = run.meta.get("compute_s", 0.0) + time.perf_counter() - t0
        run.append(samples)
        finished += len(batch)
        if progress:
            progress(finished, total)
    run.save_meta()
    return run.samples()
