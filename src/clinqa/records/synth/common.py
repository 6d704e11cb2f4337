"""Small pieces the synthetic-patient generator shares: FHIR JSON snippets (a CodeableConcept, a
UCUM Quantity), rounding and age arithmetic, and the visit and prescription records it plans with."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from clinqa.records.synth.codes import UCUM


def _cc(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _qty(value: float | int, unit: str, code: str | None = None) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": code or unit}


def _round(value: float, decimals: int) -> float | int:
    return int(round(value)) if decimals == 0 else round(value, decimals)


def _years_between(d0: date, d1: date) -> int:
    return d1.year - d0.year - ((d1.month, d1.day) < (d0.month, d0.day))


@dataclass
class _Visit:
    day: date
    kind: str  # wellness | followup | diagnosis | acute | procedure
    minute: int = 0  # minutes after midnight
    about: list[str] = field(default_factory=list)  # condition keys this visit deals with
    diagnoses: list[str] = field(default_factory=list)  # chronic condition keys diagnosed at this visit
    resource: dict | None = None  # the Encounter


@dataclass
class _Prescription:
    drug: str
    start: date
    condition: str | None
    end: date | None = None
    status: str = "active"
    visit: _Visit | None = None
    reason: dict | None = None  # the Condition it treats
    resource: dict | None = None
