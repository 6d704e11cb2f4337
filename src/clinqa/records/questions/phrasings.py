"""The wordings of each question template (several per template; the seed picks one), the fields each
may use, and the check a user's replacement wordings go through."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

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
