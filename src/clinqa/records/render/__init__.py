"""One compact, faithful line of text per FHIR resource, for a language model to read.

    [Observation/abc123] 2021-03-04 Observation: Hemoglobin A1c/Hemoglobin.total in Blood (LOINC 4548-4) = 6.3 % (final)

The line starts with the resource's handle (what a model cites) and its clinically relevant date,
then says what the resource records, with codes, values, units and status as they are in the
resource (numbers are shortened to 2 decimals, or 3 significant digits below 1). Nothing is
inferred: a field that is absent is left out of the line.

The package: ``dates.py`` (which date a resource has), ``text.py`` (numbers, codes, values, references,
medications: the pieces of a line), ``dosage.py`` (a Dosage in words), ``resources.py`` (one renderer
per resource type, `render_resource`, `render_record`).
"""

from clinqa.records.render.dates import resource_date, resource_datetime
from clinqa.records.render.dosage import dosage_text
from clinqa.records.render.resources import ENCOUNTER_CLASSES, render_record, render_resource
from clinqa.records.render.text import (
    INTERPRETATIONS,
    SYSTEMS,
    coding_label,
    concept_label,
    concept_text,
    format_number,
    format_quantity,
    medication_label,
    resolve_medication,
    rounded,
    status_code,
    value_text,
)

__all__ = [
    "ENCOUNTER_CLASSES",
    "INTERPRETATIONS",
    "SYSTEMS",
    "coding_label",
    "concept_label",
    "concept_text",
    "dosage_text",
    "format_number",
    "format_quantity",
    "medication_label",
    "render_record",
    "render_resource",
    "resolve_medication",
    "resource_date",
    "resource_datetime",
    "rounded",
    "status_code",
    "value_text",
]
