"""Record lines as prompt text: one rendered line per resource (`render_record`), quoted as data, counted
in tokens, and resolved back to the record's resources by their ``Type/id`` handles. Shared by both
stages of the records pipeline (`clinqa.records.selectors`, `clinqa.records.answering`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from clinqa.errors import ClinqaError
from clinqa.models.base import HasContextLimit, tokenizer_of
from clinqa.records.fhir import PatientRecord
from clinqa.records.questions import RecordQuestion
from clinqa.records.render import render_record

Line = tuple[str, str]  # (resource id, rendered line)

WORDS_TO_TOKENS = 1.3  # token estimate for a predictor without a tokenizer
DEFAULT_WINDOW = 4096  # context window assumed when a predictor does not say


def quote_line(text: str) -> str:
    """One record line as a quoted block: whitespace (newlines too) collapsed to single spaces and runs of
    '<' or '>' shortened, so the text cannot open or close a <<< >>> block or start a prompt line."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    text = re.sub(r"<{2,}", "<", text)
    text = re.sub(r">{2,}", ">", text)
    return f"<<<{text}>>>"


def _clean_question(question: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[<>]{3,}", " ", str(question))).strip()


def _question_text(question: str | RecordQuestion) -> str:
    return question.question if isinstance(question, RecordQuestion) else str(question)


_tokenizer = tokenizer_of  # the old private name (clinqa.records.pipeline re-exports it)


def count_tokens(predictor: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each text under the predictor's tokenizer (a words x 1.3 estimate without one)."""
    texts = list(texts)
    if not texts:
        return []
    tok = _tokenizer(predictor)
    if tok is not None:
        return [len(ids) for ids in tok(texts).input_ids]
    return [int(math.ceil(len(t.split()) * WORDS_TO_TOKENS)) + 1 for t in texts]


def context_window(predictor: Any) -> int:
    """The predictor's context window in tokens (its max_length, else ModelInfo.context_length, else 4096)."""
    for value in (
        predictor.max_length if isinstance(predictor, HasContextLimit) else None,
        getattr(getattr(predictor, "info", None), "context_length", None),
    ):
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_WINDOW


def _resource_type(record: PatientRecord, rid: str) -> str:
    res = record.resources.get(rid) or {}
    return str(res.get("resourceType") or "?")


def handle_map(record: PatientRecord) -> dict[str, str]:
    """``Type/id`` handle (as rendered and cited) -> resource key, for every resource of the record."""
    out = {}
    for key, res in record.resources.items():
        out[f"{res.get('resourceType', '?')}/{res.get('id', key)}"] = key
        if "/" in key:
            out.setdefault(key, key)
    return out


def _handle(record: PatientRecord, rid: str) -> str:
    res = record.resources.get(rid) or {}
    return f"{res.get('resourceType', '?')}/{res.get('id', rid)}"


def _by_patient(records: Mapping[str, PatientRecord] | Sequence[PatientRecord]) -> dict[str, PatientRecord]:
    if isinstance(records, Mapping):
        return dict(records)
    return {r.patient_id: r for r in records}


class _LineCache(dict):
    def __init__(self, records: Mapping[str, PatientRecord]):
        super().__init__()
        self.records = records

    def __missing__(self, patient_id: str) -> list[Line]:
        record = self.records.get(patient_id)
        if record is None:
            raise ClinqaError(f"no record for patient {patient_id!r} among the {len(self.records)} records given")
        value = self[patient_id] = render_record(record)
        return value
