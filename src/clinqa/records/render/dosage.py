"""A Dosage in words: its text, else dose, frequency, route, as-needed and bounds."""

from __future__ import annotations

from typing import Any

from clinqa.records.render.dates import _day
from clinqa.records.render.text import _one_line, concept_text, format_number, format_quantity, value_text

_PERIOD_UNITS = {"s": "second", "min": "minute", "h": "hour", "d": "day", "wk": "week", "mo": "month", "a": "year"}
_TIMES = {1: "once", 2: "twice", 3: "three times", 4: "four times"}


def _frequency(repeat: dict) -> str:
    f, p, unit = repeat.get("frequency"), repeat.get("period"), repeat.get("periodUnit")
    if f is None or p is None or not unit:
        return ""
    unit_word = _PERIOD_UNITS.get(unit, unit)
    times = _TIMES.get(int(f), f"{format_number(f)} times") if float(f).is_integer() else f"{format_number(f)} times"
    if float(p) == 1:
        every = {"day": "daily", "week": "weekly", "month": "monthly", "year": "yearly", "hour": "hourly"}.get(
            unit_word
        )
        return f"{times} {every}" if every else f"{times} per {unit_word}"
    if int(f) == 1:
        return f"every {format_number(p)} {unit_word}s"
    return f"{times} every {format_number(p)} {unit_word}s"


def dosage_text(dosage: Any) -> str:
    """A Dosage in words: its text if it has one, else dose, frequency, as-needed and bounds."""
    if not isinstance(dosage, dict):
        return ""
    if dosage.get("text"):
        return _one_line(dosage["text"])
    parts = []
    for dr in dosage.get("doseAndRate") or []:
        if isinstance(dr, dict) and dr.get("doseQuantity"):
            q = dr["doseQuantity"]
            parts.append(format_quantity(q) if (q.get("unit") or q.get("code")) else f"dose {format_quantity(q)}")
            break
        if isinstance(dr, dict) and dr.get("doseRange"):
            parts.append(value_text({"valueRange": dr["doseRange"]}))
            break
    timing = dosage.get("timing") or {}
    repeat = timing.get("repeat") or {}
    freq = _frequency(repeat) or concept_text(timing.get("code"))
    if freq:
        parts.append(freq)
    if dosage.get("route"):
        parts.append(concept_text(dosage["route"]))
    if dosage.get("asNeededBoolean") is True:
        parts.append("as needed")
    elif dosage.get("asNeededCodeableConcept"):
        parts.append(f"as needed for {concept_text(dosage['asNeededCodeableConcept'])}")
    if repeat.get("boundsDuration"):
        parts.append(f"for {format_quantity(repeat['boundsDuration'])}")
    if repeat.get("boundsPeriod"):
        bp = repeat["boundsPeriod"]
        if bp.get("start") and bp.get("end"):
            parts.append(f"from {_day(bp['start'])} to {_day(bp['end'])}")
        elif bp.get("start"):
            parts.append(f"from {_day(bp['start'])}")
        elif bp.get("end"):
            parts.append(f"until {_day(bp['end'])}")
    return ", ".join(p for p in parts if p)
