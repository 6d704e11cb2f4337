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

The package, in reading order:

    model.py         RecordQuestion, the question types, JSON Lines files
    phrasings.py     the wordings of each template
    vocabulary.py    clinical names and the probes for what a record lacks
    facts.py         measurement series, dated resources, names, windows, trends
    maker.py         QuestionMaker: ask / take / pick_window, shared by every type
    measurements.py  lookup, latest, window, trend, count, average
    lists.py         list
    presence.py      exists, unanswerable
    multi.py         multi
    generate.py      generate_questions and STEPS, the registry of question types
"""

from clinqa.records.questions.facts import (
    Measurement,
    Series,
    clean_name,
    drug_name,
    measurement_series,
    record_end,
    trend_label,
)
from clinqa.records.questions.generate import STEPS, generate_questions
from clinqa.records.questions.model import (
    NOT_IN_RECORD,
    QTYPES,
    QType,
    RecordQuestion,
    read_questions,
    write_questions,
)
from clinqa.records.questions.phrasings import PHRASINGS
from clinqa.records.questions.vocabulary import (
    CONDITION_PROBES,
    FRIENDLY,
    LAB_FOR_DRUG,
    LAB_PROBES,
    MEDICATION_PROBES,
    VACCINE_GROUPS,
)

__all__ = [
    "CONDITION_PROBES",
    "FRIENDLY",
    "LAB_FOR_DRUG",
    "LAB_PROBES",
    "MEDICATION_PROBES",
    "NOT_IN_RECORD",
    "PHRASINGS",
    "QTYPES",
    "STEPS",
    "VACCINE_GROUPS",
    "Measurement",
    "QType",
    "RecordQuestion",
    "Series",
    "clean_name",
    "drug_name",
    "generate_questions",
    "measurement_series",
    "read_questions",
    "record_end",
    "trend_label",
    "write_questions",
]
