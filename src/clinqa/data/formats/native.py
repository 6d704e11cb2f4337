"""clinqa's native JSONL: one Question per line, exactly its fields (id, question, options, answer,
specialties, source, meta); specialty labels may be ids, aliases or names."""

from __future__ import annotations

from clinqa.data.formats.common import Raw, question, record
from clinqa.data.schema import Question


def from_clinqa(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """Native: the record is exactly Question's fields."""
    return question(dict(record(raw)))
