"""Your own files: jsonl, csv (with a header) and parquet, with the columns named through a `mapping`
of {question, options, answer, id, specialties, source} -> column(s); defaults are the same names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from clinqa.data.formats.common import Problem, Raw, RowError, csv_rows, kind, question, record, require, text
from clinqa.data.schema import LETTERS, Question
from clinqa.errors import ClinqaError

GENERIC_FORMATS: tuple[str, ...] = ("jsonl", "csv", "parquet")
MAPPING_KEYS: tuple[str, ...] = ("question", "options", "answer", "id", "specialties", "source")


def check_mapping(mapping: dict[str, str], formats: set[str]) -> None:
    """A mapping applies only to the generic formats and must name a column for known keys."""
    for fmt in formats:
        if fmt not in GENERIC_FORMATS:
            raise ClinqaError(f"a column mapping only applies to the formats {', '.join(GENERIC_FORMATS)}, not {fmt}")
    for key, column in mapping.items():
        if key not in MAPPING_KEYS:
            raise ClinqaError(f"unknown mapping key {key!r}: use {', '.join(MAPPING_KEYS)}")
        if not isinstance(column, str) or not column.strip():
            raise ClinqaError(f"the mapping for {key!r} must name a column, got {column!r}")


# --------------------------------------------------------------------------------------------------
# Readers (jsonl uses common.read_jsonl)


def read_csv(path: Path) -> Iterator[Raw | Problem]:
    rows = csv_rows(path)
    first = next(rows, None)
    if first is None:
        return
    header = [h.strip() for h in first[1]]
    for line, row in rows:
        if len(row) != len(header):
            yield Problem(
                str(path), line, None, f"the row has {len(row)} cells but the header has {len(header)} columns"
            )
            continue
        yield Raw(path, line, None, dict(zip(header, row)))


def read_parquet(path: Path) -> Iterator[Raw | Problem]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise ClinqaError("reading parquet files needs pyarrow: pip install pyarrow") from None
    try:
        batches = pq.ParquetFile(path).iter_batches()
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise ClinqaError(f"{path}: not a readable parquet file ({e})") from None
    n = 0
    for batch in batches:
        for rec in batch.to_pylist():
            n += 1
            yield Raw(path, n, None, rec)


# --------------------------------------------------------------------------------------------------
# One row -> one Question


def _table_options(rec: dict[str, Any], spec: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Options and the column behind each letter.

    `spec` is a comma list of columns (one option each; trailing empty cells are dropped, so rows may
    have 4 or 5 options) or one column holding a list, an object letter -> text, or that as JSON text.
    Without a spec: an `options` column, else the columns A, B, C, ... that exist.
    """
    if spec is None:
        if "options" in rec:
            spec = "options"
        else:
            present = [l for l in LETTERS if l in rec]
            if len(present) < 2:
                raise RowError(
                    "options",
                    "missing (no options column and no columns A, B, ...: name the option columns A, B, C, ... or put them in one 'options' column)",
                )
            spec = ",".join(present)
    columns = [c.strip() for c in spec.split(",") if c.strip()]
    if len(columns) > 1:
        texts = [text(require(rec, c)) for c in columns]
        while texts and isinstance(texts[-1], str) and not texts[-1].strip():
            texts.pop()
        return dict(zip(LETTERS, texts)), {f"options.{l}": c for l, c in zip(LETTERS, columns)}
    value = require(rec, columns[0])
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, list):
        return dict(zip(LETTERS, (text(v) for v in value))), {"options": columns[0]}
    if isinstance(value, dict):
        return {str(k): text(v) for k, v in value.items()}, {"options": columns[0]}
    raise RowError(
        columns[0], f"expected a list or an object of options, got {kind(value)} (several columns: 'col1,col2,...')"
    )


def _answer_letter(value: Any, options: dict[str, Any], field: str) -> str:
    """An answer given as a letter, a 0-based index or the option's text; refuses readings that disagree."""
    letters = list(options)
    picks: set[str] = set()
    if isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, (int, float)):
        if float(value).is_integer() and 0 <= int(value) < len(letters):
            picks.add(letters[int(value)])
    elif isinstance(value, str):
        s = value.strip()
        if len(s) == 1 and s.upper() in options:
            picks.add(s.upper())
        if s.isdigit() and int(s) < len(letters):
            picks.add(letters[int(s)])
        by_text = [l for l, t in options.items() if isinstance(t, str) and t.strip() == s]
        if len(by_text) == 1:
            picks.update(by_text)
    if len(picks) == 1:
        return picks.pop()
    if picks:
        raise RowError(
            field,
            f"{value!r} is ambiguous: as a letter, a 0-based index or an option text it could be {' or '.join(sorted(picks))}",
        )
    raise RowError(
        field,
        f"{value!r} is not an option letter ({', '.join(letters)}), a 0-based index (0-{len(letters) - 1}) or the text of an option",
    )


def _labels_cell(value: Any) -> Any:
    """Specialty labels as a list, or text: a JSON list or labels separated by commas or semicolons."""
    if not isinstance(value, str):
        return value
    if value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return [s.strip() for s in value.replace(";", ",").split(",") if s.strip()]


def from_table(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """jsonl / csv / parquet with columns named by `mapping` (defaults: the same names).

    id defaults to {file stem}-{line}, source to the file stem; unmapped columns go to meta.
    """
    rec = record(raw)
    m = {**{k: k for k in MAPPING_KEYS if k != "options"}, **(mapping or {})}
    options, names = _table_options(rec, m.get("options"))
    answer_col = m["answer"]
    answer = _answer_letter(require(rec, answer_col), options, answer_col)
    used = {m[k] for k in MAPPING_KEYS if k != "options"} | set(names.values())
    fields = {
        "id": str(rec[m["id"]]) if rec.get(m["id"]) not in (None, "") else f"{raw.path.stem}-{raw.line}",
        "question": require(rec, m["question"]),
        "options": options,
        "answer": answer,
        "specialties": _labels_cell(rec.get(m["specialties"])) or [],
        "source": str(rec[m["source"]]) if rec.get(m["source"]) not in (None, "") else raw.path.stem,
        "meta": {k: v for k, v in rec.items() if k not in used},
    }
    names.update({k: m[k] for k in ("id", "question", "answer", "specialties", "source")})
    return question(fields, names)
