"""What every question format shares: raw records, row errors that name the file, line and field,
validation through the Question schema, the bad-row log behind `skip_invalid`, and the file readers
more than one format uses (JSON lines, a JSON object keyed by id, CSV rows).

A format module only turns one `Raw` record into a Question (raising `RowError` for a bad one);
`clinqa.data.loaders.load_questions` turns RowErrors into `Problem`s, which `ProblemLog` either raises
(the first one, as a ClinqaError) or collects (`skip_invalid`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import ValidationError

from clinqa.data.schema import Question
from clinqa.data.taxonomy import resolve_specialty
from clinqa.errors import ClinqaError

# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class Problem:
    """One record that could not become a Question (or a file-level problem when `line` is None).

    `key` is set instead of `line` for JSON files keyed by id (pubmedqa: the PMID, mirage: dataset/id).
    """

    file: str
    line: int | None
    field: str | None
    message: str
    key: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.key is not None:
            where += f": record {self.key!r}"
        what = f"field {self.field!r}: " if self.field else ""
        return f"{where}: {what}{self.message}"


@dataclass
class LoadResult:
    questions: list[Question]
    skipped: list[Problem]
    format: str  # the format used; several joined by '+' when a folder mixes formats


class ProblemLog:
    """Bad records: the first one raises a ClinqaError, or, with `skip_invalid`, all are kept in `skipped`."""

    def __init__(self, skip_invalid: bool = False):
        self.skip_invalid = skip_invalid
        self.skipped: list[Problem] = []

    def __call__(self, p: Problem) -> None:
        if not self.skip_invalid:
            raise ClinqaError(f"{p} (use --skip-invalid to skip bad rows)")
        self.skipped.append(p)


# --------------------------------------------------------------------------------------------------
# Raw records, row errors, building a validated Question


class RowError(Exception):
    """One record cannot become a Question; `field` names the field as the input file calls it."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass
class Raw:
    """One raw record and where it came from."""

    path: Path
    line: int | None  # 1-based; CSV: the row's first line; parquet: the row number
    key: str | None  # the JSON key, for formats keyed by id
    data: Any


def kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


def record(raw: Raw) -> dict[str, Any]:
    if not isinstance(raw.data, dict):
        raise RowError(None, f"expected a JSON object, got {kind(raw.data)}")
    return raw.data


def require(rec: dict[str, Any], key: str) -> Any:
    if rec.get(key) is None:
        raise RowError(key, "missing")
    return rec[key]


def text(value: Any) -> Any:
    """Numbers as option text become strings; anything else is left for validation to judge."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def letter_options(rec: dict[str, Any], field: str = "options") -> dict[str, Any]:
    """An `options` object of letter -> text (MedQA, MIRAGE); anything else is a RowError on `field`."""
    options = require(rec, field)
    if not isinstance(options, dict):
        raise RowError(field, f"expected an object of letter -> text, got {kind(options)}")
    return options


def resolve_labels(labels: Any, field: str) -> list[str]:
    if labels is None:
        return []
    if not isinstance(labels, list):
        raise RowError(field, f"expected a list of specialty labels, got {kind(labels)}")
    resolved: list[str] = []
    for label in labels:
        if not isinstance(label, str):
            raise RowError(field, f"expected specialty labels as strings, got {kind(label)}")
        try:
            sid = resolve_specialty(label)
        except ClinqaError as e:
            raise RowError(field, str(e)) from None
        if sid not in resolved:
            resolved.append(sid)
    return resolved


def question(fields: dict[str, Any], names: dict[str, str] | None = None) -> Question:
    """Validate fields through Question; errors name the input's own field (via `names`)."""
    names = names or {}
    if "specialties" in fields:
        fields = {
            **fields,
            "specialties": resolve_labels(fields["specialties"], names.get("specialties", "specialties")),
        }
    try:
        return Question(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing"
        elif err["type"] == "extra_forbidden":
            msg = f"not a field of a question (expected {', '.join(Question.model_fields)})"
        if not loc and msg.startswith("answer"):  # the model-level check that the answer is an option
            loc = "answer"
        field = names.get(loc) or names.get(loc.split(".")[0]) or loc or None
        raise RowError(field, msg[:1].lower() + msg[1:]) from None


# --------------------------------------------------------------------------------------------------
# Readers shared by several formats: a file -> Raw records (or Problems for what cannot be parsed)

JSONL_EXTENSIONS = (".jsonl", ".ndjson", ".json")


def read_jsonl(path: Path) -> Iterator[Raw | Problem]:
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line.rstrip("\r\n"))  # so the error's column is on this line
            except json.JSONDecodeError as e:
                yield Problem(str(path), n, None, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            yield Raw(path, n, None, data)


def json_object(path: Path, keyed_by: str) -> tuple[dict[str, Any] | None, Problem | None]:
    """A whole-file JSON object keyed by id (PubMedQA, MIRAGE), or the Problem that stops reading it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        return None, Problem(str(path), e.lineno, None, f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(data, dict):
        return None, Problem(str(path), None, None, f"expected a JSON object keyed by {keyed_by}, got {kind(data)}")
    return data, None


def csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line of the row, cells) for each non-blank row; quoted cells may span lines."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        start = 1
        try:
            for row in reader:
                line, start = start, reader.line_num + 1
                if any(cell.strip() for cell in row):
                    yield line, row
        except csv.Error as e:
            raise ClinqaError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
