"""An append-only, tamper-evident audit log in SQLite.

Every row carries ``prev_hash`` (the previous row's ``row_hash``; 64 zeros for the first row) and
``row_hash = sha256(canonical JSON of the row's fields and prev_hash)``, so the rows form a hash
chain: editing, deleting or reordering a row breaks it, and :meth:`AuditLog.verify` says where.

What is stored is deliberately thin: who (key id), which patient, what (action, resource ids,
outcome) and *a sha256 of the question*, never the question or answer text. ``detail`` is for a
short machine-ish reason ("scope patient/12.read missing"), never patient content; it is cut
to :data:`MAX_DETAIL` characters.

Durability and concurrency: WAL journal with ``synchronous=FULL`` (a returned
:meth:`AuditLog.append` has been fsynced), and each append reads the chain head and inserts inside
one ``BEGIN IMMEDIATE`` transaction, so appends from many threads and processes serialise and the
chain never forks (``seq`` is the primary key and ``prev_hash`` is UNIQUE, as a second guard).
Triggers refuse UPDATE and DELETE; an attacker with write access to the file can drop them, which
:meth:`AuditLog.verify` reports, as it reports the broken chain.

Limits: a hash chain cannot tell a log whose *last* rows were cut off, or one rewritten from the
edit point onwards with recomputed hashes, from an honest one. Anchors close that gap: with
``anchor=FILE`` the log appends its head (seq and row hash) to a separate append-only JSON-lines file
every ``anchor_every`` entries, and the service also at start and at shutdown;
:func:`verify_file` with ``anchors=read_anchors(FILE)`` fails when an anchored row is missing or
differs. Rows written after the last anchor can still be cut unseen, and an attacker who can also
rewrite the anchor file defeats it: keep that file elsewhere (another disk, machine or log shipper).

:func:`verify_file` opens the database read-only (SQLite ``mode=ro``): it never creates a file or a
table, and refuses a database that is not an audit log.

Layout: this module is the writer (:class:`AuditLog`); the row format and its hash are in
:mod:`clinqa.serve.audit_chain`, the chain check, anchors and :func:`verify_file` in
:mod:`clinqa.serve.audit_verify`. Every name is importable from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from clinqa.errors import ClinqaError
from clinqa.serve.audit_chain import (
    _SCHEMA,
    GENESIS_HASH,
    AuditEntry,
    _canonical,
    entry_from_row,
    hash_question,
)
from clinqa.serve.audit_verify import (
    VerifyResult,
    default_anchor_path,
    read_anchors,
    verify_chain,
    verify_file,
)
from clinqa.serve.auth import private_file  # one owner-only file creator for both stores

__all__ = [
    "GENESIS_HASH",
    "MAX_DETAIL",
    "OUTCOMES",
    "AuditEntry",
    "AuditLog",
    "VerifyResult",
    "default_anchor_path",
    "hash_question",
    "read_anchors",
    "verify_file",
]

MAX_DETAIL = 200
# The usual outcomes; any short lowercase word matching _WORD is accepted.
OUTCOMES = ("ok", "forbidden", "unauthorized", "not_found", "bad_request", "error", "timeout")
_WORD = re.compile(r"[a-z][a-z0-9_.\-]{0,63}")


def _opt_str(value: Any, what: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"audit {what} must be a non-empty string or None, got {value!r}")
    return value


class AuditLog:
    """The audit log at ``path`` (created 0600 with its schema if new).

    One instance may be shared by threads; other processes open their own instance on the same file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 60.0,
        anchor: str | os.PathLike[str] | None = None,
        anchor_every: int = 100,
    ):
        self.path = Path(path)
        self.timeout = timeout
        self.anchor = None if anchor is None else Path(anchor)
        if anchor_every < 1:
            raise ClinqaError(f"anchor_every must be at least 1 entry, got {anchor_every}")
        self.anchor_every = anchor_every
        if self.path.is_dir():
            raise ClinqaError(f"audit log path {self.path} is a directory; give a file name such as audit.sqlite")
        self._lock = threading.Lock()
        self._writer: Optional[sqlite3.Connection] = None
        self._writer_pid: Optional[int] = None
        private_file(self.path)
        try:
            with closing(self._connect()) as db:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    raise ClinqaError(
                        f"could not put the audit log {self.path} in WAL mode (got {mode!r}); "
                        "keep it on a local disk, not a network share"
                    )
                db.execute("BEGIN IMMEDIATE")
                try:
                    exists = db.execute(
                        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit'"
                    ).fetchone()
                    # Only a new file gets the schema: re-creating dropped triggers here would hide
                    # the evidence that someone removed them.
                    if not exists:
                        for statement in _split_sql(_SCHEMA):
                            db.execute(statement)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except sqlite3.DatabaseError as e:
            raise ClinqaError(f"{self.path} is not a clinqa audit log ({e}); choose another file") from e

    # -- connections

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        return db

    def _writer_connection(self) -> sqlite3.Connection:
        # Reopen after a fork: a SQLite connection must not cross into a child process.
        if self._writer is None or self._writer_pid != os.getpid():
            self._writer = self._connect()
            self._writer_pid = os.getpid()
        return self._writer

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with closing(self._connect()) as db:
            yield db

    def close(self) -> None:
        with self._lock:
            if self._writer is not None and self._writer_pid == os.getpid():
                self._writer.close()
            self._writer = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing

    def append(
        self,
        action: str,
        *,
        key_id: Optional[str] = None,
        patient_id: Optional[str] = None,
        question: Optional[str] = None,
        question_hash: Optional[str] = None,
        resource_ids: Iterable[str] = (),
        outcome: str = "ok",
        detail: str = "",
    ) -> AuditEntry:
        """Append one entry and return it once it is durably on disk.

        Give the question as ``question`` (only its sha256 is stored) or as a ready ``question_hash``.
        """
        if not isinstance(action, str) or not _WORD.fullmatch(action):
            raise ValueError(f"audit action must be a short lowercase word like 'ask' or 'key.create', got {action!r}")
        if not isinstance(outcome, str) or not _WORD.fullmatch(outcome):
            raise ValueError(
                f"audit outcome must be a short lowercase word like {', '.join(OUTCOMES)}; got {outcome!r}"
            )
        if question is not None and question_hash is not None:
            raise ValueError("give the question text or its hash, not both")
        if question is not None:
            question_hash = hash_question(question)
        elif question_hash is not None and not re.fullmatch(r"[0-9a-f]{64}", question_hash):
            raise ValueError(f"question_hash must be a sha256 hex digest (see hash_question), got {question_hash!r}")
        key_id = _opt_str(key_id, "key_id")
        patient_id = _opt_str(patient_id, "patient_id")
        if isinstance(resource_ids, str):
            resource_ids = [resource_ids]
        resources = [str(r) for r in resource_ids]
        detail = str(detail or "")
        if len(detail) > MAX_DETAIL:
            detail = detail[: MAX_DETAIL - 1] + "…"

        with self._lock:
            db = self._writer_connection()
            db.execute("BEGIN IMMEDIATE")  # takes the write lock now: the head we read stays the head
            try:
                last = db.execute("SELECT seq, row_hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev_hash = (1, GENESIS_HASH) if last is None else (last["seq"] + 1, last["row_hash"])
                fields = dict(
                    seq=seq,
                    time=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                    key_id=key_id,
                    patient_id=patient_id,
                    action=action,
                    question_hash=question_hash,
                    resource_ids=resources,
                    outcome=outcome,
                    detail=detail,
                    prev_hash=prev_hash,
                )
                entry = AuditEntry(**fields, row_hash=hashlib.sha256(_canonical(fields)).hexdigest())
                db.execute(
                    "INSERT INTO audit (seq, time, key_id, patient_id, action, question_hash, resource_ids,"
                    " outcome, detail, prev_hash, row_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        entry.seq,
                        entry.time,
                        entry.key_id,
                        entry.patient_id,
                        entry.action,
                        entry.question_hash,
                        json.dumps(entry.resource_ids, ensure_ascii=False),
                        entry.outcome,
                        entry.detail,
                        entry.prev_hash,
                        entry.row_hash,
                    ),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if self.anchor is not None and entry.seq % self.anchor_every == 0:
            self._write_anchor(entry.seq, entry.row_hash, "every")
        return entry

    def write_anchor(self, event: str = "anchor") -> tuple[int, str]:
        """Append the chain head to the anchor file (no-op without one); returns the head."""
        seq, row_hash = self.head()
        if self.anchor is not None:
            self._write_anchor(seq, row_hash, event)
        return seq, row_hash

    def _write_anchor(self, seq: int, row_hash: str, event: str) -> None:
        line = (
            json.dumps(
                {
                    "seq": seq,
                    "hash": row_hash,
                    "event": event,
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
            + "\n"
        )
        self.anchor.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.anchor, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading

    def entries(
        self,
        *,
        key_id: Optional[str] = None,
        patient_id: Optional[str] = None,
        action: Optional[str] = None,
        outcome: Optional[str] = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        limit: Optional[int] = None,
    ) -> list[AuditEntry]:
        """Entries in seq order matching every given filter; ``since`` inclusive, ``until`` exclusive."""
        where, args = [], []
        for column, value in (("key_id", key_id), ("patient_id", patient_id), ("action", action), ("outcome", outcome)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        for op, value in ((">=", since), ("<", until)):
            if value is not None:
                if isinstance(value, datetime):
                    if value.tzinfo is None:
                        raise ClinqaError(f"give a timezone-aware time to filter the audit log, got {value}")
                    value = value.astimezone(timezone.utc).isoformat(timespec="microseconds")
                where.append(f"time {op} ?")
                args.append(value)
        sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._reader() as db:
            return [entry_from_row(r) for r in db.execute(sql, args)]

    def __len__(self) -> int:
        with self._reader() as db:
            return db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]

    def head(self) -> tuple[int, str]:
        """``(last seq, its row_hash)``, or ``(0, GENESIS_HASH)`` for an empty log: an anchor to keep elsewhere."""
        with self._reader() as db:
            row = db.execute("SELECT seq, row_hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return (0, GENESIS_HASH) if row is None else (row["seq"], row["row_hash"])

    def verify(self, anchor: tuple[int, str] | Iterable[tuple[int, str]] | None = None) -> VerifyResult:
        """Recompute the whole chain. ``anchor`` is an earlier :meth:`head` (or a list of them, e.g. from
        :func:`read_anchors`); each anchored row must still exist with that hash (catches a cut-off tail or a
        rewrite from an earlier row on)."""
        with self._reader() as db:
            return verify_chain(db, anchor)


def _split_sql(script: str) -> list[str]:
    """Split the schema into statements (trigger bodies contain ';', so split on 'END;' boundaries)."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf)
        if sqlite3.complete_statement(text):
            out.append(text)
            buf = []
    return out
