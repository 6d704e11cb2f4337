"""True/false statements JSONL: id, statement, label (bool), specialties, source, meta; each becomes a
two-option question (A True, B False)."""

from __future__ import annotations

from clinqa.data.formats.common import Raw, RowError, kind, question, record, require
from clinqa.data.schema import Question

_STATEMENT_FIELDS = ("id", "statement", "label", "specialties", "source", "meta")


def from_statements(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """A true/false statement -> options A True, B False; meta keeps the record's meta plus statement=True."""
    rec = record(raw)
    for key in rec:
        if key not in _STATEMENT_FIELDS:
            raise RowError(key, f"not a field of a statement (expected {', '.join(_STATEMENT_FIELDS)})")
    label = require(rec, "label")
    if not isinstance(label, bool):
        raise RowError("label", f"must be true or false, got {label!r}")
    meta = rec.get("meta") or {}
    if not isinstance(meta, dict):
        raise RowError("meta", f"expected an object, got {kind(meta)}")
    fields = {
        "id": require(rec, "id"),
        "question": require(rec, "statement"),
        "options": {"A": "True", "B": "False"},
        "answer": "A" if label else "B",
        "specialties": rec.get("specialties") or [],
        "source": rec.get("source") or "",
        "meta": {**meta, "statement": True},
    }
    return question(fields, {"question": "statement", "answer": "label"})
