"""Annotations on disk: a run folder of the one run store (``clinqa.runs.RunFolder``), resumable by question id.

An annotation run folder (``clinqa annotate DATA --out OUT``) holds

- ``OUT/run.json``: kind ``"annotate"``, the settings as ``config`` (for the LLM vote annotator: model,
  adapter, n_prompts, min_votes, calibrate, norm, a hash of the prompts and label names, the format
  and its version; for the MiniLM annotator: the training spec, a digest of the training questions,
  the embedding model and the classifier's parameters) and ``data``: ``runs.fingerprint`` of the
  annotated questions (id -> text), so a changed question text is refused, naming the question;
- ``OUT/samples.jsonl``: one ``Annotation`` per line (question_id, votes, label, probs, per_prompt),
  appended and fsynced per batch;
- ``OUT/calibration/``: the same for the ``--calibration`` questions, when given.

Re-running the same call resumes (only questions not yet in the folder are annotated); other settings
or changed question texts are refused with the store's message (``min_votes: 3 -> 2``).

Before format 2 an annotation output was one JSONL file whose every line repeated the settings as
``config`` (``annotate --out A.jsonl``). Such a file given where a run folder is wanted is migrated
once, losslessly: when every line was written with the settings of the current call, the file is
renamed ``A.v1.jsonl`` (kept as it was) and the run folder is created at ``A.jsonl`` holding its
annotations of the current questions, with a one-line note; otherwise it is left untouched and the
call is refused with what differs and how to start afresh. ``read_annotations`` reads both forms.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from clinqa.errors import ClinqaError
from clinqa.runs import RUN_FILE, Progress, RunFolder, describe_config_change, fingerprint, lock_path, read_meta
from clinqa.specialties.votes import Annotation

__all__ = [
    "CALIBRATION_DIR",
    "FILE_FORMAT",
    "FORMAT_VERSION",
    "KIND",
    "annotate_into",
    "check_annotation_out",
    "legacy_backup",
    "legacy_calibration_file",
    "read_annotations",
    "write_annotations",
]

FILE_FORMAT = "clinqa.specialty_annotations"
FORMAT_VERSION = 2  # 1: one JSONL file, the settings repeated on every line as "config"
KIND = "annotate"
CALIBRATION_DIR = "calibration"  # OUT/calibration/: the --calibration questions' run folder

Item = tuple[str, str]  # (question id, the text the annotator reads)


def _note(message: str) -> None:
    sys.stderr.write(f"note: {message}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------------
# The old single-file format (format 1) and plain JSONL exports


def write_annotations(path: str | Path, annotations: Iterable[Annotation]) -> Path:
    """Export annotations as a plain JSONL file, one per line: question_id, label, votes, probs
    (taxonomy order), per_prompt. The file is replaced atomically. (Resumable output is a run folder:
    ``annotate_into``.)"""
    from clinqa.runs import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(a.to_dict(), ensure_ascii=False) + "\n" for a in annotations))
    return path


def _read_records(path: Path) -> list[dict]:
    """JSON records of an annotation file. Only a last line without its newline is a write torn by a
    kill (dropped); any other line that is not a JSON object is "{path}:{line}: ..." (so a file that
    is not annotations is never taken for one)."""
    lines = path.read_bytes().split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ClinqaError(
                f"{path}:{i + 1}: not a JSON annotation record: give an annotation run folder or file"
            ) from None
        out.append(rec)
    return out


def _from_records(path: Path, records: Sequence[dict]) -> list[Annotation]:
    out = []
    for n, rec in enumerate(records, 1):
        try:
            out.append(Annotation.from_dict(rec))
        except ClinqaError as e:
            raise ClinqaError(f"{path}: record {n}: {e}") from None
    return out


def read_annotations(path: str | Path) -> list[Annotation]:
    """Annotations of a run folder written by ``annotate_into`` (``clinqa annotate --out``), in the order
    they were written; also a JSONL file (``write_annotations``, or an annotation file of format 1)."""
    path = Path(path)
    if path.is_dir():
        meta = read_meta(path)
        if meta.get("kind") != KIND:
            raise ClinqaError(f"{path} is a {meta.get('kind')!r} run folder, not specialty annotations")
        return RunFolder.load(path, Annotation).samples()
    if not path.is_file():
        raise ClinqaError(f"annotations {path} do not exist")
    return _from_records(path, _read_records(path))


def legacy_backup(path: str | Path) -> Path:
    """Where a format-1 annotation file is kept when it is migrated: ``A.jsonl`` -> ``A.v1.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.v1{path.suffix}" if path.suffix else f"{path.name}.v1")


