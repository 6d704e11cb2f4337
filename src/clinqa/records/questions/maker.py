"""`QuestionMaker`: what every question type builds on. `ask` words a question from a template and
records it with its reference answer; `take` makes up to `per_type` questions from shuffled
candidates; `pick_window` chooses a look-back window in months for a measurement series."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from datetime import date
from typing import Any

from clinqa.records.fhir import PatientRecord
from clinqa.records.questions.facts import Measurement, Series, _months_ago, measurement_series
from clinqa.records.questions.model import RecordQuestion


class QuestionMaker:
    """The state questions are made with: the record as of `now`, its measurement series, the seeded
    rng, the phrasings, and the questions made so far (no two with the same text)."""

    def __init__(
        self, record: PatientRecord, now: date, rng: random.Random, phrasings: dict[str, list[str]], per_type: int
    ):
        self.record, self.now, self.rng, self.phrasings, self.per_type = record, now, rng, phrasings, per_type
        self.series = measurement_series(record, now)
        self.out: list[RecordQuestion] = []
        self.texts: set[str] = set()

    def ask(self, template: str, qtype: str, fields: dict[str, Any], *, answer: str, value: Any, relevant: Iterable[str],
            unit: str | None = None, **meta: Any) -> bool:  # fmt: skip
        options = self.phrasings[template]
        index = self.rng.randrange(len(options))
        question = options[index].format(**fields)
        if question in self.texts:
            return False
        self.texts.add(question)
        relevant = list(dict.fromkeys(relevant))
        digest = hashlib.sha1(f"{self.record.patient_id}|{template}|{question}".encode()).hexdigest()[:10]
        self.out.append(RecordQuestion(
            id=f"{self.record.patient_id[:8]}-{qtype}-{digest}", patient_id=self.record.patient_id, question=question,
            qtype=qtype, relevant_ids=relevant, answer=answer, answer_value=value, unit=unit or None, now=self.now,
            meta={"template": template, "phrasing": index, **meta},
        ))  # fmt: skip
        return True

    def shuffled(self, items: Iterable[Any]) -> list[Any]:
        items = list(items)
        self.rng.shuffle(items)
        return items

    def take(self, candidates: Iterable[Any], make) -> None:
        made = 0
        for c in self.shuffled(candidates):
            if made >= self.per_type:
                break
            if make(c):
                made += 1

    def pick_window(self, s: Series, min_count: int = 1) -> tuple[int, list[Measurement]] | None:
        """A window (months) holding some but preferably not all of the series' points."""
        best = None
        for months in self.shuffled([3, 6, 12, 24, 36, 60]):
            start = _months_ago(self.now, months)
            inside = [p for p in s.points if start < p.day <= self.now]
            if min_count <= len(inside) <= 8:
                if len(inside) < len(s.points):
                    return months, inside
                best = best or (months, inside)
        return best
