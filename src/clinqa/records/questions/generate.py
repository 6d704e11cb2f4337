"""`generate_questions`: the entry point, and the registry of question types (`STEPS`: question type ->
the function that makes its questions, in `QTYPES` order; each draws from the same seeded rng)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, timedelta

from clinqa.records.fhir import PatientRecord, parse_date
from clinqa.records.questions import lists, measurements, multi, presence
from clinqa.records.questions.facts import record_end
from clinqa.records.questions.maker import QuestionMaker
from clinqa.records.questions.model import QTYPES, RecordQuestion
from clinqa.records.questions.phrasings import _check_phrasings

STEPS: dict[str, Callable[[QuestionMaker], None]] = {
    "lookup": measurements.lookup,
    "latest": measurements.latest,
    "window": measurements.window,
    "trend": measurements.trend,
    "list": lists.lists,
    "count": measurements.count,
    "average": measurements.average,
    "exists": presence.exists,
    "multi": multi.multi,
    "unanswerable": presence.unanswerable,
}


def generate_questions(
    record: PatientRecord,
    *,
    now: date | str | None,
    seed: int = 0,
    phrasings: Mapping[str, Sequence[str]] | None = None,
    per_type: int = 3,
    qtypes: Iterable[str] | None = None,
) -> list[RecordQuestion]:
    """Up to `per_type` questions of each type in `qtypes` (default: all ten) about `record`, as of `now`
    (a date or ISO string; None = the day after the record's last dated resource).

    `phrasings` replaces the wording of some templates (keys of PHRASINGS; placeholders as there).
    Deterministic: the same record, now, seed and options give the same questions."""
    if isinstance(now, str):
        parsed = parse_date(now)
        if parsed is None or len(now) < 10:
            raise ValueError(f"now must be a date (YYYY-MM-DD), got {now!r}")
        now = parsed
    if now is None:
        end = record_end(record)
        now = (end + timedelta(days=1)) if end else date.today()
    if per_type < 1:
        raise ValueError(f"per_type must be >= 1, got {per_type}")
    wanted = list(qtypes) if qtypes is not None else list(QTYPES)
    unknown = set(wanted) - set(QTYPES)
    if unknown:
        raise ValueError(f"unknown question types {sorted(unknown)}; known: {', '.join(QTYPES)}")
    gen = QuestionMaker(
        record,
        now,
        random.Random(f"clinqa-questions:{seed}:{record.patient_id}"),
        _check_phrasings(phrasings or {}),
        per_type,
    )
    for qtype in QTYPES:
        if qtype in wanted:
            STEPS[qtype](gen)
    return gen.out