def legacy_calibration_file(out: str | Path) -> Path:
    """Where format 1 kept the --calibration annotations of ``--out A.jsonl``: ``A.calibration.jsonl`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".calibration.jsonl")


def check_annotation_out(out: str | Path, what: str = "--out") -> Path:
    """Refuse, before any model work, an --out that can be neither an annotation run folder nor an
    annotation file of format 1 to migrate: a folder that is another kind of run or no run folder
    at all, a file that is not JSON annotation records, a place that cannot be written."""
    from clinqa.runs import LOCK_FILE, check_writable

    out = Path(out)
    if out.is_file():
        records = _read_records(out)
        _from_records(out, records)  # every line must be an annotation
        check_writable(out.parent, folder=True, what=what)
        return out
    check_writable(out, folder=True, what=what)
    if out.is_dir():
        if (out / RUN_FILE).exists():
            kind = read_meta(out).get("kind")
            if kind != KIND:
                raise ClinqaError(f"{what} {out} is a {kind!r} run folder, not annotations: choose another {what}")
        elif any(p.name != LOCK_FILE for p in out.iterdir()):
            raise ClinqaError(f"{what} {out} exists and is not a clinqa run folder: choose another {what} folder")
    return out


# --------------------------------------------------------------------------------------------------
# Migration of a format-1 file


def _tmp_folder(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.migrating")


def _finish_interrupted_migration(folder: Path, candidates: Sequence[Path], notify: Callable[[str], None]) -> None:
    """A migration killed between its two renames left the new folder under its temporary name (and
    the old file under its backup name)."""
    tmp = _tmp_folder(folder)
    if folder.exists() or not (tmp / RUN_FILE).is_file():
        return
    for legacy in candidates:
        if legacy_backup(legacy).is_file():
            os.replace(tmp, folder)
            notify(f"finished the interrupted migration of {legacy} into the run folder {folder}")
            return


def _migrate(
    legacy: Path,
    folder: Path,
    open_run: Callable[[Path], RunFolder[Annotation]],
    legacy_config: dict | None,
    ids: Sequence[str],
    notify: Callable[[str], None],
    what: str,
) -> None:
    """Turn the format-1 annotation file `legacy` into the run folder `folder` (which may be the same path)."""
    backup = legacy_backup(legacy)
    start_afresh = (
        f"re-run with its settings to migrate it, or, to start afresh, move it aside (mv {legacy} {backup}) "
        f"or choose another {what}; clinqa.specialties.annotate.read_annotations still reads it"
    )
    with lock_path(legacy, folder=False, what=what):  # an older clinqa still writing it is refused
        records = _read_records(legacy)
        anns = _from_records(legacy, records)
        for n, rec in enumerate(records, 1):
            theirs = rec.get("config")
            if legacy_config is None or not isinstance(theirs, dict) or theirs != legacy_config:
                if not isinstance(theirs, dict):
                    diff = "no recorded settings"
                elif legacy_config is None:
                    diff = f"written by the LLM vote annotator ({theirs.get('model')}), not this annotator"
                else:
                    diff = "; ".join(describe_config_change(theirs, legacy_config))
                raise ClinqaError(
                    f"{legacy}:{n} is an annotation file of an older clinqa written with other settings ({diff}): "
                    f"it is left as it is; {start_afresh}"
                )
        if backup.exists():
            raise ClinqaError(f"cannot migrate {legacy}: {backup} already exists; move one of them aside")
        wanted = set(ids)
        by_id = {a.question_id: a for a in anns if a.question_id in wanted}  # the last line of an id wins
        tmp = _tmp_folder(folder)
        if tmp.exists():  # a migration killed before its renames: `legacy` is still the original
            shutil.rmtree(tmp)
        with open_run(tmp) as run:
            run.meta["migrated_from"] = {"file": backup.name, "format": 1, "records": len(records)}
            run.append(a for a in anns if by_id.get(a.question_id) is a)
            run.save_meta()
        os.replace(legacy, backup)
        os.replace(tmp, folder)
    left = len({a.question_id for a in anns}) - len(by_id)
    notify(
        f"migrated {legacy} (an annotation file of an older clinqa) into the run folder {folder}: "
        f"{len(by_id)} annotations carried over"
        + (f", {left} of questions not given now only in {backup}" if left else "")
        + f"; the file is kept as {backup}"
    )


# --------------------------------------------------------------------------------------------------
# The resumable loop


def _with_earlier_questions(out: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of the questions given now, plus those an earlier call annotated into `out` and
    this one leaves out: annotating a subset of a folder's questions (a smaller --limit) reuses their
    annotations rather than being refused as "questions missing" (the store accepts added items but
    not removed ones). A question given now with another text still differs, and is refused."""
    if not (out / RUN_FILE).is_file():
        return data
    try:
        old = read_meta(out).get("data") or {}
    except ClinqaError:
        return data  # opening the folder reports it
    earlier = old.get("items") or {}
    if old.get("fields") != data["fields"] or not isinstance(earlier, dict):
        return data
    merged = {**{k: h for k, h in earlier.items() if k not in data["items"]}, **data["items"]}
    whole = hashlib.sha256("".join(f"{k}\t{h}\n" for k, h in merged.items()).encode()).hexdigest()[:16]
    return {**data, "items": merged, "n": len(merged), "sha256": whole}


