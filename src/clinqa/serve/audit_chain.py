"""What one audit row is and how the rows chain: the table, :class:`AuditEntry`, its hash, and the
question hash. Shared by the writer (:mod:`clinqa.serve.audit`) and the verifier
(:mod:`clinqa.serve.audit_verify`); see :mod:`clinqa.serve.audit` for the design.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

GENESIS_HASH = "0" * 64
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
_COLUMNS = {*_HASHED_FIELDS, "row_hash"}


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


def entry_from_row(row: sqlite3.Row) -> AuditEntry:
    """The AuditEntry a row of the audit table holds (ValueError or TypeError if it holds none)."""
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
