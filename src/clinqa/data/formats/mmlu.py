"""MMLU headerless CSV: question, A, B, C, D, answer letter; the subject comes from the file name."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from clinqa.data.formats.common import Problem, Raw, RowError, csv_rows, question
from clinqa.data.schema import Question

# The usual medical subset of MMLU (the file names' subject part).
MMLU_MEDICAL: tuple[str, ...] = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)


def mmlu_subject(path: str | Path) -> str:
    """`clinical_knowledge_test.csv` -> `clinical_knowledge` (strips _test, _dev, _val)."""
    stem = Path(path).stem
    for suffix in ("_test", "_dev", "_val"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def read_headerless_csv(path: Path) -> Iterator[Raw | Problem]:
    for line, row in csv_rows(path):
        yield Raw(path, line, None, row)


def from_mmlu(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """MMLU: headerless rows question, A, B, C, D, answer; id mmlu-{file stem}-{line}, source mmlu:{subject}."""
    row = raw.data
    if len(row) != 6:
        raise RowError(None, f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
    stem, *opts, answer = row
    if answer.strip().upper() not in ("A", "B", "C", "D"):
        raise RowError("answer", f"must be A, B, C or D, got {answer!r}")
    subject = mmlu_subject(raw.path)
    fields = {
        "id": f"mmlu-{raw.path.stem}-{raw.line}",
        "question": stem,
        "options": dict(zip("ABCD", opts)),
        "answer": answer.strip().upper(),
        "source": f"mmlu:{subject}",
        "meta": {"subject": subject},
    }
    return question(fields, {f"options.{l}": l for l in "ABCD"})
