"""The one run store: a resumable folder that cannot be corrupted by two writers or go stale.

A run folder holds

- ``run.json``: kind, store version, the config, the identity (a hash of what determines the results),
  the data fingerprint (a hash of every item's content, per item and field), package versions, git
  hash, host, timestamps and counts; always replaced atomically (write, fsync, rename);
- a samples file (``samples.jsonl`` unless told otherwise): one JSON line per finished sample of a
  pydantic model (or dataclass) type, appended and fsynced per batch, so a killed run loses at most
  one batch; a line torn by a kill is cut off on the next read (``clinqa.jsonl.read_appended``);
- ``.clinqa.lock`` while a process writes it (``clinqa.locks``, re-exported here): the owner's pid,
  host and start time, held with ``fcntl.flock``. A second writer gets a one-line ClinqaError; a lock
  file left by a process that died (SIGKILL, power loss) is taken over with a message. ``lock_path``
  locks any folder or file.

Reopening a folder with the same config and data resumes it; anything else is refused with what
changed, config keys and data items alike (``3 questions differ, first: card-007 answer``). The
data fingerprint holds the items' content, never their path, so the same questions given by another
path resume and an edited answer does not come back silently.

    with RunFolder.open(out, config, kind="eval", sample_type=Sample, data=fingerprint(items)) as run:
        done = run.done_keys(key)
        for batch in ...:
            run.append(score(batch))
        run.finish(samples=len(run.samples()))

Everything here depends only on the standard library, pydantic, ``clinqa.errors``, ``clinqa.jsonl``
and ``clinqa.locks``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable, Generic, Hashable, Iterable, Mapping, Protocol, Sequence, TypeVar

from pydantic import TypeAdapter

from clinqa.errors import ClinqaError
from clinqa.jsonl import read_appended
from clinqa.locks import LOCK_FILE, lock_file_for, lock_path, now  # lock names re-exported (see __all__)

RUN_FILE = "run.json"
SAMPLES_FILE = "samples.jsonl"
STORE_VERSION = 2  # 1 (implicit): run.json without "store"/"data"; identity was a hash of the config with the data path

S = TypeVar("S")


class Progress(Protocol):
    """The one progress callback: ``progress(done, total)`` or ``progress(done, total, note)``.

    ``note`` says what is being done (a stage, a method, the last loss); callers that have nothing to
    say leave it out, so a plain ``lambda done, total: ...`` works wherever no note is passed.
    """

    def __call__(self, done: int, total: int, note: str = "", /) -> None: ...


# ------------------------------------------------------------------------------------------ small parts


# what run folders and LoRA adapter metadata record (bitsandbytes: QLoRA's 4-bit base weights, GPU only)
VERSIONED_PACKAGES = ("clinqa", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "numpy", "pydantic")


def versions(packages: Sequence[str] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Python's and the installed packages' versions (those not installed are left out; clinqa run
    from a source tree that is not installed reports its ``__version__``)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            if pkg == "clinqa":
                import clinqa

                out[pkg] = clinqa.__version__
    return out


def git_hash() -> str | None:
    """The source tree's commit (``-dirty`` with uncommitted changes), or None outside a checkout."""
    try:
        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if r.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return r.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def plain(obj: Any) -> Any:
    """A config (dataclass, pydantic model, mapping) as plain JSON data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    elif hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def digest(obj: Any, n: int = 16) -> str:
    """A short sha256 of canonical JSON."""
    return hashlib.sha256(json.dumps(plain(obj), sort_keys=True).encode()).hexdigest()[:n]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` so a reader (or a kill) sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_lines(path: str | Path, lines: Iterable[str]) -> int:
    """Append whole lines (newline added) in one write, then fsync; returns how many were written."""
    rows = [line.rstrip("\n") + "\n" for line in lines]
    if rows:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("".join(rows))
            fh.flush()
            os.fsync(fh.fileno())
    return len(rows)


def check_writable(path: str | Path, *, folder: bool = True, what: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written: a file where a folder is wanted (or
    the reverse), a place inside a file, or a read-only folder. Creates nothing."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise ClinqaError(f"{what} {path} is a file, not a folder: choose a folder")
        if not folder and path.is_dir():
            raise ClinqaError(f"{what} {path} is a folder, not a file: choose a file name")
        place = path if path.is_dir() else path.parent
    else:
        place = path.parent
        while not place.exists() and place != place.parent:
            place = place.parent
        if not place.is_dir():
            raise ClinqaError(f"{what} {path}: {place} is a file, so nothing can be written under it")
    if not os.access(place, os.W_OK | os.X_OK):
        raise ClinqaError(f"{what} {path}: {place} is not writable: choose a writable place")
    return path


# ------------------------------------------------------------------------------------- data fingerprint


def fingerprint(items: Iterable[tuple[str, Mapping[str, Any]]], *, noun: str = "questions") -> dict[str, Any]:
    """A fingerprint of the data a run evaluates: ``[(item id, {field: value})]`` -> {"sha256", "n",
    "noun", "fields", "items": {id: "h1 h2 ..."}} with an 8-hex hash per field, so a changed item can
    be named with its field. Content only: the path the data came from is not part of it."""
    fields: list[str] | None = None
    per_item: dict[str, str] = {}
    whole = hashlib.sha256()
    for item_id, values in items:
        values = plain(dict(values))
        if fields is None:
            fields = list(values)
        hashes = " ".join(
            hashlib.sha256(json.dumps(values.get(f), sort_keys=True).encode()).hexdigest()[:8] for f in fields
        )
        item_id = str(item_id)
        per_item[item_id] = hashes
        whole.update(f"{item_id}\t{hashes}\n".encode())
    return {
        "sha256": whole.hexdigest()[:16],
        "n": len(per_item),
        "noun": noun,
        "fields": fields or [],
        "items": per_item,
    }


def describe_data_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two fingerprints, in words: "3 questions differ, first: card-007 answer"."""
    noun = new.get("noun") or old.get("noun") or "items"
    a, b = old.get("items") or {}, new.get("items") or {}
    parts = []
    changed = [k for k in b if k in a and a[k] != b[k]]
    if changed:
        fields_a, fields_b = old.get("fields") or [], new.get("fields") or []
        first = changed[0]
        ha, hb = a[first].split(" "), b[first].split(" ")
        which = [f for f, x, y in zip(fields_b, ha, hb) if x != y] if fields_a == fields_b else ["content"]
        parts.append(f"{len(changed)} {noun} differ, first: {first} {', '.join(which) or 'content'}")
    added = [k for k in b if k not in a]
    removed = [k for k in a if k not in b]
    if added:
        parts.append(f"{len(added)} {noun} added, first: {added[0]}")
    if removed:
        parts.append(f"{len(removed)} {noun} missing, first: {removed[0]}")
    if not parts and list(a) != list(b):
        parts.append(f"the {noun} are in another order")
    return "; ".join(parts) or f"the {noun} differ"


