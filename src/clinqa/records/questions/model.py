"""A question about a patient's record and its reference answer (`RecordQuestion`), the ten question
types, and the JSON Lines files questions are kept in."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clinqa.errors import ClinqaError

QType = Literal["lookup", "latest", "window", "trend", "list", "count", "average", "exists", "multi", "unanswerable"]
QTYPES: tuple[str, ...] = (
    "lookup",
    "latest",
    "window",
    "trend",
    "list",
    "count",
    "average",
    "exists",
    "multi",
    "unanswerable",
)
NOT_IN_RECORD = "not in the record"


class RecordQuestion(BaseModel):
    """A question about one patient's record and its reference answer."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    patient_id: str
    question: str = Field(min_length=1)
    qtype: QType
    relevant_ids: list[str] = Field(default_factory=list)  # keys of PatientRecord.resources that hold the answer
    answer: str  # reference answer, in words
    answer_value: bool | int | float | str | list[float] | list[str] | None = None
    unit: str | None = None
    now: date  # the date "now" / "the last 6 months" refer to
    meta: dict[str, Any] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------- files


def write_questions(path: str | Path, questions: Iterable[RecordQuestion]) -> Path:
    """Questions as JSON Lines, one per line (parent folders are created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for q in questions:
            fh.write(q.model_dump_json() + "\n")
    return out


def read_questions(path: str | Path) -> list[RecordQuestion]:
    """Questions written by `write_questions`; ClinqaError names the line and field of a bad one."""
    src = Path(path)
    try:
        lines = src.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise ClinqaError(f"{src}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClinqaError(f"{src}: cannot read ({exc})") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(RecordQuestion.model_validate(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ClinqaError(f"{src}: line {n}: not JSON ({exc.msg}, column {exc.colno})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            fld = ".".join(str(p) for p in err.get("loc", ())) or "(question)"
            raise ClinqaError(f"{src}: line {n}: field '{fld}': {err.get('msg')}") from None
    return out
