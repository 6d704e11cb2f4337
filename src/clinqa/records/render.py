"""One compact, faithful line of text per FHIR resource, for a language model to read.

    [Observation/abc123] 2021-03-04 Observation: Hemoglobin A1c/Hemoglobin.total in Blood (LOINC 4548-4) = 6.3 % (final)

The line starts with the resource's handle (what a model cites) and its clinically relevant date,
then says what the resource records, with codes, values, units and status as they are in the
resource (numbers are shortened to 2 decimals, or 3 significant digits below 1). Nothing is
inferred: a field that is absent is left out of the line.
"""

from __future__ import annotations

import math
import re
from datetime import date
from typing import TYPE_CHECKING, Any

from clinqa.records.fhir import parse_date, patient_name

if TYPE_CHECKING:
    from clinqa.records.fhir import PatientRecord

SYSTEMS = {
    "http://loinc.org": "LOINC",
    "http://snomed.info/sct": "SNOMED",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
    "http://hl7.org/fhir/sid/icd-9-cm": "ICD-9-CM",
    "http://hl7.org/fhir/sid/ndc": "NDC",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://unitsofmeasure.org": "UCUM",
    "http://www.whocc.no/atc": "ATC",
}
ENCOUNTER_CLASSES = {
    "AMB": "ambulatory",
    "EMER": "emergency",
    "IMP": "inpatient",
    "ACUTE": "inpatient acute",
    "NONAC": "inpatient non-acute",
    "OBSENC": "observation",
    "PRENC": "pre-admission",
    "SS": "short stay",
    "VR": "virtual",
    "HH": "home health",
    "FLD": "field",
}
INTERPRETATIONS = {
    "H": "high",
    "HH": "critically high",
    "L": "low",
    "LL": "critically low",
    "N": "normal",
    "A": "abnormal",
    "AA": "critically abnormal",
    "POS": "positive",
    "NEG": "negative",
}
_PERIOD_UNITS = {"s": "second", "min": "minute", "h": "hour", "d": "day", "wk": "week", "mo": "month", "a": "year"}
_TIMES = {1: "once", 2: "twice", 3: "three times", 4: "four times"}

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


def _one_line(text: Any) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


# ---------------------------------------------------------------------------------------- values


def format_number(value: Any) -> str:
    """6.3 -> "6.3"; 180.63849 -> "180.64"; 0.012345 -> "0.0123"; 5.0 -> "5"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    a = abs(value)
    if a >= 1 or a == 0:
        text = f"{value:.2f}"
    else:
        decimals = 2 - int(math.floor(math.log10(a)))  # 3 significant digits
        text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def rounded(value: float) -> float | int:
    """The number as `format_number` shows it (what a model reading the line sees)."""
    text = format_number(value)
    number = float(text)
    return int(number) if number.is_integer() and "." not in text else number


def format_quantity(q: Any) -> str:
    if not isinstance(q, dict):
        return ""
    value = q.get("value")
    unit = q.get("unit") or q.get("code") or ""
    text = (q.get("comparator") or "") + (format_number(value) if value is not None else "?")
    return f"{text} {unit}".strip()


def coding_label(coding: dict) -> str:
    system = coding.get("system")
    short = SYSTEMS.get(system or "", "")
    if not short and system:
        short = system.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    code = coding.get("code")
    return f"{short} {code}".strip() if code else ""


def concept_text(cc: Any) -> str:
    """The human text of a CodeableConcept: its text, else the first coding display, else the first code."""
    if not isinstance(cc, dict):
        return ""
    if cc.get("text"):
        return _one_line(cc["text"])
    for c in cc.get("coding") or []:
        if isinstance(c, dict) and c.get("display"):
            return _one_line(c["display"])
    for c in cc.get("coding") or []:
        if isinstance(c, dict) and c.get("code"):
            return str(c["code"])
    return ""


def concept_label(cc: Any) -> str:
    """ "Text (SYSTEM code; SYSTEM code)" for a CodeableConcept (up to 3 codes)."""
    text = concept_text(cc)
    if not isinstance(cc, dict):
        return text
    codes = [coding_label(c) for c in cc.get("coding") or [] if isinstance(c, dict)]
    codes = [c for c in codes if c][:3]
    if codes and text and text not in codes and all(text != c.split(" ", 1)[-1] for c in codes):
        return f"{text} ({'; '.join(codes)})"
    return text or "; ".join(codes)


def _coding_or_concept(node: Any) -> str:
    if isinstance(node, dict) and ("coding" in node or "text" in node):
        return concept_label(node)
    if isinstance(node, dict):
        label = node.get("display") or node.get("code") or ""
        return str(label)
    return ""


def status_code(node: Any) -> str:
    """The code of a status CodeableConcept ("active"), or the plain status string."""
    if isinstance(node, str):
        return node
    if isinstance(node, dict):
        for c in node.get("coding") or []:
            if isinstance(c, dict) and c.get("code"):
                return str(c["code"])
        return str(node.get("text") or "")
    return ""


def _ref_label(ref: Any, record: PatientRecord | None) -> str:
    """What a Reference points to, in words: the target's code text when we can resolve it, else its display."""
    if not isinstance(ref, dict):
        return ""
    target = record.resolve(ref) if record is not None else None
    if target is not None:
        for fld in ("code", "vaccineCode", "medicationCodeableConcept"):
            if target.get(fld):
                return concept_text(target[fld])
        if target.get("name"):
            return (
                patient_name(target) if target["resourceType"] in ("Patient", "Practitioner") else str(target["name"])
            )
    return _one_line(ref.get("display") or ref.get("reference") or "")


