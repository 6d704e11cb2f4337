"""Questions about one patient's record, with reference answers computed from the resources.

`generate_questions(record, now=..., seed=...)` makes questions of ten types:

    lookup        the value of a measurement on a given date
    latest        the most recent value of a measurement
    window        the values of a measurement in the last N months (relative to `now`)
    trend         whether the last N measurements are increasing, decreasing or stable
    list          active medications, active problems, allergies
    count         how many measurements in a window; how many encounters in a year
    average       the mean of a measurement over a window
    exists        "has the patient ever ...": yes from the record, no for things it does not contain
    multi         needs two resources: the medication started after a diagnosis, a lab value when a
                  drug was started or the first one after it
    unanswerable  asks for a value or date of a lab or condition the record does not contain;
                  the answer is "not in the record" and relevant_ids is empty

The record is read as of `now`: resources dated after it do not exist for the questions; statuses
(a medication's "active") are taken as recorded. Existence questions are closed-world: what the
record does not contain did not happen ("no"). Numbers are the values a reader of the rendered
record sees (`clinqa.records.render.format_number`); `meta["tolerance"]` says how close a numeric
answer must be. Each question type has several phrasings, picked with the seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

from dateutil.relativedelta import relativedelta
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clinqa.errors import ClinqaError
from clinqa.records.fhir import PatientRecord, parse_date
from clinqa.records.render import (
    concept_text,
    format_number,
    resolve_medication,
    resource_date,
    resource_datetime,
    rounded,
    status_code,
)

QType = Literal["lookup", "latest", "window", "trend", "list", "count", "average", "exists", "multi", "unanswerable"]
QTYPES: tuple[str, ...] = (
    "lookup",
    "latest",
    "window",
    "trend",
    "list",
    "count",
    "average",
    "exists",
    "multi",
    "unanswerable",
)
NOT_IN_RECORD = "not in the record"


class RecordQuestion(BaseModel):
    """A question about one patient's record and its reference answer."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    patient_id: str
    question: str = Field(min_length=1)
    qtype: QType
    relevant_ids: list[str] = Field(default_factory=list)  # keys of PatientRecord.resources that hold the answer
    answer: str  # reference answer, in words
    answer_value: bool | int | float | str | list[float] | list[str] | None = None
    unit: str | None = None
    now: date  # the date "now" / "the last 6 months" refer to
    meta: dict[str, Any] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------- phrasings

