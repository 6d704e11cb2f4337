"""Facts read off a record for questions: numeric measurement series by name, dated resources of a
type as of `now`, active conditions, names of conditions and drugs as a question says them, window
arithmetic in calendar months, and the trend of a short series."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from dateutil.relativedelta import relativedelta

from clinqa.records.fhir import PatientRecord, parse_date
from clinqa.records.questions.vocabulary import _ACTIVE_CONDITION, _BAD_VERIFICATION, _INACTIVE_OBS, FRIENDLY
from clinqa.records.render import concept_text, format_number, resource_date, resource_datetime, rounded, status_code


@dataclass(frozen=True)
class Measurement:
    rid: str  # resource key
    day: date
    when: str
    value: float  # as shown (rounded)
    unit: str


@dataclass
class Series:
    name: str
    codes: set[str]
    unit: str
    points: list[Measurement]


def _codes(cc: Any) -> list[tuple[str, str]]:
    if not isinstance(cc, dict):
        return []
    return [
        (c.get("system") or "", str(c.get("code")))
        for c in cc.get("coding") or []
        if isinstance(c, dict) and c.get("code")
    ]


def _loinc(cc: Any) -> str | None:
    for system, code in _codes(cc):
        if system == "http://loinc.org":
            return code
    return None


def clean_name(text: str) -> str:
    """A display as a noun phrase in a question: "Essential hypertension (disorder)" -> "essential hypertension",
    "Leukocytes [#/volume] in Blood by Automated count" -> "leukocytes in blood by automated count"."""
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(
        r"\s*\((disorder|finding|situation|procedure|substance|organism|morphologic abnormality|qualifier value)\)\s*$",
        "",
        text,
    )
    text = re.sub(r"\s+", " ", text).strip(" -")
    words = [
        w if (sum(ch.isupper() for ch in w) > 1 or any(ch.isdigit() for ch in w)) else w.lower()
        for w in text.split(" ")
    ]
    return " ".join(words)


def drug_name(display: str) -> str:
    """The ingredient part of a medication display: "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet"
    -> "metformin hydrochloride"; "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet" -> "amoxicillin / clavulanate"."""
    text = re.sub(r"\[[^\]]*\]", " ", display)
    text = re.sub(r"^\s*((\d+ HR|\d+ ACTUAT|NDA\d+|\d+(\.\d+)? ML)\s+)+", "", text, flags=re.I)
    parts = []
    for part in text.split(" / "):
        words = []
        for w in part.split():
            if re.match(r"^[\d.]", w):
                break
            words.append(w)
        if words:
            parts.append(" ".join(words).lower())
    return " / ".join(parts) or display.lower()


def _obs_name(cc: Any) -> str:
    code = _loinc(cc)
    if code in FRIENDLY:
        return FRIENDLY[code]
    return clean_name(concept_text(cc)) or (code or "unnamed measurement")


def measurement_series(record: PatientRecord, now: date) -> dict[str, Series]:
    """Numeric measurements by name (Observation valueQuantity, and components such as blood pressure),
    dated on or before `now`, oldest first. A name measured in several units keeps its most common unit."""
    raw: dict[str, list[tuple[Measurement, str]]] = {}
    for key, res in record.resources.items():
        if res.get("resourceType") != "Observation" or res.get("status") in _INACTIVE_OBS:
            continue
        when = resource_datetime(res)
        day = parse_date(when)
        if day is None or day > now:
            continue
        nodes = [res, *[c for c in res.get("component") or [] if isinstance(c, dict)]]
        for node in nodes:
            q = node.get("valueQuantity")
            if (
                not isinstance(q, dict)
                or not isinstance(q.get("value"), (int, float))
                or isinstance(q.get("value"), bool)
            ):
                continue
            name = _obs_name(node.get("code"))
            unit = str(q.get("unit") or q.get("code") or "")
            code = _loinc(node.get("code")) or concept_text(node.get("code"))
            raw.setdefault(name, []).append((Measurement(key, day, when or "", rounded(float(q["value"])), unit), code))
    out = {}
    for name, items in raw.items():
        unit = Counter(m.unit for m, _ in items).most_common(1)[0][0]
        points = sorted((m for m, _ in items if m.unit == unit), key=lambda m: m.when)
        out[name] = Series(name, {c for _, c in items}, unit, points)
    return out


def _is_active_condition(res: dict, now: date) -> bool:
    if status_code(res.get("verificationStatus")) in _BAD_VERIFICATION:
        return False
    abated = parse_date(res.get("abatementDateTime") or (res.get("abatementPeriod") or {}).get("start"))
    if abated is not None and abated <= now:
        return False
    status = status_code(res.get("clinicalStatus"))
    return status in _ACTIVE_CONDITION if status else abated is None


def _dated(record: PatientRecord, rtype: str, now: date) -> list[tuple[str, dict, date]]:
    out = []
    for key, res in record.resources.items():
        if res.get("resourceType") != rtype:
            continue
        day = resource_date(res)
        if day is not None and day <= now:
            out.append((key, res, day))
    return sorted(out, key=lambda t: (t[2], resource_datetime(t[1]) or ""))


def record_end(record: PatientRecord) -> date | None:
    """The latest date of any resource in the record (the Patient's birth date aside)."""
    days = [resource_date(r) for r in record.resources.values() if r.get("resourceType") != "Patient"]
    days = [d for d in days if d is not None]
    return max(days) if days else None


def _months_ago(now: date, months: int) -> date:
    """The same day `months` calendar months earlier, clamped to the end of a shorter month."""
    return now - relativedelta(months=months)


def _period_words(months: int) -> str:
    if months % 12 == 0:
        years = months // 12
        return "year" if years == 1 else f"{years} years"
    return f"{months} months"


def _qty_text(m: Measurement) -> str:
    return f"{format_number(m.value)} {m.unit}".strip()


def trend_label(values: Sequence[float]) -> tuple[str, float] | None:
    """("increasing" | "decreasing" | "stable", relative change) for a short series, or None when it is
    not clear-cut. Increasing/decreasing: every step goes the same way (ties allowed) and the
    least-squares change over the series is at least 8% of the mean. Stable: every value within 5% of
    the mean and a fitted change of at most 3%."""
    k = len(values)
    if k < 2:
        return None
    mean = sum(values) / k
    if mean <= 0:
        return None
    xbar = (k - 1) / 2
    slope = sum((x - xbar) * (v - mean) for x, v in enumerate(values)) / sum((x - xbar) ** 2 for x in range(k))
    rel = slope * (k - 1) / mean
    steps = [b - a for a, b in zip(values, values[1:])]
    if rel >= 0.08 and all(d >= 0 for d in steps):
        return "increasing", round(rel, 4)
    if rel <= -0.08 and all(d <= 0 for d in steps):
        return "decreasing", round(rel, 4)
    if abs(rel) <= 0.03 and max(abs(v - mean) for v in values) <= 0.05 * mean:
        return "stable", round(rel, 4)
    return None