def value_text(node: dict, record: PatientRecord | None = None) -> str:
    """The value[x] of an Observation or component, as text ("" if it has none)."""
    for key, val in node.items():
        if not key.startswith("value"):
            continue
        kind = key[5:]
        if kind == "Quantity":
            return format_quantity(val)
        if kind == "CodeableConcept":
            return concept_label(val)
        if kind == "String":
            return _one_line(val)
        if kind == "Boolean":
            return "true" if val else "false"
        if kind in ("Integer", "Decimal"):
            return format_number(val)
        if kind == "Range":
            low, high = val.get("low"), val.get("high")
            return f"{format_quantity(low) or '?'} to {format_quantity(high) or '?'}"
        if kind == "Ratio":
            return f"{format_quantity(val.get('numerator'))} / {format_quantity(val.get('denominator'))}"
        if kind == "Period":
            return f"{_day(val.get('start'))} to {_day(val.get('end'))}"
        if kind in ("DateTime", "Time"):
            return str(val)
        if kind == "SampledData":
            return "(sampled data)"
        if kind == "Attachment":
            return f"(attachment {val.get('title') or val.get('contentType') or ''})".replace(" )", ")")
        if kind == "Reference":
            return _ref_label(val, record)
    if node.get("dataAbsentReason"):
        return f"no value ({concept_text(node['dataAbsentReason'])})"
    return ""


def _reference_range(ranges: Any) -> str:
    if not isinstance(ranges, list) or not ranges or not isinstance(ranges[0], dict):
        return ""
    r = ranges[0]
    if r.get("text"):
        return f"ref {_one_line(r['text'])}"
    low, high = r.get("low"), r.get("high")
    lo = format_number(low.get("value")) if isinstance(low, dict) and low.get("value") is not None else None
    hi = format_number(high.get("value")) if isinstance(high, dict) and high.get("value") is not None else None
    if lo and hi:
        return f"ref {lo}-{hi}"
    if lo:
        return f"ref >={lo}"
    if hi:
        return f"ref <={hi}"
    return ""


def _interpretation(node: dict) -> str:
    out = []
    for cc in node.get("interpretation") or []:
        code = status_code(cc)
        out.append(INTERPRETATIONS.get(code, concept_text(cc) or code))
    return ", ".join(o for o in out if o)


def _flags(*parts: str) -> str:
    parts = tuple(p for p in parts if p)
    return f" ({'; '.join(parts)})" if parts else ""


# ---------------------------------------------------------------------------------------- dosage


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


# ---------------------------------------------------------------------------------------- per type


