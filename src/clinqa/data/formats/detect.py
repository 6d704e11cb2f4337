"""Telling a file's format from its extension and the keys of its first record (`detect_format`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clinqa.data.formats.common import JSONL_EXTENSIONS, csv_rows
from clinqa.data.formats.registry import FORMATS
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError


def pass_format(path: Path, why: str) -> ClinqaError:
    return ClinqaError(f"cannot tell the format of {path}: {why}; pass --format (one of {', '.join(FORMATS)})")


def _first_record(path: Path) -> dict[str, Any] | None:
    """The first line of a JSON-lines file that parses as an object (None for an empty file)."""
    with path.open(encoding="utf-8-sig") as f:
        for text in f:
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                return data
    return None


def _detect_record(rec: dict[str, Any]) -> str:
    keys = set(rec)
    if {"statement", "label"} <= keys:
        return "statements"
    if {"opa", "opb", "opc", "opd", "cop"} <= keys:
        return "medmcqa"
    if {"question", "options", "answer_idx"} <= keys:
        return "medqa"
    if {"id", "question", "options", "answer"} <= keys <= set(Question.model_fields):
        return "clinqa"
    if {"question", "answer"} <= keys and ("options" in keys or {"A", "B"} <= keys):
        return "jsonl"
    return ""


def _detect_keyed(data: dict[str, Any]) -> str:
    first = next(iter(data.values()), None)
    if isinstance(first, dict) and "QUESTION" in first:
        return "pubmedqa"
    inner = next(iter(first.values()), None) if isinstance(first, dict) else None
    if isinstance(inner, dict) and {"question", "options"} <= set(inner):
        return "mirage"
    return ""


def detect_format(path: str | Path) -> str:
    """The format of one file, from its extension and the keys of its first record.

    .parquet is `parquet`; .csv is `mmlu` when the first row is 6 cells ending in a letter A-D, else a
    CSV with a header (`csv`) when it has question and answer columns; .jsonl/.json are told apart by
    their keys; an empty JSON-lines file counts as `clinqa`. Anything else: a ClinqaError asking for --format.
    """
    path = Path(path)
    ext = path.suffix.lower()
    try:
        if ext == ".parquet":
            return "parquet"
        if ext == ".csv":
            first = next(csv_rows(path), None)
            if first is None:
                return "csv"
            row = [c.strip() for c in first[1]]
            if len(row) == 6 and row[5] in ("A", "B", "C", "D"):
                return "mmlu"
            if {"question", "answer"} <= set(row):
                return "csv"
            raise pass_format(
                path,
                f"a CSV whose header ({', '.join(row)}) has no question and answer columns (map yours with a mapping and --format csv)",
            )
        if ext in JSONL_EXTENSIONS:
            if ext == ".json":
                try:
                    data = json.loads(path.read_text(encoding="utf-8-sig"))
                except json.JSONDecodeError:
                    data = None  # perhaps JSON lines (MedMCQA ships those as .json)
                if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
                    name = _detect_keyed(data)
                    if name:
                        return name
            rec = _first_record(path)
            if rec is None:
                return "clinqa"
            name = _detect_record(rec)
            if name:
                return name
            raise pass_format(path, f"its first record has keys {', '.join(sorted(rec))}, which match no known format")
    except UnicodeDecodeError:
        raise ClinqaError(f"{path}: not a UTF-8 text file") from None
    raise pass_format(path, f"unknown extension {ext or '(none)'!r}")


def generic_by_extension(path: Path) -> str:
    """The generic format (jsonl, csv, parquet) a file with a column mapping is read as."""
    ext = path.suffix.lower()
    if ext in (".csv", ".parquet"):
        return ext[1:]
    if ext in JSONL_EXTENSIONS:
        return "jsonl"
    raise pass_format(path, f"unknown extension {ext or '(none)'!r} for a file with a column mapping")
