"""Checking an audit log: recompute its hash chain, compare it with anchors (heads kept elsewhere), and
read a log file read-only (:func:`verify_file`, behind ``clinqa audit verify``). The writer is
:class:`clinqa.serve.audit.AuditLog`; see :mod:`clinqa.serve.audit` for the design and its limits.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import urllib.parse
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict

from clinqa.errors import ClinqaError
from clinqa.serve.audit_chain import _COLUMNS, _TRIGGERS, GENESIS_HASH, entry_from_row


class VerifyResult(BaseModel):
    """The outcome of :meth:`AuditLog.verify`. ``n`` counts the rows read; ``first_bad_seq`` is the seq
    of the first row where the chain breaks (None if ok or if the problem is not a row)."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    n: int
    first_bad_seq: Optional[int] = None
    message: str

    def __bool__(self) -> bool:
        return self.ok


def _anchor_list(anchor: tuple[int, str] | Iterable[tuple[int, str]] | None) -> list[tuple[int, str]]:
    if anchor is None:
        return []
    if isinstance(anchor, tuple) and len(anchor) == 2 and isinstance(anchor[0], int):
        return [anchor]
    return [(int(s), str(h)) for s, h in anchor]


def verify_chain(db: sqlite3.Connection, anchor: tuple[int, str] | Iterable[tuple[int, str]] | None) -> VerifyResult:
    """Recompute the chain of the audit table on ``db`` in one snapshot, checking every anchored row."""
    anchors: dict[int, str] = {}
    for seq, row_hash in _anchor_list(anchor):
        if seq > 0 and anchors.setdefault(seq, row_hash) != row_hash:
            return VerifyResult(
                ok=False,
                n=0,
                first_bad_seq=seq,
                message=f"the anchors name two different hashes for row {seq}: the anchor file was edited",
            )
    n = 0
    prev_hash, expected_seq = GENESIS_HASH, 1
    db.execute("BEGIN")  # one consistent snapshot even while others append
    try:
        triggers = {
            r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit'")
        }
        for row in db.execute("SELECT * FROM audit ORDER BY seq"):
            n += 1
            seq = row["seq"]
            try:
                entry = entry_from_row(row)
            except (ValueError, TypeError) as e:
                return VerifyResult(ok=False, n=n, first_bad_seq=seq, message=f"row {seq} is unreadable: {e}")
            if seq != expected_seq:
                return VerifyResult(
                    ok=False,
                    n=n,
                    first_bad_seq=seq,
                    message=f"row {seq} follows row {expected_seq - 1}: rows {expected_seq}..{seq - 1} are missing",
                )
            if entry.prev_hash != prev_hash:
                return VerifyResult(
                    ok=False,
                    n=n,
                    first_bad_seq=seq,
                    message=f"row {seq}'s prev_hash does not match row {seq - 1}'s hash: a row before it was "
                    "changed, removed or moved",
                )
            if entry.compute_hash() != entry.row_hash:
                return VerifyResult(
                    ok=False,
                    n=n,
                    first_bad_seq=seq,
                    message=f"row {seq}'s contents do not match its row_hash: the row was edited",
                )
            if seq in anchors and entry.row_hash != anchors[seq]:
                return VerifyResult(
                    ok=False,
                    n=n,
                    first_bad_seq=seq,
                    message=f"row {seq}'s hash differs from the anchor: the log was rewritten up to here",
                )
            prev_hash, expected_seq = entry.row_hash, seq + 1
    finally:
        db.execute("ROLLBACK")
    beyond = [s for s in anchors if s > n]
    if beyond:
        return VerifyResult(
            ok=False,
            n=n,
            first_bad_seq=None,
            message=f"the log ends at row {n} but an anchor names row {max(beyond)}: rows were cut off the end",
        )
    missing = [t for t in _TRIGGERS if t not in triggers]
    if missing:
        return VerifyResult(
            ok=False,
            n=n,
            first_bad_seq=None,
            message=f"the chain of {n} rows is intact but the append-only trigger(s) {', '.join(missing)} "
            "were removed: someone changed the database outside clinqa",
        )
    checked = f", {len(anchors)} anchors match" if anchors else ""
    return VerifyResult(ok=True, n=n, message=f"{n} rows, hash chain intact{checked}")


def default_anchor_path(audit_db: str | os.PathLike[str]) -> Path:
    """Where the service writes anchors unless told otherwise: beside the audit log, ``<name>.anchor``."""
    p = Path(audit_db)
    return p.with_name(p.name + ".anchor")


def read_anchors(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """The (seq, row hash) heads in an anchor file; a line that is not one is a ClinqaError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClinqaError(f"{path}: no such anchor file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ClinqaError(f"{path}: cannot read the anchor file ({e})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            seq, row_hash = rec["seq"], rec["hash"]
            if (
                isinstance(seq, bool)
                or not isinstance(seq, int)
                or seq < 0
                or not re.fullmatch(r"[0-9a-f]{64}", row_hash)
            ):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ClinqaError(
                f'{path}:{n}: not an anchor line (expected {{"seq": N, "hash": "<64 hex>", ...}})'
            ) from None
        out.append((seq, row_hash))
    return out


def verify_file(path: str | os.PathLike[str], anchors: Iterable[tuple[int, str]] | None = None) -> VerifyResult:
    """Verify the audit log at ``path`` opened read-only: nothing is created or changed, not even a
    missing file; a database without clinqa's ``audit`` table is a ClinqaError, not an empty log."""
    path = Path(path)
    if not path.is_file():
        raise ClinqaError(f"no audit log at {path}" if not path.exists() else f"{path} is not a file")
    # mode=ro never writes the database; but on a WAL database SQLite would still create empty -wal and
    # -shm files. No -wal file means no connection has the log open and everything is in the main file,
    # so then open it immutable (no locks, no side files); while the service runs, share its -shm.
    wal = path.with_name(path.name + "-wal")
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + ("?mode=ro" if wal.exists() else "?mode=ro&immutable=1")
    try:
        with closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            columns = {r["name"] for r in db.execute("PRAGMA table_info(audit)")}
            if not columns:
                tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
                raise ClinqaError(
                    f"{path} is not a clinqa audit log: it has no audit table "
                    f"({'tables: ' + ', '.join(tables[:5]) if tables else 'no tables'})"
                )
            if not _COLUMNS <= columns:
                raise ClinqaError(
                    f"{path} is not a clinqa audit log: its audit table lacks {', '.join(sorted(_COLUMNS - columns))}"
                )
            return verify_chain(db, anchors)
    except sqlite3.DatabaseError as e:
        raise ClinqaError(f"{path} is not a clinqa audit log ({e})") from None