def data_change(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> str | None:
    """None if a run over `old` items may resume over `new` ones: every old item is still there with
    the same content (new items may be added: they are scored on resume); else what changed."""
    if not old or not new or old.get("sha256") == new.get("sha256"):
        return None
    a, b = old.get("items") or {}, new.get("items") or {}
    if old.get("fields") == new.get("fields") and all(k in b and b[k] == h for k, h in a.items()):
        return None
    return describe_data_change(old, new)


def describe_config_change(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every key (dotted into nested mappings) whose value differs."""
    out = []
    for k in list(old) + [k for k in new if k not in old]:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += describe_config_change(a, b, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# ------------------------------------------------------------------------------------------- the store


def _fresh_run_hint(path: Path) -> str:
    return f"to start a fresh run, choose another --out folder or delete {path}"


def read_meta(path: str | Path) -> dict:
    """run.json of a run folder, checked enough that a garbage or empty file is a one-line error."""
    path = Path(path)
    run_file = path / RUN_FILE
    if not path.exists():
        raise ClinqaError(f"{path} is not a run folder (it does not exist)")
    if not path.is_dir():
        raise ClinqaError(f"{path} is not a run folder (it is a file)")
    if not run_file.is_file():
        raise ClinqaError(f"{path} is not a run folder (no {RUN_FILE})")
    try:
        meta = json.loads(run_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClinqaError(
            f"{run_file}: not valid JSON ({str(exc).splitlines()[0]}): the file is damaged; "
            "re-run the command into a new folder"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or "identity" not in meta:
        raise ClinqaError(
            f"{run_file}: not a clinqa run description (no config/identity): re-run the command into a new folder"
        )
    meta.setdefault("counts", {})
    return meta


def read_json_object(path: str | Path) -> dict:
    """A JSON object from a file the store wrote, or a one-line error naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClinqaError(
            f"{path}: not valid JSON ({str(exc).splitlines()[0]}): move the folder aside and re-run"
        ) from None
    if not isinstance(obj, dict):
        raise ClinqaError(f"{path}: not a JSON object: move the folder aside and re-run")
    return obj


class RunFolder(Generic[S]):
    """A run folder of samples of type `S`. Create or resume with ``RunFolder.open``; read with ``load``.

    ``open`` takes the folder's lock and holds it until ``close()`` (or the end of a ``with`` block).
    """

    def __init__(self, path: str | Path, meta: dict, sample_type: type[S], *, samples_file: str = SAMPLES_FILE):
        self.path = Path(path)
        self.meta = meta
        self.sample_type = sample_type
        self.samples_file = samples_file
        self._adapter = TypeAdapter(sample_type)
        self._lock_cm = None
        self._writer = False  # opened with `open` (its lock, or the caller's): may repair a torn last line

    # -- opening ---------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        config: Any,
        *,
        kind: str,
        sample_type: type[S],
        data: Mapping[str, Any] | None = None,
        identity_keys: Callable[[dict], dict] | None = None,
        legacy_identity: str | None = None,
        samples_file: str = SAMPLES_FILE,
        what: str = "--out",
        lock: bool = True,
        data_may_grow: bool = True,
    ) -> RunFolder[S]:
        """Create the folder, or resume it if it holds the same run; refuse anything else.

        config: what determines the results (plain data, a dataclass or a pydantic model), kept in run.json.
        data: ``fingerprint(...)`` of the items the run evaluates: a changed or missing item is refused,
            added items are accepted (they are what a resume scores) unless `data_may_grow` is False
            (samples that summarise all items, like a sweep's accuracies, need exactly the same items).
        identity_keys: the part of the config that is the identity (default: all of it), e.g. without
            the data path, which `data` replaces.
        legacy_identity: the identity a folder written before store version 2 would hold for this
            run; such a folder resumes (and is upgraded) when it matches.
        """
        path = Path(path)
        cfg = plain(config)
        ident_cfg = identity_keys(dict(cfg)) if identity_keys else cfg
        identity = digest({"config": ident_cfg, "kind": kind})
        if path.exists() and not path.is_dir():
            raise ClinqaError(f"{what} {path} is a file, not a folder: choose a folder")
        if path.is_dir() and not (path / RUN_FILE).exists() and any(p.name != LOCK_FILE for p in path.iterdir()):
            raise ClinqaError(f"{what} {path} exists and is not a clinqa run folder: choose another {what} folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ClinqaError(f"{what} {path}: cannot create the folder ({exc.strerror or exc})") from None
        run = cls(path, {}, sample_type, samples_file=samples_file)
        run._writer = True
        if lock:
            run._lock_cm = lock_path(path, folder=True, what=what)
            run._lock_cm.__enter__()
        try:
            run.meta = run._open_meta(cfg, ident_cfg, identity, kind, data, legacy_identity, what, data_may_grow)
            run.save_meta()
        except BaseException:
            run.close()
            raise
        return run

    def _open_meta(self, cfg, ident_cfg, identity, kind, data, legacy_identity, what, data_may_grow=True) -> dict:
        path = self.path
        if not (path / RUN_FILE).exists():
            if any(p.name != LOCK_FILE for p in path.iterdir()):  # someone wrote there before we took the lock
                raise ClinqaError(f"{what} {path} exists and is not a clinqa run folder: choose another {what} folder")
            return {
                "kind": kind,
                "store": STORE_VERSION,
                "identity": identity,
                "config": cfg,
                "data": data,
                "versions": versions(),
                "git": git_hash(),
                "host": platform.node(),
                "started_at": now(),
                "finished_at": None,
                "counts": {},
            }
        meta = read_meta(path)
        if meta.get("store") is None:  # written before the data fingerprint: identity was a hash of the config
            if legacy_identity is None or meta.get("identity") != legacy_identity:
                old_cfg = meta.get("config") or {}
                # fields added since (device, dtype, ...) did not exist then: compare what the old config had
                diffs = describe_config_change(
                    old_cfg, {k: v for k, v in cfg.items() if k in old_cfg} if old_cfg else cfg
                )
                raise ClinqaError(
                    f"{path} holds a run written by an older clinqa with a different config "
                    f"({'; '.join(diffs) or 'its identity differs'}): {_fresh_run_hint(path)}"
                )
            meta.update(store=STORE_VERSION, identity=identity, data=data, kind=meta.get("kind", kind))
            meta["migrated_at"] = now()
        else:
            problems = []
            if meta.get("identity") != identity:
                outside = set(cfg) - set(ident_cfg)  # e.g. the data path: its content is compared instead
                old_cfg = {k: v for k, v in (meta.get("config") or {}).items() if k not in outside}
                diffs = describe_config_change(old_cfg, ident_cfg)
                if meta.get("kind") != kind:
                    diffs.insert(0, f"kind: {meta.get('kind')!r} -> {kind!r}")
                problems.append(f"a different config ({'; '.join(diffs) or 'its identity differs'})")
            change = data_change(meta.get("data"), data)
            if (
                not change
                and not data_may_grow
                and data
                and (meta.get("data") or {}).get("sha256") != data.get("sha256")
            ):
                change = describe_data_change(meta.get("data") or {}, data)
            if change:
                problems.append(f"other data ({change})")
            if problems:
                raise ClinqaError(f"{path} holds a run with {' and '.join(problems)}: {_fresh_run_hint(path)}")
            if data is not None:
                meta["data"] = data  # the same items, maybe more of them
        meta["resumed_at"] = meta.get("resumed_at", []) + [now()]
        meta.setdefault("counts", {})
        return meta

    @classmethod
    def load(cls, path: str | Path, sample_type: type[S], *, samples_file: str = SAMPLES_FILE) -> RunFolder[S]:
        """Read a run folder (no lock: reading never blocks a writer)."""
        return cls(path, read_meta(path), sample_type, samples_file=samples_file)

    def close(self) -> None:
        """Release the lock (idempotent); the folder is read-only to this object from now on."""
        self._writer = False
        cm, self._lock_cm = self._lock_cm, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def __enter__(self) -> RunFolder[S]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- metadata --------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self.meta["config"]

    def save_meta(self) -> None:
        atomic_write_text(self.path / RUN_FILE, json.dumps(self.meta, indent=2, default=str))

    def finish(self, **counts: Any) -> None:
        self.meta["finished_at"] = now()
        self.meta.setdefault("counts", {}).update(counts)
        self.save_meta()

    def add_compute(self, seconds: float) -> None:
        self.meta["compute_s"] = self.meta.get("compute_s", 0.0) + seconds

    # -- samples ---------------------------------------------------------------------------------------
    def samples(self) -> list[S]:
        """All complete samples; a half-written last line (a kill mid-write) is dropped, and cut off the
        file when the folder was opened for writing (``open``), so the next append starts a whole line."""
        return read_appended(
            self.path / self.samples_file,
            self._adapter.validate_json,
            corrupt="corrupt sample line; move the run folder aside and re-run",
            repair=self._writer,
        )

    def done_keys(self, key: Callable[[S], Hashable]) -> set:
        return {key(s) for s in self.samples()}

    def append(self, samples: Iterable[S]) -> int:
        """Append finished samples as one fsynced write; returns how many."""
        return append_lines(self.path / self.samples_file, (self._adapter.dump_json(s).decode() for s in samples))


__all__ = [
    "LOCK_FILE",
    "RUN_FILE",
    "SAMPLES_FILE",
    "STORE_VERSION",
    "Progress",
    "RunFolder",
    "append_lines",
    "atomic_write_text",
    "check_writable",
    "data_change",
    "describe_config_change",
    "describe_data_change",
    "digest",
    "fingerprint",
    "git_hash",
    "lock_file_for",
    "lock_path",
    "now",
    "plain",
    "read_json_object",
    "read_meta",
    "versions",
]
