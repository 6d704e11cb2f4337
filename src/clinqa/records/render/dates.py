"""When a resource happened: the field each resource type keeps its clinically relevant date in, and
that date as written (`resource_datetime`) or as a calendar date (`resource_date`)."""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from clinqa.records.fhir.record import parse_date

# Where each resource type keeps its clinically relevant date, in order of preference.
_DATE_FIELDS: dict[str, tuple[str, ...]] = {
    "Patient": ("birthDate",),
    "Observation": (
        "effectiveDateTime",
        "effectivePeriod.start",
        "effectiveInstant",
        "effectiveTiming.event[0]",
        "issued",
    ),
    "Condition": ("onsetDateTime", "onsetPeriod.start", "recordedDate", "abatementDateTime"),
    "MedicationRequest": ("authoredOn", "dosageInstruction[0].timing.repeat.boundsPeriod.start"),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod.start", "dateAsserted"),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod.start"),
    "MedicationDispense": ("whenHandedOver", "whenPrepared"),
    "Encounter": ("period.start", "period.end"),
    "Procedure": ("performedDateTime", "performedPeriod.start", "performedString"),
    "Immunization": ("occurrenceDateTime", "recorded"),
    "AllergyIntolerance": ("onsetDateTime", "onsetPeriod.start", "recordedDate", "lastOccurrence"),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod.start", "issued"),
    "CarePlan": ("period.start", "created"),
    "CareTeam": ("period.start",),
    "Goal": ("startDate", "statusDate"),
    "DocumentReference": ("date", "context.period.start"),
    "ImagingStudy": ("started",),
    "Claim": ("billablePeriod.start", "created"),
    "ExplanationOfBenefit": ("billablePeriod.start", "created"),
    "Coverage": ("period.start",),
    "Device": ("manufactureDate",),
    "SupplyDelivery": ("occurrenceDateTime",),
    "ServiceRequest": ("occurrenceDateTime", "authoredOn"),
}
_GENERIC_DATE_FIELDS = (
    "effectiveDateTime", "effectivePeriod.start", "occurrenceDateTime", "occurrencePeriod.start", "performedDateTime",
    "performedPeriod.start", "authoredOn", "onsetDateTime", "recordedDate", "period.start", "date", "issued", "created",
)  # fmt: skip


def _get(node: Any, path: str) -> Any:
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            i = int(part[1:-1])
            node = node[i] if isinstance(node, list) and len(node) > i else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


def resource_datetime(resource: dict) -> str | None:
    """The raw date/dateTime string that dates this resource (onset, effective time, authoredOn, ...)."""
    for path in _DATE_FIELDS.get(resource.get("resourceType", ""), _GENERIC_DATE_FIELDS):
        value = _get(resource, path)
        if isinstance(value, str) and parse_date(value) is not None:
            return value
    return None


def resource_date(resource: dict) -> date | None:
    """The calendar date of the resource (see `resource_datetime`), for sorting and windows; None if undated."""
    return parse_date(resource_datetime(resource))


def _day(value: Any) -> str:
    """The date part of a FHIR date/dateTime, as written (no time-zone shifting)."""
    return value[:10] if isinstance(value, str) else "?"