def resolve_medication(resource: dict, record: PatientRecord | None = None) -> tuple[dict | None, str]:
    """A medication resource's CodeableConcept (inline, or the code of the Medication its
    medicationReference points to) and "", or (None, the reference's display or reference text)."""
    if resource.get("medicationCodeableConcept"):
        return resource["medicationCodeableConcept"], ""
    ref = resource.get("medicationReference")
    if isinstance(ref, dict):
        target = record.resolve(ref) if record is not None else None
        if target is not None and target.get("code"):
            return target["code"], ""
        return None, str(ref.get("display") or ref.get("reference") or "")
    return None, ""


def medication_label(resource: dict, record: PatientRecord | None = None, *, codes: bool = True) -> str:
    """The medication a resource names, in words: "text (RxNorm code)" as the rendered line shows it, or
    with ``codes=False`` the text alone (what a question or its answer says); the reference's display
    when the medication cannot be resolved to a code."""
    concept, fallback = resolve_medication(resource, record)
    if concept is None:
        return _one_line(fallback)
    return concept_label(concept) if codes else concept_text(concept)


def _reasons(resource: dict, record: PatientRecord | None) -> str:
    out = [concept_text(cc) for cc in resource.get("reasonCode") or []]
    out += [_ref_label(ref, record) for ref in resource.get("reasonReference") or []]
    return ", ".join(o for o in out if o)


def _period(period: Any) -> str:
    if not isinstance(period, dict):
        return ""
    start, end = period.get("start"), period.get("end")
    if start and end:
        return f"{_day(start)} to {_day(end)}"
    if start:
        return f"from {_day(start)}"
    if end:
        return f"until {_day(end)}"
    return ""


def _render_patient(r: dict, record: PatientRecord | None) -> str:
    parts = [patient_name(r) or "(no name)"]
    if r.get("gender"):
        parts.append(str(r["gender"]))
    if r.get("birthDate"):
        parts.append(f"born {r['birthDate']}")
    if r.get("deceasedDateTime"):
        parts.append(f"deceased {_day(r['deceasedDateTime'])}")
    elif r.get("deceasedBoolean") is True:
        parts.append("deceased")
    return "; ".join(parts)


def _render_condition(r: dict, record: PatientRecord | None) -> str:
    parts = [concept_label(r.get("code")) or "(no code)"]
    onset = r.get("onsetDateTime") or _get(r, "onsetPeriod.start")
    if onset:
        parts.append(f"onset {_day(onset)}")
    elif r.get("onsetAge"):
        parts.append(f"onset at age {format_quantity(r['onsetAge'])}")
    elif r.get("onsetString"):
        parts.append(f"onset {_one_line(r['onsetString'])}")
    elif r.get("recordedDate"):
        parts.append(f"recorded {_day(r['recordedDate'])}")
    abate = r.get("abatementDateTime") or _get(r, "abatementPeriod.start")
    if abate:
        parts.append(f"abated {_day(abate)}")
    elif r.get("abatementString"):
        parts.append(f"abated {_one_line(r['abatementString'])}")
    elif r.get("abatementBoolean") is True:
        parts.append("abated")
    verification = status_code(r.get("verificationStatus"))
    return "; ".join(parts) + _flags(
        status_code(r.get("clinicalStatus")), verification if verification and verification != "confirmed" else ""
    )


def _render_medication_request(r: dict, record: PatientRecord | None) -> str:
    parts = [medication_label(r, record) or "(no medication)"]
    dosages = [dosage_text(d) for d in r.get("dosageInstruction") or []]
    dosages = [d for d in dosages if d]
    if dosages:
        parts.append(" then ".join(dosages))
    if r.get("authoredOn"):
        parts.append(f"authored {_day(r['authoredOn'])}")
    reasons = _reasons(r, record)
    if reasons:
        parts.append(f"reason {reasons}")
    intent = r.get("intent")
    return "; ".join(parts) + _flags(str(r.get("status") or ""), intent if intent and intent != "order" else "")


