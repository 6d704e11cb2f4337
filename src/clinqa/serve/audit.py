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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from clinqa.errors import ClinqaError
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

GENESIS_HASH = "0" * 64
MAX_DETAIL = 200
# The usual outcomes; any short lowercase word matching _WORD is accepted.
OUTCOMES = ("ok", "forbidden", "unauthorized", "not_found", "bad_request", "error", "timeout")
_WORD = re.compile(r"[a-z][a-z0-9_.\-]{0,63}")
_TRIGGERS = ("audit_no_update", "audit_no_delete")
# The fields covered by row_hash, in the order of the table's columns.
_HASHED_FIELDS = (
    "seq",
    "time",
    "key_id",
    "patient_id",
    "action",
    "question_hash",
    "resource_ids",
    "outcome",
    "detail",
    "prev_hash",
)

_SCHEMA = """
CREATE TABLE audit (
    seq           INTEGER PRIMARY KEY,
    time          TEXT NOT NULL,
    key_id        TEXT,
    patient_id    TEXT,
    action        TEXT NOT NULL,
    question_hash TEXT,
    resource_ids  TEXT NOT NULL,
    outcome       TEXT NOT NULL,
    detail        TEXT NOT NULL,
    prev_hash     TEXT NOT NULL UNIQUE,
    row_hash      TEXT NOT NULL UNIQUE
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: UPDATE refused'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: DELETE refused'); END;
"""


def hash_question(text: str) -> str:
    """sha256 hex of the question text exactly as given (UTF-8, no normalisation)."""
    if not isinstance(text, str):
        raise TypeError(f"hash_question takes the question text (str), got {type(text).__name__}")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class AuditEntry(BaseModel):
    """One audit row. ``resource_ids`` are e.g. ``["Observation/42", "Condition/7"]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seq: int
    time: str
    key_id: Optional[str] = None
    patient_id: Optional[str] = None
    action: str
    question_hash: Optional[str] = None
    resource_ids: list[str] = []
    outcome: str
    detail: str = ""
    prev_hash: str
    row_hash: str

    def hashed_fields(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _HASHED_FIELDS}

    def compute_hash(self) -> str:
        """sha256 hex over the canonical JSON (sorted keys, no spaces, UTF-8) of every field but row_hash."""
        return hashlib.sha256(_canonical(self.hashed_fields())).hexdigest()


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

    @staticmethod
    def _entry(row: sqlite3.Row) -> AuditEntry:
        return AuditEntry(
            seq=row["seq"],
            time=row["time"],
            key_id=row["key_id"],
            patient_id=row["patient_id"],
            action=row["action"],
            question_hash=row["question_hash"],
            resource_ids=json.loads(row["resource_ids"]),
            outcome=row["outcome"],
            detail=row["detail"],
            prev_hash=row["prev_hash"],
            row_hash=row["row_hash"],
        )

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
            return [self._entry(r) for r in db.execute(sql, args)]

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
            return _verify(db, anchor)


def _anchor_list(anchor: tuple[int, str] | Iterable[tuple[int, str]] | None) -> list[tuple[int, str]]:
    if anchor is None:
        return []
    if isinstance(anchor, tuple) and len(anchor) == 2 and isinstance(anchor[0], int):
        return [anchor]
    return [(int(s), str(h)) for s, h in anchor]


def _verify(db: sqlite3.Connection, anchor: tuple[int, str] | Iterable[tuple[int, str]] | None) -> VerifyResult:
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
                entry = AuditLog._entry(row)
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


_COLUMNS = {*_HASHED_FIELDS, "row_hash"}


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
            return _verify(db, anchors)
    except sqlite3.DatabaseError as e:
        raise ClinqaError(f"{path} is not a clinqa audit log ({e})") from None


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
