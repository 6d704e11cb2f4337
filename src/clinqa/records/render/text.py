"""Line formatting: numbers as a reader sees them, quantities, codes and CodeableConcepts, statuses,
value[x], reference ranges and interpretation flags, references in words, the medication a resource
names, reasons and periods. Shared by every per-type renderer (and by the question generator)."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from clinqa.records.fhir.record import patient_name
from clinqa.records.render.dates import _day

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


# ---------------------------------------------------------------------------------------- medications, reasons, periods


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