def _render_observation(r: dict, record: PatientRecord | None) -> str:
    label = concept_label(r.get("code")) or "(no code)"
    value = value_text(r, record)
    text = f"{label} = {value}" if value else label
    comps = []
    for c in r.get("component") or []:
        if not isinstance(c, dict):
            continue
        cv = value_text(c, record)
        ci = _interpretation(c)
        comps.append(f"{concept_text(c.get('code')) or '?'} = {cv or '?'}" + (f" ({ci})" if ci else ""))
    if comps:
        text += ("; " if value else ": ") + "; ".join(comps)
    return text + _flags(_interpretation(r), _reference_range(r.get("referenceRange")), str(r.get("status") or ""))


def _render_encounter(r: dict, record: PatientRecord | None) -> str:
    types = [concept_label(t) for t in r.get("type") or []]
    parts = [", ".join(t for t in types if t) or "(no type)"]
    cls = r.get("class")
    if isinstance(cls, dict) and cls.get("code"):
        word = cls.get("display") or ENCOUNTER_CLASSES.get(cls["code"], "")
        parts.append(f"class {cls['code']}" + (f" ({word})" if word and word != cls["code"] else ""))
    period = _period(r.get("period"))
    if period:
        parts.append(period)
    reasons = _reasons(r, record)
    if reasons:
        parts.append(f"reason {reasons}")
    return "; ".join(parts) + _flags(str(r.get("status") or ""))


def _render_procedure(r: dict, record: PatientRecord | None) -> str:
    parts = [concept_label(r.get("code")) or "(no code)"]
    if r.get("performedDateTime"):
        parts.append(f"performed {_day(r['performedDateTime'])}")
    elif r.get("performedPeriod"):
        parts.append(f"performed {_period(r['performedPeriod'])}")
    elif r.get("performedString"):
        parts.append(f"performed {_one_line(r['performedString'])}")
    reasons = _reasons(r, record)
    if reasons:
        parts.append(f"reason {reasons}")
    return "; ".join(parts) + _flags(str(r.get("status") or ""))


def _render_allergy(r: dict, record: PatientRecord | None) -> str:
    parts = [concept_label(r.get("code")) or "(no substance)"]
    kind = r.get("type")
    cats = ", ".join(str(c) for c in r.get("category") or [])
    if kind or cats:
        parts.append(" ".join(p for p in (kind, f"({cats})" if cats and kind else cats) if p))
    if r.get("criticality"):
        parts.append(f"criticality {r['criticality']}")
    for reaction in r.get("reaction") or []:
        if not isinstance(reaction, dict):
            continue
        manifest = ", ".join(concept_text(m) for m in reaction.get("manifestation") or [])
        sev = reaction.get("severity")
        parts.append(f"reaction {manifest or '?'}" + (f" ({sev})" if sev else ""))
    if r.get("recordedDate"):
        parts.append(f"recorded {_day(r['recordedDate'])}")
    verification = status_code(r.get("verificationStatus"))
    return "; ".join(parts) + _flags(
        status_code(r.get("clinicalStatus")), verification if verification and verification != "confirmed" else ""
    )


def _render_immunization(r: dict, record: PatientRecord | None) -> str:
    parts = [concept_label(r.get("vaccineCode")) or "(no vaccine code)"]
    if r.get("occurrenceDateTime"):
        parts.append(f"given {_day(r['occurrenceDateTime'])}")
    elif r.get("occurrenceString"):
        parts.append(f"given {_one_line(r['occurrenceString'])}")
    if r.get("doseQuantity"):
        parts.append(f"dose {format_quantity(r['doseQuantity'])}")
    if r.get("statusReason"):
        parts.append(f"reason {concept_text(r['statusReason'])}")
    return "; ".join(parts) + _flags(str(r.get("status") or ""))


def _render_diagnostic_report(r: dict, record: PatientRecord | None, max_results: int = 6) -> str:
    parts = [concept_label(r.get("code")) or "(no code)"]
    results = [_ref_label(ref, record) for ref in r.get("result") or []]
    if results:
        shown = ", ".join(x for x in results[:max_results] if x)
        more = f", +{len(results) - max_results} more" if len(results) > max_results else ""
        parts.append(f"{len(results)} result{'s' if len(results) != 1 else ''}: {shown}{more}")
    if r.get("conclusion"):
        parts.append(f"conclusion: {_one_line(r['conclusion'])}")
    codes = [concept_text(c) for c in r.get("conclusionCode") or []]
    if any(codes):
        parts.append(f"conclusion codes: {', '.join(c for c in codes if c)}")
    return "; ".join(parts) + _flags(str(r.get("status") or ""))