def annotate_into(
    out: str | Path,
    items: Sequence[Item],
    config: dict[str, Any],
    compute: Callable[[list[Item]], list[Annotation]],
    *,
    legacy_config: dict | None = None,
    legacy_file: str | Path | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    notify: Callable[[str], None] | None = None,
    what: str = "--out",
) -> list[Annotation]:
    """Annotate `items` [(question id, text)] with `compute` (a batch of items -> their annotations) into
    the run folder `out`, resuming: items whose id is already there are not computed again.

    config: the settings that determine the annotations (run.json ``config``; another is refused).
    legacy_config: the ``config`` a format-1 file written with the same settings carries on every line;
      such a file at `out` (or at `legacy_file`, when `out` does not exist yet) is migrated, see the
      module docstring. notify: where the one-line migration note goes (default: stderr).
    Returns the annotations of `items` in their order.
    """
    notify = notify or _note
    out = Path(out)
    ids = [qid for qid, _ in items]
    if len(set(ids)) != len(ids):
        dup = next(q for i, q in enumerate(ids) if q in ids[:i])
        raise ClinqaError(f"question id {dup!r} appears twice: annotations resume by id, so ids must be unique")
    data = fingerprint(((qid, {"question": text}) for qid, text in items), noun="questions")

    def open_run(path: Path) -> RunFolder[Annotation]:
        return RunFolder.open(path, config, kind=KIND, sample_type=Annotation, data=data, what=what)

    legacy = Path(legacy_file) if legacy_file is not None else None
    _finish_interrupted_migration(out, [out] + ([legacy] if legacy else []), notify)
    if out.is_file():
        _migrate(out, out, open_run, legacy_config, ids, notify, what)
    elif not out.exists() and legacy is not None and legacy.is_file():
        _migrate(legacy, out, open_run, legacy_config, ids, notify, what)
    data.update(_with_earlier_questions(out, data))
    with open_run(out) as run:
        done = {a.question_id: a for a in run.samples()}
        todo = [it for it in items if it[0] not in done]
        total, finished = len(items), len(items) - len(todo)
        if progress:
            progress(finished, total)
        for s in range(0, len(todo), max(1, batch_size)):
            batch = todo[s : s + batch_size]
            t0 = time.perf_counter()
            anns = compute(batch)
            if [a.question_id for a in anns] != [qid for qid, _ in batch]:
                raise ClinqaError("the annotator returned annotations for other questions than it was given")
            run.add_compute(time.perf_counter() - t0)
            run.append(anns)
            done.update((a.question_id, a) for a in anns)
            finished += len(batch)
            if progress:
                progress(finished, total)
        run.finish(annotations=len(done))
    return [done[qid] for qid in ids]
