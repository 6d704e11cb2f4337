"""Synthetic, realistic FHIR R4 patient records: transaction Bundles like Synthea's, made offline and
deterministically (the same seed gives byte-identical JSON).

Each patient gets demographics, a care timeline of several years before `now` and a physiology
that the timeline measures. Conditions drive everything else, as in a real chart:

- type 2 diabetes: HbA1c drifts up over the visits before the diagnosis, metformin is started at the
  diagnosis and HbA1c comes down over the following months (some patients drift up again later);
- hypertension: blood pressure is high until treatment; lisinopril (amlodipine first over 55) is
  started, and amlodipine, then hydrochlorothiazide are added at follow-ups where it is still
  >= 140 systolic; a few patients get the ACE-inhibitor cough, stop lisinopril and switch to losartan
  (recorded as an AllergyIntolerance of type intolerance);
- hyperlipidemia -> a statin and a falling LDL; hypothyroidism -> levothyroxine and a normalising
  TSH; atrial fibrillation -> warfarin (INR series) and digoxin; iron deficiency anemia -> ferrous
  sulfate, a recovering hemoglobin and an abated condition; depression -> sertraline and a falling
  PHQ-9; CKD stage 3 -> a rising creatinine and falling eGFR; asthma -> inhalers; knee
  osteoarthritis -> acetaminophen; obesity and prediabetes are diagnosed from the measurements;
- acute episodes (sinusitis, bronchitis, strep throat, UTI, ankle sprain, pharyngitis) with
  abatement dates and short antibiotic or analgesic courses, chosen around the patient's allergies.

Codes are real: SNOMED CT for conditions and procedures, RxNorm for medications, LOINC and UCUM for
observations, CVX for vaccines. Every resource validates against the same FHIR R4(B) models the
loader uses (see clinqa.records.fhir). The data are made up; resources are tagged HTEST.

The package, in reading order:

    codes.py       the vocabulary: code systems, tests, conditions, drugs, vaccines, names (data tables)
    common.py      FHIR JSON snippets, rounding and ages, the visit and prescription records
    physiology.py  what each measurement is on a given day (mixin of the patient)
    resources.py   one method per FHIR resource kind (mixin of the patient)
    care.py        treatment and diagnosis decisions (mixin of the patient)
    patient.py     `_Patient`: demographics, conditions, visit schedule, each visit; build() -> Bundle
    bundles.py     `synthesize_patients`, `bundle_patient`, `write_patients`
"""

from clinqa.records.synth.bundles import bundle_patient, synthesize_patients, write_patients
from clinqa.records.synth.codes import (
    ACUTE,
    ALLERGENS,
    CONDITIONS,
    DRUGS,
    ENCOUNTER_TYPES,
    PANELS,
    PROCEDURES,
    REACTIONS,
    TEST_TAG,
    TESTS,
    VACCINES,
    Drug,
    Test,
)

__all__ = [
    "ACUTE",
    "ALLERGENS",
    "CONDITIONS",
    "DRUGS",
    "ENCOUNTER_TYPES",
    "PANELS",
    "PROCEDURES",
    "REACTIONS",
    "TESTS",
    "TEST_TAG",
    "VACCINES",
    "Drug",
    "Test",
    "bundle_patient",
    "synthesize_patients",
    "write_patients",
]