def _render_care_plan(r: dict, record: PatientRecord | None) -> str:
    cats = [concept_label(c) for c in r.get("category") or []]
    parts = [", ".join(c for c in cats if c) or _one_line(r.get("title") or "") or "(no category)"]
    period = _period(r.get("period"))
    if period:
        parts.append(period)
    acts = []
    for a in r.get("activity") or []:
        detail = a.get("detail") if isinstance(a, dict) else None
        if isinstance(detail, dict):
            acts.append(concept_text(detail.get("code")) or _one_line(detail.get("description") or ""))
    if any(acts):
        parts.append(f"activities: {', '.join(a for a in acts if a)}")
    addresses = [_ref_label(ref, record) for ref in r.get("addresses") or []]
    if any(addresses):
        parts.append(f"addresses {', '.join(a for a in addresses if a)}")
    return "; ".join(parts) + _flags(
        str(r.get("status") or ""), str(r.get("intent") or "") if r.get("intent") not in (None, "plan", "order") else ""
    )


def _render_generic(r: dict, record: PatientRecord | None) -> str:
    parts = []
    if r.get("resourceType") in ("Organization", "Practitioner", "Location", "HealthcareService") and r.get("name"):
        name = r["name"]
        return patient_name(r) if isinstance(name, list) else _one_line(name)
    for fld in ("code", "vaccineCode", "type", "category"):
        node = r.get(fld)
        if isinstance(node, list):
            node = node[0] if node else None
        label = _coding_or_concept(node)
        if label:
            parts.append(label)
            break
    med = medication_label(r, record)
    if med:
        parts.append(med)
    if not parts and r.get("name"):
        name = r["name"]
        parts.append(patient_name(r) if isinstance(name, list) else _one_line(name))
    if not parts and r.get("description"):
        parts.append(_one_line(r["description"])[:200])
    value = value_text(r, record)
    if value:
        parts.append(f"= {value}")
    status = r.get("status")
    return ("; ".join(parts) or "(no code)") + _flags(status_code(status) if status else "")


_RENDERERS = {
    "Patient": _render_patient,
    "Condition": _render_condition,
    "MedicationRequest": _render_medication_request,
    "Observation": _render_observation,
    "Encounter": _render_encounter,
    "Procedure": _render_procedure,
    "AllergyIntolerance": _render_allergy,
    "Immunization": _render_immunization,
    "DiagnosticReport": _render_diagnostic_report,
    "CarePlan": _render_care_plan,
}


def render_resource(resource: dict, record: PatientRecord | None = None) -> str:
    """``[Type/id] YYYY-MM-DD Type: what it records (status)``; "undated" if it has no date.

    With `record`, references (a DiagnosticReport's results, a medicationReference, a reasonReference)
    are shown as the target's code text instead of the reference's display."""
    rtype = resource.get("resourceType", "Resource")
    when = resource_datetime(resource)
    body = _RENDERERS.get(rtype, _render_generic)(resource, record)
    return _one_line(f"[{rtype}/{resource.get('id', '?')}] {_day(when) if when else 'undated'} {rtype}: {body}")


def _sort_key(item: tuple[int, str, dict]) -> tuple:
    index, _key, res = item
    if res.get("resourceType") == "Patient":
        return (0, "", index)
    when = resource_datetime(res)
    return (1, when[:10], index) if when else (2, "", index)


def render_record(record: PatientRecord) -> list[tuple[str, str]]:
    """(resource key, line) for every resource: the Patient first, then by date (ties in load order),
    undated resources (organizations, practitioners) last."""
    items = sorted(((i, k, r) for i, (k, r) in enumerate(record.resources.items())), key=_sort_key)
    return [(key, render_resource(res, record)) for _, key, res in items]
