"""One line per resource: exact lines for each resource type, number formatting, record ordering."""

from __future__ import annotations

from datetime import date

import pytest

from clinqa.records import record_from_bundle, render_record, render_resource, resource_date
from clinqa.records.fhir import PatientRecord
from clinqa.records.render import dosage_text, format_number, medication_label, rounded

LOINC, SNOMED, RXNORM = "http://loinc.org", "http://snomed.info/sct", "http://www.nlm.nih.gov/research/umls/rxnorm"


def cc(system, code, display):
    return {"coding": [{"system": system, "code": code, "display": display}]}


CASES = [
    (
        {"resourceType": "Observation", "id": "abc123", "status": "final", "code": cc(LOINC, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"),
         "effectiveDateTime": "2021-03-04T10:00:00Z", "valueQuantity": {"value": 6.3, "unit": "%"}},
        "[Observation/abc123] 2021-03-04 Observation: Hemoglobin A1c/Hemoglobin.total in Blood (LOINC 4548-4) = 6.3 % (final)",
    ),
    (
        {"resourceType": "Observation", "id": "bp1", "status": "final",
         "code": {**cc(LOINC, "85354-9", "Blood pressure panel with all children optional"), "text": "Blood pressure"},
         "effectiveDateTime": "2022-01-02",
         "component": [
             {"code": cc(LOINC, "8480-6", "Systolic blood pressure"), "valueQuantity": {"value": 142, "unit": "mm[Hg]"},
              "interpretation": [{"coding": [{"code": "H"}]}]},
             {"code": {"text": "Diastolic blood pressure"}, "valueQuantity": {"value": 88.0, "unit": "mm[Hg]"}},
         ]},
        "[Observation/bp1] 2022-01-02 Observation: Blood pressure (LOINC 85354-9): Systolic blood pressure = 142 mm[Hg] (high); "
        "Diastolic blood pressure = 88 mm[Hg] (final)",
    ),
    (
        {"resourceType": "Observation", "id": "s1", "status": "final", "code": {"text": "Tobacco smoking status"},
         "effectiveDateTime": "2022-01-02", "valueCodeableConcept": cc(SNOMED, "8517006", "Ex-smoker (finding)")},
        "[Observation/s1] 2022-01-02 Observation: Tobacco smoking status = Ex-smoker (finding) (SNOMED 8517006) (final)",
    ),
    (
        {"resourceType": "Observation", "id": "k1", "status": "amended", "code": {"coding": [{"system": LOINC, "code": "2823-3"}], "text": "Potassium"},
         "effectiveDateTime": "2022-01-02", "valueQuantity": {"value": 5.61, "unit": "mmol/L"},
         "interpretation": [{"coding": [{"code": "H"}]}], "referenceRange": [{"low": {"value": 3.5}, "high": {"value": 5.1}}]},
        "[Observation/k1] 2022-01-02 Observation: Potassium (LOINC 2823-3) = 5.61 mmol/L (high; ref 3.5-5.1; amended)",
    ),
    (
        {"resourceType": "Condition", "id": "c1", "clinicalStatus": {"coding": [{"code": "resolved"}]},
         "verificationStatus": {"coding": [{"code": "confirmed"}]}, "code": cc(SNOMED, "444814009", "Viral sinusitis (disorder)"),
         "onsetDateTime": "2017-11-01T04:00:00+00:00", "abatementDateTime": "2017-11-22T04:00:00+00:00"},
        "[Condition/c1] 2017-11-01 Condition: Viral sinusitis (disorder) (SNOMED 444814009); onset 2017-11-01; abated 2017-11-22 (resolved)",
    ),
    (
        {"resourceType": "Condition", "id": "c2", "clinicalStatus": {"coding": [{"code": "active"}]},
         "verificationStatus": {"coding": [{"code": "provisional"}]}, "code": {"text": "Asthma"}, "recordedDate": "2019-02-03"},
        "[Condition/c2] 2019-02-03 Condition: Asthma; recorded 2019-02-03 (active; provisional)",
    ),
    (
        {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
         "medicationCodeableConcept": cc(RXNORM, "860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet"),
         "authoredOn": "2020-09-04T10:00:00+00:00", "dosageInstruction": [{"text": "Take 2 tablets by mouth once daily with the evening meal"}],
         "reasonReference": [{"reference": "Condition/c9", "display": "Diabetes mellitus type 2 (disorder)"}]},
        "[MedicationRequest/m1] 2020-09-04 MedicationRequest: 24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet "
        "(RxNorm 860975); Take 2 tablets by mouth once daily with the evening meal; authored 2020-09-04; "
        "reason Diabetes mellitus type 2 (disorder) (active)",
    ),
    (
        {"resourceType": "MedicationRequest", "id": "m2", "status": "completed", "intent": "order",
         "medicationCodeableConcept": {"text": "Amoxicillin 500 MG Oral Capsule"}, "authoredOn": "2021-05-06",
         "dosageInstruction": [{"timing": {"repeat": {"frequency": 3, "period": 1, "periodUnit": "d", "boundsDuration": {"value": 10, "unit": "days"}}},
                                "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "capsule"}}]}]},
        "[MedicationRequest/m2] 2021-05-06 MedicationRequest: Amoxicillin 500 MG Oral Capsule; 1 capsule, three times daily, for 10 days; "
        "authored 2021-05-06 (completed)",
    ),
    (
        {"resourceType": "MedicationRequest", "id": "m3", "status": "stopped", "intent": "order",
         "medicationCodeableConcept": {"text": "Ibuprofen 200 MG Oral Tablet"}, "authoredOn": "2013-01-26",
         "dosageInstruction": [{"sequence": 1, "asNeededBoolean": True}]},
        "[MedicationRequest/m3] 2013-01-26 MedicationRequest: Ibuprofen 200 MG Oral Tablet; as needed; authored 2013-01-26 (stopped)",
    ),
    (
        {"resourceType": "Encounter", "id": "e1", "status": "finished",
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
         "type": [cc(SNOMED, "50849002", "Emergency room admission (procedure)")],
         "period": {"start": "2007-06-04T05:28:45+00:00", "end": "2007-06-05T08:47:45+00:00"},
         "reasonCode": [cc(SNOMED, "128613002", "Seizure disorder")]},
        "[Encounter/e1] 2007-06-04 Encounter: Emergency room admission (procedure) (SNOMED 50849002); class EMER (emergency); "
        "2007-06-04 to 2007-06-05; reason Seizure disorder (finished)",
    ),
    (
        {"resourceType": "Procedure", "id": "pr1", "status": "completed", "code": cc(SNOMED, "73761001", "Colonoscopy (procedure)"),
         "performedPeriod": {"start": "2023-10-04T09:00:00+00:00", "end": "2023-10-04T09:40:00+00:00"}},
        "[Procedure/pr1] 2023-10-04 Procedure: Colonoscopy (procedure) (SNOMED 73761001); performed 2023-10-04 to 2023-10-04 (completed)",
    ),
    (
        {"resourceType": "AllergyIntolerance", "id": "a1", "clinicalStatus": {"coding": [{"code": "active"}]},
         "verificationStatus": {"coding": [{"code": "confirmed"}]}, "type": "allergy", "category": ["medication"], "criticality": "high",
         "code": cc(SNOMED, "764146007", "Penicillin (substance)"), "recordedDate": "2019-03-01T10:00:00+00:00",
         "reaction": [{"manifestation": [cc(SNOMED, "39579001", "Anaphylaxis (disorder)")], "severity": "severe"}]},
        "[AllergyIntolerance/a1] 2019-03-01 AllergyIntolerance: Penicillin (substance) (SNOMED 764146007); allergy (medication); "
        "criticality high; reaction Anaphylaxis (disorder) (severe); recorded 2019-03-01 (active)",
    ),
    (
        {"resourceType": "Immunization", "id": "i1", "status": "completed",
         "vaccineCode": cc("http://hl7.org/fhir/sid/cvx", "140", "Influenza, seasonal, injectable, preservative free"),
         "occurrenceDateTime": "2020-10-01T10:00:00+00:00"},
        "[Immunization/i1] 2020-10-01 Immunization: Influenza, seasonal, injectable, preservative free (CVX 140); given 2020-10-01 (completed)",
    ),
    (
        {"resourceType": "Immunization", "id": "i2", "status": "not-done", "vaccineCode": {"text": "Zoster"},
         "occurrenceDateTime": "2021-10-01", "statusReason": {"text": "Patient refused"}},
        "[Immunization/i2] 2021-10-01 Immunization: Zoster; given 2021-10-01; reason Patient refused (not-done)",
    ),
    (
        {"resourceType": "DiagnosticReport", "id": "d1", "status": "final",
         "code": cc(LOINC, "57698-3", "Lipid panel with direct LDL - Serum or Plasma"), "effectiveDateTime": "2022-02-02",
         "result": [{"reference": "Observation/x1", "display": "LDL"}, {"reference": "Observation/x2", "display": "HDL"}],
         "conclusion": "Borderline\nhigh LDL."},
        "[DiagnosticReport/d1] 2022-02-02 DiagnosticReport: Lipid panel with direct LDL - Serum or Plasma (LOINC 57698-3); "
        "2 results: LDL, HDL; conclusion: Borderline high LDL. (final)",
    ),
    (
        {"resourceType": "CarePlan", "id": "cp1", "status": "completed", "intent": "order", "category": [cc(SNOMED, "225358003", "Wound care")],
         "period": {"start": "2013-01-04", "end": "2013-01-18"},
         "activity": [{"detail": {"code": {"text": "Dressing change management"}, "status": "completed"}}],
         "addresses": [{"reference": "Condition/c1", "display": "Laceration of foot"}]},
        "[CarePlan/cp1] 2013-01-04 CarePlan: Wound care (SNOMED 225358003); 2013-01-04 to 2013-01-18; "
        "activities: Dressing change management; addresses Laceration of foot (completed)",
    ),
    (
        {"resourceType": "Patient", "id": "p1", "name": [{"use": "official", "given": ["Ann", "Marie"], "family": "Lee", "prefix": ["Mrs."]}],
         "gender": "female", "birthDate": "1960-05-01", "deceasedDateTime": "2024-02-03T10:00:00Z"},
        "[Patient/p1] 1960-05-01 Patient: Ann Marie Lee; female; born 1960-05-01; deceased 2024-02-03",
    ),
    (
        {"resourceType": "MedicationStatement", "id": "ms1", "status": "active", "medicationCodeableConcept": {"text": "Aspirin 81 MG"},
         "effectiveDateTime": "2020-01-01"},
        "[MedicationStatement/ms1] 2020-01-01 MedicationStatement: Aspirin 81 MG (active)",
    ),
    (
        {"resourceType": "Organization", "id": "org1", "name": "Riverside Family Medicine", "type": [{"text": "Healthcare Provider"}]},
        "[Organization/org1] undated Organization: Riverside Family Medicine",
    ),
    (
        {"resourceType": "Claim", "id": "cl1", "status": "active", "created": "2021-03-04", "billablePeriod": {"start": "2021-03-04"},
         "type": cc("http://terminology.hl7.org/CodeSystem/claim-type", "professional", "")},
        "[Claim/cl1] 2021-03-04 Claim: professional (active)",
    ),
]  # fmt: skip


@pytest.mark.parametrize("resource,line", CASES, ids=[f"{r['resourceType']}-{r['id']}" for r, _ in CASES])
def test_render_resource_exact_lines(resource, line):
    assert render_resource(resource) == line


def test_numbers_are_short_but_faithful():
    assert [format_number(v) for v in (6.3, 180.63849467821325, 0.0123456, 5.0, 0, -2.5, 1234.567, 7)] == [
        "6.3", "180.64", "0.0123", "5", "0", "-2.5", "1234.57", "7",
    ]  # fmt: skip
    assert rounded(180.63849467821325) == 180.64 and rounded(5.0) == 5 and isinstance(rounded(5.0), int)


def test_dosage_text_from_structure():
    assert dosage_text({"timing": {"repeat": {"frequency": 1, "period": 8, "periodUnit": "h"}}, "asNeededCodeableConcept": {"text": "pain"},
                        "doseAndRate": [{"doseQuantity": {"value": 2, "unit": "tablet"}}]}) == "2 tablet, every 8 hours, as needed for pain"  # fmt: skip
    assert dosage_text({"timing": {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d", "boundsPeriod": {"start": "2021-01-01", "end": "2021-01-10"}}},
                        "doseAndRate": [{"doseQuantity": {"value": 1}}]}) == "dose 1, twice daily, from 2021-01-01 to 2021-01-10"  # fmt: skip


def test_references_are_resolved_with_the_record():
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:p1", "resource": {"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"}},
        {"fullUrl": "urn:uuid:x1", "resource": {"resourceType": "Observation", "id": "x1", "status": "final", "code": {"text": "LDL cholesterol"},
                                                 "subject": {"reference": "urn:uuid:p1"}, "effectiveDateTime": "2022-02-02",
                                                 "valueQuantity": {"value": 131, "unit": "mg/dL"}}},
        {"fullUrl": "urn:uuid:med", "resource": {"resourceType": "Medication", "id": "med", "code": cc(RXNORM, "617310", "atorvastatin 20 MG Oral Tablet")}},
        {"fullUrl": "urn:uuid:d1", "resource": {"resourceType": "DiagnosticReport", "id": "d1", "status": "final", "code": {"text": "Lipid panel"},
                                                 "subject": {"reference": "urn:uuid:p1"}, "effectiveDateTime": "2022-02-02",
                                                 "result": [{"reference": "urn:uuid:x1"}]}},
        {"fullUrl": "urn:uuid:m1", "resource": {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
                                                 "medicationReference": {"reference": "urn:uuid:med"}, "subject": {"reference": "urn:uuid:p1"},
                                                 "authoredOn": "2022-02-03", "reasonReference": [{"reference": "urn:uuid:x1"}]}},
    ]}  # fmt: skip
    record = record_from_bundle(bundle)
    lines = dict(render_record(record))
    assert (
        lines["d1"]
        == "[DiagnosticReport/d1] 2022-02-02 DiagnosticReport: Lipid panel; 1 result: LDL cholesterol (final)"
    )
    assert lines["m1"] == (
        "[MedicationRequest/m1] 2022-02-03 MedicationRequest: atorvastatin 20 MG Oral Tablet (RxNorm 617310); "
        "authored 2022-02-03; reason LDL cholesterol (active)"
    )
    assert (
        render_resource(record.resources["d1"])
        == "[DiagnosticReport/d1] 2022-02-02 DiagnosticReport: Lipid panel; 1 result: Observation/x1 (final)"
    )


def test_one_medication_label_for_lines_and_questions():
    """medication_label is the one resolver behind the rendered line (codes) and the questions' names (text only)."""
    med = {"resourceType": "Medication", "id": "med", "code": cc(RXNORM, "617310", "atorvastatin 20 MG Oral Tablet")}
    record = PatientRecord(
        "p1", {"resourceType": "Patient", "id": "p1"}, {"p1": {"resourceType": "Patient", "id": "p1"}, "med": med}
    )
    inline = {"resourceType": "MedicationRequest", "medicationCodeableConcept": med["code"]}
    by_ref = {"resourceType": "MedicationRequest", "medicationReference": {"reference": "Medication/med"}}
    dangling = {
        "resourceType": "MedicationRequest",
        "medicationReference": {"reference": "Medication/x", "display": " aspirin\n81 MG "},
    }
    for res in (inline, by_ref):
        assert medication_label(res, record) == "atorvastatin 20 MG Oral Tablet (RxNorm 617310)"
        assert medication_label(res, record, codes=False) == "atorvastatin 20 MG Oral Tablet"
    assert (
        medication_label(by_ref) == medication_label(by_ref, codes=False) == "Medication/med"
    )  # no record: the reference
    assert medication_label(dangling, record) == medication_label(dangling, record, codes=False) == "aspirin 81 MG"
    assert medication_label({"resourceType": "MedicationRequest"}, record) == ""


def test_render_record_patient_first_then_by_date_undated_last(synthetic_records):
    for record in synthetic_records:
        lines = render_record(record)
        assert len(lines) == len(record.resources)
        assert lines[0][1].startswith(f"[Patient/{record.patient_id}] ")
        days = [resource_date(record.resources[k]) for k, _ in lines[1:]]
        dated = [d for d in days if d is not None]
        assert dated == sorted(dated)
        assert all(d is None for d in days[len(dated) :])  # undated at the end
        for key, line in lines:
            res = record.resources[key]
            assert line.startswith(f"[{res['resourceType']}/{res['id']}] ") and "\n" not in line
            assert "None" not in line and "(no code)" not in line


def test_resource_date():
    assert resource_date({"resourceType": "Encounter", "period": {"start": "2021-03-04T23:30:00-05:00"}}) == date(
        2021, 3, 4
    )
    assert resource_date({"resourceType": "Condition", "onsetDateTime": "2015"}) == date(2015, 1, 1)
    assert resource_date({"resourceType": "Organization", "name": "x"}) is None
    assert resource_date({"resourceType": "Basic", "created": "2020-02-02"}) == date(2020, 2, 2)
