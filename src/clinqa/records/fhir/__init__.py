"""Load a patient's FHIR R4 record: a Bundle file, a bulk-export NDJSON folder or a FHIR server.

Every loader ends in the same place: one `PatientRecord` per patient, holding the raw resource
JSON keyed by resource id, with references rewritten to the plain ``Type/id`` form (what a FHIR
server stores after it processes a transaction), so ``record.resolve(ref)`` finds the target.

Validation uses the FHIR **R4B** models of ``fhir.resources`` (``fhir.resources.R4B``).
``fhir.resources`` 8 validates R5 by default, and R5 rejects ordinary R4 data (``Encounter.class``
became a list, ``MedicationRequest.medicationCodeableConcept`` became ``medication``, ...).
The package ships no R4 models; R4B is R4 plus the new medication-definition and subscription
resources, with the clinical resources unchanged, so R4 data validates against it as is: all eight
Synthea R4 sample bundles this was developed against (1 Patient, Encounter, Condition,
Observation, MedicationRequest, Procedure, Immunization, DiagnosticReport, CarePlan, Claim,
ExplanationOfBenefit, Organization, Practitioner) validate without a single error. The only R4
resources R4B does not know are the ones it replaced (MedicinalProduct*, Substance{Specification,
Polymer, ...}, Effect/RiskEvidenceSynthesis); they never carry patient care data, and in lenient
mode they are kept unvalidated like any other invalid resource.

Strict mode (the default) raises `ClinqaError` on the first invalid resource, naming the file,
the entry, the resource and the field. ``lenient=True`` keeps such resources as they are and
records a line in ``record.problems`` instead. References that point to nothing in the bundle are
always reported as problems, never errors: the rest of the record is still usable. Conditional
references (``Organization?identifier=...``), absolute URLs to other servers and references to
contained resources that exist are fine.

Claim and ExplanationOfBenefit (and ClaimResponse) carry billing, not care; they are left out
unless ``include_billing=True``.

The package: ``record.py`` (PatientRecord, names, dates, reference shapes), ``validate.py``
(validation_errors), ``assembly.py`` (validate, key, link and group resources), ``files.py``
(Bundle files and NDJSON folders), ``server.py`` (a FHIR server), ``load.py`` (load_records).
"""

from clinqa.records.fhir.assembly import _Assembly, _Item, _refs
from clinqa.records.fhir.files import _bundle_items, load_bundle, load_ndjson_folder, record_from_bundle
from clinqa.records.fhir.load import load_records
from clinqa.records.fhir.record import (
    BILLING_TYPES,
    DIRECTORY_TYPES,
    FHIR_VERSION,
    KEEP_INVALID_HINT,
    LENIENT_HINT,
    PatientRecord,
    parse_date,
    patient_name,
)
from clinqa.records.fhir.server import load_fhir_server
from clinqa.records.fhir.validate import validation_errors

__all__ = [
    "BILLING_TYPES",
    "DIRECTORY_TYPES",
    "FHIR_VERSION",
    "KEEP_INVALID_HINT",
    "LENIENT_HINT",
    "PatientRecord",
    "_Assembly",
    "_Item",
    "_bundle_items",
    "_refs",
    "load_bundle",
    "load_fhir_server",
    "load_ndjson_folder",
    "load_records",
    "parse_date",
    "patient_name",
    "record_from_bundle",
    "validation_errors",
]