PHRASINGS: dict[str, list[str]] = {
    "lookup": [
        "What was the patient's {name} on {date}?",
        "What {name} value was recorded for the patient on {date}?",
        "On {date}, what was the patient's {name}?",
        "Give the patient's {name} result from {date}.",
    ],
    "latest": [
        "What is the patient's most recent {name}?",
        "What was the last recorded {name} for this patient?",
        "What is the latest {name} value in the record?",
        "According to the record, what was the patient's {name} at the last measurement?",
    ],
    "window": [
        "What {name} values were recorded in the last {period}?",
        "List the patient's {name} measurements from the last {period}.",
        "Which {name} results does the patient have in the past {period}?",
    ],
    "trend": [
        "Over the last {k} measurements, has the patient's {name} been increasing, decreasing or stable?",
        "Is the patient's {name} trending up, trending down or stable across the {k} most recent measurements?",
        "Looking at the patient's last {k} {name} values, what is the trend?",
    ],
    "list_medications": [
        "Which medications is the patient currently taking?",
        "List the patient's active medications.",
        "What active prescriptions does the patient have?",
        "What is the patient's current medication list?",
    ],
    "list_conditions": [
        "What are the patient's active problems?",
        "List the conditions that are currently active for this patient.",
        "Which diagnoses on the patient's record are still active?",
    ],
    "list_allergies": [
        "What allergies or intolerances does the patient have?",
        "List the patient's recorded allergies and intolerances.",
        "Which substances is the patient allergic or intolerant to?",
    ],
    "count_measurements": [
        "How many {name} measurements were recorded in the last {period}?",
        "How many times was the patient's {name} measured in the past {period}?",
        "Count the {name} results from the last {period}.",
    ],
    "count_encounters": [
        "How many encounters did the patient have in {year}?",
        "How many visits are recorded for the patient in {year}?",
        "In {year}, how many times was the patient seen?",
    ],
    "average": [
        "What was the patient's average {name} over the last {period}?",
        "What is the mean of the patient's {name} values from the past {period}?",
        "Averaged over the last {period}, what was the patient's {name}?",
    ],
    "exists_condition": [
        "Has the patient ever been diagnosed with {name}?",
        "Does the record show a diagnosis of {name}?",
        "Has {name} ever been recorded as a condition for this patient?",
    ],
    "exists_medication": [
        "Has the patient ever been prescribed {name}?",
        "Does the record show a prescription for {name}?",
        "Was {name} ever ordered for this patient?",
    ],
    "exists_procedure": [
        "Has the patient ever had a {name}?",
        "Does the record show that the patient underwent {name}?",
        "Was a {name} ever performed on this patient?",
    ],
    "exists_vaccine": [
        "Has the patient ever received a {name} vaccine?",
        "Does the record show a {name} vaccination?",
        "Was the patient ever vaccinated against {name}?",
    ],
    "multi_med_after_dx": [
        "Which medication was started after the patient was diagnosed with {condition}?",
        "After the diagnosis of {condition}, what medication was prescribed for it?",
        "What drug was initiated following the {condition} diagnosis?",
    ],
    "multi_lab_at_start": [
        "What was the patient's {name} when {drug} was started?",
        "What was the last {name} value recorded before (or on the day) {drug} was first prescribed?",
        "At the time {drug} was started, what was the patient's most recent {name}?",
    ],
    "multi_lab_after_start": [
        "What was the first {name} measured after {drug} was started?",
        "After {drug} was first prescribed, what was the next {name} result?",
        "Following the start of {drug}, what was the patient's first {name} value?",
    ],
    "unanswerable_lab": [
        "What was the patient's most recent {name}?",
        "What {name} value was recorded for the patient on {date}?",
        "How has the patient's {name} changed over the last year?",
    ],
    "unanswerable_condition": [
        "When was the patient diagnosed with {name}?",
        "What medication was started for the patient's {name}?",
        "What was the onset date of the patient's {name}?",
    ],
}
_TEMPLATE_FIELDS = {
    "lookup": {"name", "date"}, "latest": {"name"}, "window": {"name", "period"}, "trend": {"name", "k"},
    "list_medications": set(), "list_conditions": set(), "list_allergies": set(),
    "count_measurements": {"name", "period"}, "count_encounters": {"year"}, "average": {"name", "period"},
    "exists_condition": {"name"}, "exists_medication": {"name"}, "exists_procedure": {"name"}, "exists_vaccine": {"name"},
    "multi_med_after_dx": {"condition"}, "multi_lab_at_start": {"name", "drug"}, "multi_lab_after_start": {"name", "drug"},
    "unanswerable_lab": {"name", "date"}, "unanswerable_condition": {"name"},
}  # fmt: skip


