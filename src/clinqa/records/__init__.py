"""FHIR patient records: load (Bundle, bulk NDJSON, FHIR server), render for a model, synthesize, ask questions.

from clinqa.records import load_records, render_record, generate_questions
records = load_records("path/to/bundles/")          # or an NDJSON folder, or https://server/fhir/Patient/123
lines = render_record(records[0])                   # [(resource id, "[Observation/..] 2021-03-04 Observation: ...")]
qs = generate_questions(records[0], now="2025-01-01", seed=0)
"""

from clinqa.records.fhir import (
    BILLING_TYPES,
    FHIR_VERSION,
    PatientRecord,
    load_bundle,
    load_fhir_server,
    load_ndjson_folder,
    load_records,
    record_from_bundle,
    validation_errors,
)
from clinqa.records.questions import (
    NOT_IN_RECORD,
    PHRASINGS,
    QTYPES,
    RecordQuestion,
    generate_questions,
    read_questions,
    record_end,
    write_questions,
)
from clinqa.records.render import render_record, render_resource, resource_date
from clinqa.records.synth import synthesize_patients, write_patients

__all__ = [
    "BILLING_TYPES",
    "FHIR_VERSION",
    "NOT_IN_RECORD",
    "PHRASINGS",
    "QTYPES",
    "PatientRecord",
    "RecordQuestion",
    "generate_questions",
    "load_bundle",
    "load_fhir_server",
    "load_ndjson_folder",
    "load_records",
    "read_questions",
    "record_end",
    "record_from_bundle",
    "render_record",
    "render_resource",
    "resource_date",
    "synthesize_patients",
    "validation_errors",
    "write_patients",
    "write_questions",
]
