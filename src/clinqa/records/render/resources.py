"""One renderer per resource type (Patient, Condition, MedicationRequest, Observation, Encounter,
Procedure, AllergyIntolerance, Immunization, DiagnosticReport, CarePlan, and a generic one for the
rest), `render_resource` for one line and `render_record` for a whole record in reading order."""

from __future__ import annotations

from typing import TYPE_CHECKING

from clinqa.records.fhir.record import patient_name
from clinqa.records.render.dates import _day, _get, resource_datetime
from clinqa.records.render.dosage import dosage_text
from clinqa.records.render.text import (
    _coding_or_concept,
    _flags,
    _interpretation,
    _one_line,
    _period,
    _reasons,
    _ref_label,
    _reference_range,
    concept_label,
    concept_text,
    format_quantity,
    medication_label,
    status_code,
    value_text,
)

if TYPE_CHECKING:
    from clinqa.records.fhir import PatientRecord

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