def _check_phrasings(phrasings: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    out = {k: list(v) for k, v in PHRASINGS.items()}
    for key, texts in phrasings.items():
        if key not in _TEMPLATE_FIELDS:
            raise ValueError(f"unknown question template {key!r}; known: {', '.join(sorted(_TEMPLATE_FIELDS))}")
        texts = list(texts)
        if not texts:
            raise ValueError(f"template {key!r} needs at least one phrasing")
        for text in texts:
            fields = {f for _, f, _, _ in string.Formatter().parse(text) if f}
            unknown = fields - _TEMPLATE_FIELDS[key]
            if unknown:
                raise ValueError(
                    f"phrasing {text!r} of {key!r} uses {sorted(unknown)}; it may use {sorted(_TEMPLATE_FIELDS[key])}"
                )
        out[key] = texts
    return out


# ---------------------------------------------------------------------------------------- vocabulary

# LOINC code -> the name a clinician would use in a question.
FRIENDLY: dict[str, str] = {
    "4548-4": "hemoglobin A1c", "17856-6": "hemoglobin A1c", "2345-7": "glucose", "2339-0": "glucose",
    "2160-0": "creatinine", "38483-4": "creatinine", "33914-3": "eGFR", "62238-1": "eGFR", "98979-8": "eGFR",
    "48642-3": "eGFR", "48643-1": "eGFR", "2823-3": "potassium", "6298-4": "potassium", "2951-2": "sodium",
    "2947-0": "sodium", "2093-3": "total cholesterol", "18262-6": "LDL cholesterol", "13457-7": "LDL cholesterol",
    "2089-1": "LDL cholesterol", "2085-9": "HDL cholesterol", "2571-8": "triglycerides", "718-7": "hemoglobin",
    "6690-2": "white blood cell count", "777-3": "platelet count", "789-8": "red blood cell count",
    "4544-3": "hematocrit", "787-2": "MCV", "785-6": "MCH", "786-4": "MCHC", "21000-5": "RDW",
    "32207-3": "platelet distribution width", "32623-1": "mean platelet volume", "3016-3": "TSH",
    "6301-6": "INR", "34714-6": "INR", "44261-6": "PHQ-9 score", "8480-6": "systolic blood pressure",
    "8462-4": "diastolic blood pressure", "8867-4": "heart rate", "29463-7": "body weight", "8302-2": "body height",
    "39156-5": "BMI", "8310-5": "body temperature", "8331-1": "oral temperature", "9279-1": "respiratory rate",
    "59408-5": "oxygen saturation", "2708-6": "oxygen saturation", "72514-3": "pain score",
    "6299-2": "urea nitrogen", "3094-0": "urea nitrogen", "2075-0": "chloride", "2069-3": "chloride",
    "2028-9": "carbon dioxide", "20565-8": "carbon dioxide", "17861-6": "calcium", "49765-1": "calcium",
    "1742-6": "ALT", "1920-8": "AST", "1975-2": "total bilirubin", "1751-7": "albumin", "2885-2": "total protein",
    "6768-6": "alkaline phosphatase", "14959-1": "urine microalbumin/creatinine ratio",
}  # fmt: skip
# (question name, LOINC codes, words that mean it is there) for labs a record may lack.
LAB_PROBES: list[tuple[str, set[str], tuple[str, ...]]] = [
    ("hemoglobin A1c", {"4548-4", "17856-6"}, ("a1c",)),
    ("TSH", {"3016-3", "11580-8"}, ("thyrotropin", "tsh")),
    ("INR", {"6301-6", "34714-6"}, ("inr",)),
    ("PSA", {"2857-1", "35741-8"}, ("prostate specific",)),
    ("vitamin D level", {"1989-3", "62292-8"}, ("vitamin d", "25-hydroxy")),
    ("ferritin", {"2276-4"}, ("ferritin",)),
    ("troponin", {"6598-7", "10839-9", "89579-7"}, ("troponin",)),
    ("BNP", {"30934-4", "33762-6"}, ("natriuretic",)),
    ("magnesium", {"19123-9", "2601-3"}, ("magnesium",)),
    ("ALT", {"1742-6", "1743-4"}, ("alanine aminotransferase",)),
    ("CRP", {"1988-5", "30522-7"}, ("c reactive",)),
    ("uric acid", {"3084-1"}, ("urate", "uric acid")),
    ("LDL cholesterol", {"18262-6", "13457-7", "2089-1"}, ("ldl", "low density")),
    ("potassium", {"2823-3", "6298-4"}, ("potassium",)),
    ("creatinine", {"2160-0", "38483-4"}, ("creatinine",)),
    ("hemoglobin", {"718-7"}, ("hemoglobin [mass",)),
]
# (question name, SNOMED codes, words that mean it is there)
CONDITION_PROBES: list[tuple[str, set[str], tuple[str, ...]]] = [
    ("asthma", {"195967001"}, ("asthma",)),
    ("type 2 diabetes", {"44054006"}, ("diabetes",)),
    ("hypertension", {"38341003", "59621000"}, ("hypertens",)),
    ("atrial fibrillation", {"49436004"}, ("atrial fibrillation",)),
    ("chronic kidney disease", {"709044004", "433144002", "431855005", "431856006"}, ("kidney disease",)),
    ("COPD", {"13645005"}, ("obstructive", "copd", "emphysema")),
    ("heart failure", {"84114007", "88805009"}, ("heart failure",)),
    ("hypothyroidism", {"40930008"}, ("hypothyroid",)),
    ("depression", {"35489007", "370143000"}, ("depress",)),
    ("osteoarthritis", {"396275006", "239873007"}, ("osteoarthritis",)),
    ("coronary artery disease", {"53741008"}, ("coronary",)),
    ("stroke", {"230690007"}, ("stroke", "cerebrovascular")),
    ("epilepsy", {"84757009"}, ("epilep", "seizure")),
    ("hyperlipidemia", {"55822004"}, ("hyperlipid", "cholesterol")),
    ("migraine", {"37796009"}, ("migraine",)),
    ("gout", {"90560007"}, ("gout",)),
    ("rheumatoid arthritis", {"69896004"}, ("rheumatoid",)),
    ("anemia", {"271737000", "87522002"}, ("anemia", "anaemia")),
]
MEDICATION_PROBES = [
    "warfarin", "insulin", "metformin", "atorvastatin", "lisinopril", "levothyroxine", "prednisone", "furosemide",
    "omeprazole", "sertraline", "apixaban", "amlodipine", "albuterol", "gabapentin", "tramadol", "allopurinol",
]  # fmt: skip
VACCINE_GROUPS: dict[str, str] = {
    "140": "influenza", "141": "influenza", "150": "influenza", "158": "influenza", "161": "influenza", "88": "influenza",
    "113": "tetanus", "115": "tetanus", "09": "tetanus", "138": "tetanus", "133": "pneumococcal", "33": "pneumococcal",
    "152": "pneumococcal", "215": "pneumococcal", "216": "pneumococcal", "187": "shingles", "121": "shingles",
    "207": "COVID-19", "208": "COVID-19", "212": "COVID-19", "213": "COVID-19", "217": "COVID-19", "218": "COVID-19",
    "43": "hepatitis B", "08": "hepatitis B", "45": "hepatitis B", "83": "hepatitis A", "52": "hepatitis A",
    "10": "polio", "20": "diphtheria, tetanus and pertussis (DTaP)", "114": "meningococcal", "119": "rotavirus",
    "49": "Haemophilus influenzae type b", "62": "HPV", "165": "HPV", "03": "measles, mumps and rubella", "21": "varicella",
}  # fmt: skip
# A drug (word in its name) -> the measurement a clinician checks around its start.
LAB_FOR_DRUG: list[tuple[str, str]] = [
    ("metformin", "hemoglobin A1c"), ("insulin", "hemoglobin A1c"), ("lisinopril", "systolic blood pressure"),
    ("amlodipine", "systolic blood pressure"), ("hydrochlorothiazide", "systolic blood pressure"),
    ("losartan", "systolic blood pressure"), ("atorvastatin", "LDL cholesterol"), ("rosuvastatin", "LDL cholesterol"),
    ("simvastatin", "LDL cholesterol"), ("pravastatin", "LDL cholesterol"), ("levothyroxine", "TSH"),
    ("ferrous", "hemoglobin"), ("sertraline", "PHQ-9 score"), ("fluoxetine", "PHQ-9 score"),
    ("escitalopram", "PHQ-9 score"), ("digoxin", "heart rate"),
]  # fmt: skip
_INACTIVE_OBS = {"entered-in-error", "cancelled", "registered"}
# Paperwork, not care: "has the patient ever had a medication reconciliation?" is not a useful question.
_ADMIN_PROCEDURES = {"428191000124101", "430193006", "710824005", "711013002"}
_ACTIVE_CONDITION = {"active", "recurrence", "relapse"}
_BAD_VERIFICATION = {"refuted", "entered-in-error"}


# ---------------------------------------------------------------------------------------- facts


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


# ---------------------------------------------------------------------------------------- generator


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


class _Gen:
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

    def _shuffled(self, items: Iterable[Any]) -> list[Any]:
        items = list(items)
        self.rng.shuffle(items)
        return items

    def _take(self, candidates: Iterable[Any], make) -> None:
        made = 0
        for c in self._shuffled(candidates):
            if made >= self.per_type:
                break
            if make(c):
                made += 1

    # -- measurement questions ------------------------------------------------------------------
    def lookup(self) -> None:
        def make(item):
            s, m = item
            same_day = [p for p in s.points if p.day == m.day]
            if len(same_day) != 1:
                return False
            return self.ask("lookup", "lookup", {"name": s.name, "date": m.day.isoformat()}, answer=_qty_text(m),
                            value=m.value, relevant=[m.rid], unit=s.unit, measurement=s.name, tolerance=0.0)  # fmt: skip

        # one candidate per series (a random point), so questions spread over measurements
        self._take([(s, self.rng.choice(s.points)) for s in self.series.values()], make)

    def latest(self) -> None:
        def make(s: Series):
            last = s.points[-1]
            if sum(1 for p in s.points if p.day == last.day) != 1:
                return False
            return self.ask("latest", "latest", {"name": s.name}, answer=f"{_qty_text(last)} (on {last.day.isoformat()})",
                            value=last.value, relevant=[last.rid], unit=s.unit, measurement=s.name, date=last.day.isoformat(),
                            tolerance=0.0)  # fmt: skip

        self._take(self.series.values(), make)

    def _window(self, s: Series, min_count: int = 1) -> tuple[int, list[Measurement]] | None:
        """A window (months) holding some but preferably not all of the series' points."""
        best = None
        for months in self._shuffled([3, 6, 12, 24, 36, 60]):
            start = _months_ago(self.now, months)
            inside = [p for p in s.points if start < p.day <= self.now]
            if min_count <= len(inside) <= 8:
                if len(inside) < len(s.points):
                    return months, inside
                best = best or (months, inside)
        return best

    def window(self) -> None:
        def make(s: Series):
            found = self._window(s)
            if not found:
                return False
            months, inside = found
            answer = "; ".join(f"{_qty_text(p)} on {p.day.isoformat()}" for p in inside)
            return self.ask("window", "window", {"name": s.name, "period": _period_words(months)}, answer=answer,
                            value=[p.value for p in inside], relevant=[p.rid for p in inside], unit=s.unit,
                            measurement=s.name, window_start=_months_ago(self.now, months).isoformat(), window_months=months,
                            tolerance=0.0)  # fmt: skip

        self._take(self.series.values(), make)

    def trend(self) -> None:
        def make(s: Series):
            days = [p.day for p in s.points]
            if len(set(days)) != len(days) or len(s.points) < 3:
                return False
            for k in self._shuffled([k for k in (3, 4, 5) if k <= len(s.points)]):
                pts = s.points[-k:]
                found = trend_label([p.value for p in pts])
                if found is not None:
                    label, rel = found
                    break
            else:
                return False  # no clear trend over 3, 4 or 5 measurements
            steps = " -> ".join(f"{format_number(p.value)} ({p.day.isoformat()})" for p in pts)
            return self.ask("trend", "trend", {"name": s.name, "k": k}, answer=f"{label}: {steps} {s.unit}".strip(), value=label,
                            relevant=[p.rid for p in pts], unit=s.unit, measurement=s.name, relative_change=round(rel, 4))  # fmt: skip

        self._take(self.series.values(), make)

    def count(self) -> None:
        def make_series(s: Series):
            found = self._window(s)
            if not found:
                return False
            months, inside = found
            return self.ask("count_measurements", "count", {"name": s.name, "period": _period_words(months)},
                            answer=str(len(inside)), value=len(inside), relevant=[p.rid for p in inside], measurement=s.name,
                            window_start=_months_ago(self.now, months).isoformat(), window_months=months, tolerance=0)  # fmt: skip

        def make_year(year: int):
            encounters = [(k, d) for k, _, d in _dated(self.record, "Encounter", self.now) if d.year == year]
            if not encounters:
                return False
            return self.ask("count_encounters", "count", {"year": year}, answer=str(len(encounters)), value=len(encounters),
                            relevant=[k for k, _ in encounters], tolerance=0)  # fmt: skip

        years = sorted({d.year for _, _, d in _dated(self.record, "Encounter", self.now)})
        candidates = [("s", s) for s in self.series.values()] + [("y", y) for y in years[-3:]]
        self._take(candidates, lambda c: make_series(c[1]) if c[0] == "s" else make_year(c[1]))

    def average(self) -> None:
        def make(s: Series):
            found = self._window(s, min_count=2)
            if not found:
                return False
            months, inside = found
            mean = sum(p.value for p in inside) / len(inside)
            shown = rounded(round(mean, 2))
            return self.ask("average", "average", {"name": s.name, "period": _period_words(months)},
                            answer=f"{format_number(shown)} {s.unit} (mean of {len(inside)}: "
                                   f"{', '.join(format_number(p.value) for p in inside)})".replace("  ", " "),
                            value=shown, relevant=[p.rid for p in inside], unit=s.unit, measurement=s.name,
                            window_start=_months_ago(self.now, months).isoformat(), window_months=months,
                            tolerance=max(0.01 * abs(mean), 0.01))  # fmt: skip

        self._take(self.series.values(), make)

    # -- lists ------------------------------------------------------------------------------------
    def lists(self) -> None:
        made = 0
        for kind in self._shuffled(["medications", "conditions", "allergies"]):
            if made >= self.per_type:
                break
            made += bool(getattr(self, f"_list_{kind}")())

    def _list_medications(self) -> bool:
        meds = _dated(self.record, "MedicationRequest", self.now)
        if not meds:
            return False
        active = [
            (k, r)
            for k, r, _ in meds
            if r.get("status") == "active" and r.get("intent", "order") in ("order", "plan", "original-order")
        ]
        names = list(dict.fromkeys(_med_display(r, self.record) for _, r in active))
        answer = "; ".join(names) if names else "none (no active medication in the record)"
        return self.ask("list_medications", "list", {}, answer=answer, value=names, relevant=[k for k, _ in active])

    def _list_conditions(self) -> bool:
        conds = _dated(self.record, "Condition", self.now)
        if not conds:
            return False
        active = [(k, r) for k, r, _ in conds if _is_active_condition(r, self.now)]
        names = list(dict.fromkeys(concept_text(r.get("code")) for _, r in active))
        answer = "; ".join(names) if names else "none (no active condition in the record)"
        return self.ask("list_conditions", "list", {}, answer=answer, value=names, relevant=[k for k, _ in active])

    def _list_allergies(self) -> bool:
        found = []
        for k, r in self.record.resources.items():
            if r.get("resourceType") != "AllergyIntolerance":
                continue
            day = resource_date(r)
            if day is not None and day > self.now:
                continue
            if status_code(r.get("verificationStatus")) in _BAD_VERIFICATION or status_code(
                r.get("clinicalStatus")
            ) in ("inactive", "resolved"):
                continue
            found.append((k, r))
        if not found:
            return False  # no recorded allergies is not the same as "no known allergies"
        names = list(dict.fromkeys(concept_text(r.get("code")) for _, r in found))
        return self.ask(
            "list_allergies", "list", {}, answer="; ".join(names), value=names, relevant=[k for k, _ in found]
        )

    # -- existence --------------------------------------------------------------------------------
    def exists(self) -> None:
        cands: list[tuple[str, Any]] = []
        conds = _dated(self.record, "Condition", self.now)
        by_cond: dict[str, list[tuple[str, dict, date]]] = {}
        for item in conds:
            by_cond.setdefault(clean_name(concept_text(item[1].get("code"))), []).append(item)
        cands += [("cond_yes", (n, items)) for n, items in by_cond.items() if n]
        meds = _dated(self.record, "MedicationRequest", self.now)
        by_med: dict[str, list[tuple[str, dict, date]]] = {}
        for item in meds:
            by_med.setdefault(drug_name(_med_display(item[1], self.record)), []).append(item)
        cands += [("med_yes", (n, items)) for n, items in by_med.items() if n]
        procs = _dated(self.record, "Procedure", self.now)
        by_proc: dict[str, list[tuple[str, dict, date]]] = {}
        for item in procs:
            if (
                item[1].get("status") in ("completed", None)
                and not {c for _, c in _codes(item[1].get("code"))} & _ADMIN_PROCEDURES
            ):
                by_proc.setdefault(clean_name(concept_text(item[1].get("code"))), []).append(item)
        cands += [("proc_yes", (n, items)) for n, items in by_proc.items() if n]
        vax = _dated(self.record, "Immunization", self.now)
        by_vax: dict[str, list[tuple[str, dict, date]]] = {}
        for item in vax:
            if item[1].get("status") == "completed":
                group = next(
                    (VACCINE_GROUPS[c] for _, c in _codes(item[1].get("vaccineCode")) if c in VACCINE_GROUPS), None
                )
                if group:
                    by_vax.setdefault(group, []).append(item)
        cands += [("vax_yes", (n, items)) for n, items in by_vax.items()]
        absent_conds = self._absent_conditions()
        absent_meds = [
            m for m in MEDICATION_PROBES if not any(m in _med_display(r, self.record).lower() for _, r, _ in meds)
        ]
        # a yes/no balance: about half the questions are "no"
        no_cands = [("cond_no", n) for n in absent_conds] + [("med_no", m) for m in absent_meds]
        yes, no = self._shuffled(cands), self._shuffled(no_cands)
        made_yes = made_no = 0
        want_no = self.per_type // 2 + (self.per_type % 2 if self.rng.random() < 0.5 else 0)
        want_yes = self.per_type - want_no
        for kind, payload in yes:
            if made_yes >= want_yes:
                break
            made_yes += self._exists_yes(kind, payload)
        for kind, payload in no:
            if made_no >= self.per_type - made_yes:
                break
            made_no += self._exists_no(kind, payload)

    def _exists_yes(self, kind: str, payload: Any) -> bool:
        name, items = payload
        first_key, first, first_day = items[0]
        template = {"cond_yes": "exists_condition", "med_yes": "exists_medication", "proc_yes": "exists_procedure",
                    "vax_yes": "exists_vaccine"}[kind]  # fmt: skip
        what = (
            concept_text(first.get("code") or first.get("vaccineCode"))
            if kind != "med_yes"
            else _med_display(first, self.record)
        )
        dates = ", ".join(dict.fromkeys(d.isoformat() for _, _, d in items))
        return self.ask(template, "exists", {"name": name}, answer=f"Yes: {what} ({dates})", value=True,
                        relevant=[k for k, _, _ in items], probe=name)  # fmt: skip

    def _exists_no(self, kind: str, name: str) -> bool:
        template = "exists_condition" if kind == "cond_no" else "exists_medication"
        return self.ask(template, "exists", {"name": name}, answer="No", value=False, relevant=[], probe=name)

    def _absent_conditions(self) -> list[str]:
        conds = [r for r in self.record.resources.values() if r.get("resourceType") == "Condition"]
        codes = {c for r in conds for _, c in _codes(r.get("code"))}
        texts = " | ".join(concept_text(r.get("code")).lower() for r in conds)
        return [
            name
            for name, snomed, words in CONDITION_PROBES
            if not (codes & snomed) and not any(w in texts for w in words)
        ]

    def _absent_labs(self) -> list[str]:
        obs = [r for r in self.record.resources.values() if r.get("resourceType") == "Observation"]
        codes, texts = set(), []
        for r in obs:
            for node in [r, *[c for c in r.get("component") or [] if isinstance(c, dict)]]:
                codes |= {c for _, c in _codes(node.get("code"))}
                texts.append(concept_text(node.get("code")).lower())
        joined = " | ".join(texts)
        return [
            name for name, loinc, words in LAB_PROBES if not (codes & loinc) and not any(w in joined for w in words)
        ]

    # -- multi-resource ---------------------------------------------------------------------------
    def multi(self) -> None:
        cands: list[tuple[str, Any]] = []
        conds = _dated(self.record, "Condition", self.now)
        meds = _dated(self.record, "MedicationRequest", self.now)
        names = Counter(clean_name(concept_text(r.get("code"))) for _, r, _ in conds)
        for key, cond, onset in conds:
            treated = [
                (k, r, d)
                for k, r, d in meds
                if d >= onset
                and any(
                    (ref.get("reference") or "") == f"Condition/{cond.get('id')}"
                    for ref in r.get("reasonReference") or []
                )
            ]
            if not treated and cond.get("encounter"):
                treated = [
                    (k, r, d)
                    for k, r, d in meds
                    if d >= onset and r.get("encounter") == cond.get("encounter") and not r.get("reasonReference")
                ]
            if treated:
                name = clean_name(concept_text(cond.get("code")))
                label = name if names[name] == 1 else f"{name} (diagnosed {onset.isoformat()})"
                cands.append(("after_dx", (key, label, onset, treated)))
        first_start: dict[str, tuple[str, dict, date]] = {}
        for item in meds:
            first_start.setdefault(drug_name(_med_display(item[1], self.record)), item)
        for drug, item in first_start.items():
            for word, measurement in LAB_FOR_DRUG:
                if word in drug and measurement in self.series:
                    cands.append(("lab_at", (drug, item, self.series[measurement])))
                    cands.append(("lab_after", (drug, item, self.series[measurement])))
                    break
        made = 0
        for kind, payload in self._shuffled(cands):
            if made >= self.per_type:
                break
            made += getattr(self, f"_multi_{kind}")(payload)

    def _multi_after_dx(self, payload) -> bool:
        cond_key, label, onset, treated = payload
        displays = list(dict.fromkeys(_med_display(r, self.record) for _, r, _ in treated))
        starts = "; ".join(f"{_med_display(r, self.record)} (started {d.isoformat()})" for _, r, d in treated)
        return self.ask("multi_med_after_dx", "multi", {"condition": label}, answer=starts, value=displays,
                        relevant=[cond_key, *[k for k, _, _ in treated]], diagnosis_date=onset.isoformat())  # fmt: skip

    def _multi_lab_at(self, payload) -> bool:
        drug, (med_key, med, start), s = payload
        before = [p for p in s.points if p.day <= start and (start - p.day).days <= 365]
        if not before or sum(1 for p in s.points if p.day == before[-1].day) != 1:
            return False
        m = before[-1]
        return self.ask("multi_lab_at_start", "multi", {"name": s.name, "drug": drug}, answer=f"{_qty_text(m)} (on {m.day.isoformat()})",
                        value=m.value, relevant=[med_key, m.rid], unit=s.unit, measurement=s.name,
                        drug_start=start.isoformat(), tolerance=0.0)  # fmt: skip

    def _multi_lab_after(self, payload) -> bool:
        drug, (med_key, med, start), s = payload
        after = [p for p in s.points if p.day > start and (p.day - start).days <= 400]
        if not after or sum(1 for p in s.points if p.day == after[0].day) != 1:
            return False
        m = after[0]
        return self.ask("multi_lab_after_start", "multi", {"name": s.name, "drug": drug}, answer=f"{_qty_text(m)} (on {m.day.isoformat()})",
                        value=m.value, relevant=[med_key, m.rid], unit=s.unit, measurement=s.name,
                        drug_start=start.isoformat(), tolerance=0.0)  # fmt: skip

    # -- unanswerable -----------------------------------------------------------------------------
    def unanswerable(self) -> None:
        encounter_days = [d for _, _, d in _dated(self.record, "Encounter", self.now)] or [self.now]
        cands = [("lab", n) for n in self._absent_labs()] + [("cond", n) for n in self._absent_conditions()]
        made = 0
        for kind, name in self._shuffled(cands):
            if made >= self.per_type:
                break
            if kind == "lab":
                made += self.ask("unanswerable_lab", "unanswerable", {"name": name, "date": self.rng.choice(encounter_days).isoformat()},
                                 answer=NOT_IN_RECORD, value=None, relevant=[], probe=name)  # fmt: skip
            else:
                made += self.ask("unanswerable_condition", "unanswerable", {"name": name}, answer=NOT_IN_RECORD, value=None,
                                 relevant=[], probe=name)  # fmt: skip


def _med_display(res: dict, record: PatientRecord | None = None) -> str:
    concept, fallback = resolve_medication(res, record)
    return concept_text(concept) if concept is not None else fallback


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
    gen = _Gen(
        record,
        now,
        random.Random(f"clinqa-questions:{seed}:{record.patient_id}"),
        _check_phrasings(phrasings or {}),
        per_type,
    )
    steps = {"lookup": gen.lookup, "latest": gen.latest, "window": gen.window, "trend": gen.trend, "list": gen.lists,
             "count": gen.count, "average": gen.average, "exists": gen.exists, "multi": gen.multi,
             "unanswerable": gen.unanswerable}  # fmt: skip
    for qtype in QTYPES:
        if qtype in wanted:
            steps[qtype]()
    return gen.out


# ---------------------------------------------------------------------------------------- files


def write_questions(path: str | Path, questions: Iterable[RecordQuestion]) -> Path:
    """Questions as JSON Lines, one per line (parent folders are created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for q in questions:
            fh.write(q.model_dump_json() + "\n")
    return out


def read_questions(path: str | Path) -> list[RecordQuestion]:
    """Questions written by `write_questions`; ClinqaError names the line and field of a bad one."""
    src = Path(path)
    try:
        lines = src.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise ClinqaError(f"{src}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClinqaError(f"{src}: cannot read ({exc})") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(RecordQuestion.model_validate(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ClinqaError(f"{src}: line {n}: not JSON ({exc.msg}, column {exc.colno})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            fld = ".".join(str(p) for p in err.get("loc", ())) or "(question)"
            raise ClinqaError(f"{src}: line {n}: field '{fld}': {err.get('msg')}") from None
    return out
