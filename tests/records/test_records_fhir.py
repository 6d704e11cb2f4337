"""Loading FHIR R4 records: bundles, NDJSON bulk exports, a FHIR server (mocked), and every way input can be wrong."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import httpx
import pytest

from clinqa.errors import ClinqaError
from clinqa.records import (
    load_bundle,
    load_fhir_server,
    load_ndjson_folder,
    load_records,
    record_from_bundle,
    write_patients,
)
from clinqa.records.fhir import validation_errors


def make_bundle(*resources: dict, kind: str = "collection", full_urls: bool = True) -> dict:
    entries = []
    for r in resources:
        entry: dict = {"resource": r}
        if full_urls:
            entry["fullUrl"] = f"urn:uuid:{r['id']}"
        entries.append(entry)
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "name": [{"use": "official", "given": ["Ann"], "family": "Lee"}],
    "gender": "female",
    "birthDate": "1960-05-01",
}


def obs(oid: str, when: str, value: float, *, code: str = "4548-4", display: str = "Hemoglobin A1c/Hemoglobin.total in Blood",
        unit: str = "%", subject: str = "urn:uuid:p1") -> dict:  # fmt: skip
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}], "text": display},
        "subject": {"reference": subject},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }


ENCOUNTER = {
    "resourceType": "Encounter",
    "id": "e1",
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    "subject": {"reference": "urn:uuid:p1"},
    "period": {"start": "2021-03-04T09:00:00+00:00", "end": "2021-03-04T09:20:00+00:00"},
}
CLAIM = {
    "resourceType": "Claim",
    "id": "c1",
    "status": "active",
    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
    "use": "claim",
    "patient": {"reference": "urn:uuid:p1"},
    "created": "2021-03-04",
    "provider": {"display": "clinic"},
    "priority": {"coding": [{"code": "normal"}]},
    "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "private"}}],
}
EOB = {
    "resourceType": "ExplanationOfBenefit",
    "id": "eob1",
    "status": "active",
    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
    "use": "claim",
    "patient": {"reference": "urn:uuid:p1"},
    "created": "2021-03-04",
    "insurer": {"display": "private"},
    "provider": {"display": "clinic"},
    "claim": {"reference": "urn:uuid:c1"},
    "outcome": "complete",
    "insurance": [{"focal": True, "coverage": {"display": "private"}}],
}


def test_synthetic_bundles_load_strictly_from_a_folder(tmp_path, synthetic_bundles):
    write_patients(tmp_path, synthetic_bundles)
    records = load_records(tmp_path)
    assert len(records) == len(synthetic_bundles)
    assert all(record.problems == [] for record in records)
    by_id = {r.patient_id: r for r in records}
    for bundle in synthetic_bundles:
        patient = bundle["entry"][0]["resource"]
        record = by_id[patient["id"]]
        assert len(record.resources) == len(bundle["entry"])  # synthetic bundles carry no billing
        assert record.name == f"{patient['name'][0]['given'][0]} {patient['name'][0]['family']}"
        assert record.birth_date.isoformat() == patient["birthDate"]


def test_bundle_ids_kept_and_references_resolved(tmp_path):
    enc = copy.deepcopy(ENCOUNTER)
    o = obs("o1", "2021-03-04T09:10:00+00:00", 6.3)
    o["encounter"] = {"reference": "urn:uuid:e1"}
    anonymous = obs("x", "2021-03-05", 7.0, subject="Patient/p1")
    del anonymous["id"]  # no id: it takes the one in its fullUrl
    bundle = make_bundle(PATIENT, enc, o)
    bundle["entry"].append({"fullUrl": "urn:uuid:0f6b8c1e-1111-4222-8333-444455556666", "resource": anonymous})
    record = load_bundle(write_json(tmp_path / "b.json", bundle))
    assert list(record.resources) == ["p1", "e1", "o1", "0f6b8c1e-1111-4222-8333-444455556666"]
    assert record.patient_id == "p1" and record.patient["gender"] == "female"
    assert record.resources["o1"]["subject"] == {"reference": "Patient/p1"}
    assert record.resources["o1"]["encounter"] == {"reference": "Encounter/e1"}
    assert record.resolve(record.resources["o1"]["encounter"]) is record.resources["e1"]
    assert record.resolve("Patient/p1") is record.patient
    assert record.resolve("Observation/nothing") is None
    assert [r["id"] for r in record.by_type("Observation")] == ["o1", "0f6b8c1e-1111-4222-8333-444455556666"]
    assert record.counts() == {"Observation": 2, "Patient": 1, "Encounter": 1}
    assert record.problems == []
    assert record.source == str(tmp_path / "b.json")


def test_not_json(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text('{"resourceType": "Bundle", oops', encoding="utf-8")
    with pytest.raises(ClinqaError) as err:
        load_bundle(path)
    assert str(err.value) == (
        f"{path}: not JSON (Expecting property name enclosed in double quotes at line 1, column 28); expected a FHIR R4 Bundle"
    )


def test_json_but_not_fhir(tmp_path):
    path = write_json(tmp_path / "x.json", {"hello": "world"})
    with pytest.raises(
        ClinqaError, match=r"x\.json: not a FHIR resource \(no resourceType\); expected a FHIR R4 Bundle$"
    ):
        load_bundle(path)


def test_not_a_bundle(tmp_path):
    path = write_json(tmp_path / "patient.json", PATIENT)
    with pytest.raises(ClinqaError) as err:
        load_bundle(path)
    assert str(err.value) == f"{path}: a FHIR Patient resource, not a Bundle; expected a FHIR R4 Bundle"


def test_bundle_without_patient(tmp_path):
    path = write_json(tmp_path / "nop.json", make_bundle(obs("o1", "2021-01-01", 5.0)))
    for lenient in (False, True):
        with pytest.raises(ClinqaError) as err:
            load_bundle(path, lenient=lenient)
        assert str(err.value) == f"{path}: no Patient resource; a record needs exactly one patient"


def test_missing_file_and_folder_given_to_load_bundle(tmp_path):
    with pytest.raises(ClinqaError, match="no such file"):
        load_bundle(tmp_path / "nope.json")
    with pytest.raises(ClinqaError, match="is a folder"):
        load_bundle(tmp_path)
    with pytest.raises(ClinqaError, match="no such file or folder"):
        load_records(tmp_path / "nope")


def test_invalid_resource_strict_names_file_entry_resource_and_field(tmp_path):
    bad = obs("o1", "2021-03-04", 6.3)
    bad["valueQuantity"]["value"] = "six"
    path = write_json(tmp_path / "bad.json", make_bundle(PATIENT, ENCOUNTER, bad))
    with pytest.raises(ClinqaError) as err:
        load_bundle(path)
    assert str(err.value) == (
        f"{path}: entry[2], Observation/o1: field 'valueQuantity.value': Decimal value string does not match spec regex "
        "(use --lenient (serve: records_lenient) to keep invalid resources)"
    )


def test_invalid_resource_lenient_keeps_it_and_records_a_problem(tmp_path):
    bad = obs("o1", "2021-03-04", 6.3)
    bad["valueQuantity"]["value"] = "six"
    bad["effectiveDateTime"] = "yesterday"
    path = write_json(tmp_path / "bad.json", make_bundle(PATIENT, ENCOUNTER, bad))
    record = load_bundle(path, lenient=True)
    assert record.resources["o1"]["valueQuantity"]["value"] == "six"  # kept as it was
    assert record.resources["o1"]["subject"] == {"reference": "Patient/p1"}  # still linked
    assert record.problems == [
        f"{path}: entry[2], Observation/o1: field 'effectiveDateTime': DateTime value string does not match spec regex "
        "(and 1 more); kept unvalidated"
    ]


def test_missing_required_field_and_unknown_field(tmp_path):
    no_status = obs("o1", "2021-03-04", 6.3)
    del no_status["status"]
    assert validation_errors(no_status) == [("status", "Value for the field 'status' is required")]
    extra = obs("o2", "2021-03-04", 6.3)
    extra["colour"] = "blue"
    assert validation_errors(extra) == [("colour", "unknown field (not in FHIR R4)")]
    nested = copy.deepcopy(ENCOUNTER)
    nested["participant"] = [{"individual": {"reference": "Practitioner/x"}, "shoe": 1}]
    assert validation_errors(nested) == [("participant[0].shoe", "unknown field (not in FHIR R4)")]
    assert validation_errors({"resourceType": "Spaceship", "id": "s"}) == [
        ("resourceType", "unknown resource type 'Spaceship'")
    ]
    path = write_json(tmp_path / "b.json", make_bundle(PATIENT, {"resourceType": "Spaceship", "id": "s1"}))
    with pytest.raises(
        ClinqaError, match=r"entry\[1\], Spaceship/s1: field 'resourceType': unknown resource type 'Spaceship'"
    ):
        load_bundle(path)


def test_r4_data_that_r5_rejects_validates():
    # Encounter.class is a Coding in R4 (a list in R5), medicationCodeableConcept is R4-only
    assert validation_errors(ENCOUNTER) == []
    med = {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
           "medicationCodeableConcept": {"text": "metformin"}, "subject": {"reference": "Patient/p1"}}  # fmt: skip
    assert validation_errors(med) == []


def test_broken_references_are_problems_and_the_rest_loads(tmp_path):
    enc = copy.deepcopy(ENCOUNTER)
    enc["participant"] = [{"individual": {"reference": "Practitioner/nobody"}}]
    enc["serviceProvider"] = {"reference": "Organization?identifier=https://github.com/synthetichealth/synthea|123"}
    enc["reasonReference"] = [{"reference": "urn:uuid:gone"}]
    enc["partOf"] = {"reference": "http://elsewhere.example.org/fhir/Encounter/9"}  # another server: fine
    enc["contained"] = [{"resourceType": "Location", "id": "room", "name": "Room 1"}]
    enc["location"] = [{"location": {"reference": "#room"}}, {"location": {"reference": "#closet"}}]
    path = write_json(tmp_path / "b.json", make_bundle(PATIENT, enc))
    record = load_bundle(path)
    assert record.problems == [
        f"{path}: entry[1], Encounter/e1: field 'participant[0].individual': reference 'Practitioner/nobody' points to nothing in the bundle",
        f"{path}: entry[1], Encounter/e1: field 'reasonReference[0]': reference 'urn:uuid:gone' points to nothing in the bundle",
        f"{path}: entry[1], Encounter/e1: field 'location[1].location': reference '#closet' points to nothing in the bundle",
    ]
    assert record.resources["e1"]["serviceProvider"]["reference"].startswith("Organization?identifier=")


def test_billing_excluded_unless_asked(tmp_path):
    path = write_json(tmp_path / "b.json", make_bundle(PATIENT, ENCOUNTER, CLAIM, EOB))
    record = load_bundle(path)
    assert set(record.counts()) == {"Patient", "Encounter"}
    assert record.excluded == {"Claim": 1, "ExplanationOfBenefit": 1}
    assert record.problems == []
    full = load_bundle(path, include_billing=True)
    assert full.counts() == {"Patient": 1, "Encounter": 1, "Claim": 1, "ExplanationOfBenefit": 1}
    assert full.resources["eob1"]["claim"] == {"reference": "Claim/c1"}
    assert full.excluded == {} and full.problems == []


def test_two_patients_in_one_bundle(tmp_path):
    p2 = {**PATIENT, "id": "p2", "name": [{"given": ["Bo"], "family": "Ng"}]}
    bundle = make_bundle(PATIENT, p2, obs("o1", "2021-01-01", 6.0), obs("o2", "2021-01-01", 7.0, subject="urn:uuid:p2"))
    path = write_json(tmp_path / "two.json", bundle)
    with pytest.raises(ClinqaError, match="2 Patient resources .*load_records splits a bundle by patient"):
        load_bundle(path)
    a, b = load_records(path)
    assert (a.patient_id, list(a.resources)) == ("p1", ["p1", "o1"])
    assert (b.patient_id, list(b.resources)) == ("p2", ["p2", "o2"])


def test_transaction_bundle_with_request_only_entries(tmp_path):
    bundle = make_bundle(PATIENT, ENCOUNTER, kind="transaction")
    bundle["entry"].append({"request": {"method": "DELETE", "url": "Observation/old"}})
    record = load_bundle(write_json(tmp_path / "t.json", bundle))
    assert set(record.resources) == {"p1", "e1"}


def test_record_from_bundle_in_memory():
    record = record_from_bundle(make_bundle(PATIENT, ENCOUNTER), source="mem")
    assert record.source == "mem" and record.resources["e1"]["subject"] == {"reference": "Patient/p1"}


# ---------------------------------------------------------------------------------------- folders


def test_folder_of_bundles_skips_shared_directory_files(tmp_path):
    write_json(tmp_path / "Ann_Lee.json", make_bundle(PATIENT, ENCOUNTER))
    hospitals = {"resourceType": "Organization", "id": "org1", "name": "General Hospital"}
    write_json(tmp_path / "hospitalInformation1.json", make_bundle(hospitals, kind="batch"))
    (tmp_path / "README.txt").write_text("not a bundle")
    records = load_records(tmp_path)
    assert [r.patient_id for r in records] == ["p1"]


def test_folder_with_a_broken_file_strict_and_lenient(tmp_path):
    write_json(tmp_path / "a.json", make_bundle(PATIENT, ENCOUNTER))
    (tmp_path / "b.json").write_text("{", encoding="utf-8")
    with pytest.raises(ClinqaError, match=r"b\.json: not JSON"):
        load_records(tmp_path)
    assert [r.patient_id for r in load_records(tmp_path, lenient=True)] == ["p1"]


def _ndjson(path, resources, *, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in resources)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def test_ndjson_folder_splits_patients_and_shares_directory_resources(tmp_path):
    p2 = {**PATIENT, "id": "p2", "name": [{"given": ["Bo"], "family": "Ng"}]}
    doc = {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Who"}]}
    unused = {"resourceType": "Practitioner", "id": "dr2", "name": [{"family": "Else"}]}
    e1 = {
        **ENCOUNTER,
        "subject": {"reference": "Patient/p1"},
        "participant": [{"individual": {"reference": "Practitioner/dr1"}}],
    }
    e2 = {
        **ENCOUNTER,
        "id": "e2",
        "subject": {"reference": "Patient/p2"},
        "participant": [{"individual": {"reference": "Practitioner/dr1"}}],
    }
    _ndjson(tmp_path / "Practitioner.ndjson", [doc, unused])
    _ndjson(tmp_path / "Patient.ndjson", [p2, PATIENT])
    _ndjson(tmp_path / "Encounter.ndjson", [e1, e2])
    _ndjson(tmp_path / "Observation.ndjson.gz", [obs("o1", "2021-01-01", 6.0, subject="Patient/p1"),
                                                obs("o2", "2021-02-01", 7.0, subject="Patient/p2")], gz=True)  # fmt: skip
    _ndjson(tmp_path / "Claim.ndjson", [{**CLAIM, "patient": {"reference": "Patient/p1"}}])
    records = load_ndjson_folder(tmp_path)
    assert [r.patient_id for r in records] == ["p2", "p1"]  # the Patient file's order
    b, a = records
    assert set(a.resources) == {"p1", "e1", "dr1", "o1"} and set(b.resources) == {"p2", "e2", "dr1", "o2"}
    assert a.resources["e1"]["participant"][0]["individual"] == {"reference": "Practitioner/dr1"}
    assert a.excluded == {"Claim": 1} and a.problems == [] and b.problems == []
    assert load_records(tmp_path)[0].patient_id == "p2"  # load_records spots the NDJSON


def test_ndjson_bad_line_strict_and_lenient(tmp_path):
    _ndjson(tmp_path / "Patient.ndjson", [PATIENT])
    (tmp_path / "Observation.ndjson").write_text(
        json.dumps(obs("o1", "2021-01-01", 6.0, subject="Patient/p1")) + "\n{oops\n"
    )
    with pytest.raises(ClinqaError) as err:
        load_ndjson_folder(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'Observation.ndjson'}: line 2: not JSON (Expecting property name enclosed in double quotes, column 2) "
        "(use --lenient (serve: records_lenient) to load the rest and list the problems)"
    )
    (record,) = load_ndjson_folder(tmp_path, lenient=True)
    assert set(record.resources) == {"p1", "o1"}
    assert record.problems == [
        f"{tmp_path / 'Observation.ndjson'}: line 2: not JSON (Expecting property name enclosed in double quotes, column 2)"
    ]


def test_ndjson_folder_errors(tmp_path):
    with pytest.raises(ClinqaError, match="no .ndjson files"):
        load_ndjson_folder(tmp_path)
    with pytest.raises(ClinqaError, match="not a folder"):
        load_ndjson_folder(tmp_path / "missing")
    _ndjson(tmp_path / "Observation.ndjson", [obs("o1", "2021-01-01", 6.0, subject="Patient/p1")])
    with pytest.raises(ClinqaError, match="no Patient resource"):
        load_ndjson_folder(tmp_path)


# ---------------------------------------------------------------------------------------- FHIR server

BASE = "https://fhir.example.org/r4"


def _searchset(resources, next_url=None):
    bundle = {"resourceType": "Bundle", "type": "searchset",
              "entry": [{"fullUrl": f"{BASE}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                        for r in resources]}  # fmt: skip
    bundle["link"] = [{"relation": "self", "url": "ignored"}]
    if next_url:
        bundle["link"].append({"relation": "next", "url": next_url})
    return bundle


def test_server_everything_follows_next_links():
    seen = []
    enc = {**ENCOUNTER, "subject": {"reference": "Patient/p1"}}
    o1 = obs("o1", "2021-03-04", 6.3, subject="Patient/p1")
    o1["encounter"] = {"reference": f"{BASE}/Encounter/e1"}  # absolute reference to the same server
    pages = {
        "/r4/Patient/p1/$everything": _searchset([PATIENT, enc], next_url=f"{BASE}/Patient/p1/$everything?page=2"),
        "/r4/Patient/p1/$everything?page=2": _searchset([o1, CLAIM], next_url="/r4/Patient/p1/$everything?page=3"),
        "/r4/Patient/p1/$everything?page=3": _searchset([obs("o2", "2022-03-04", 6.1, subject="Patient/p1")]),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.raw_path.decode(), request.headers["accept"]))
        page = pages.get(request.url.raw_path.decode())
        return httpx.Response(200, json=page) if page else httpx.Response(404)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        record = load_fhir_server(BASE + "/", "p1", client=client)
    assert [path for path, _ in seen] == list(pages)
    assert {accept for _, accept in seen} == {"application/fhir+json"}
    assert list(record.resources) == ["p1", "e1", "o1", "o2"]
    assert record.excluded == {"Claim": 1}
    assert record.resources["o1"]["encounter"] == {"reference": "Encounter/e1"}
    assert record.problems == []
    assert record.source == f"{BASE}/Patient/p1/$everything"


def test_server_errors_are_clear():
    def not_found(request):
        return httpx.Response(404, json={"resourceType": "OperationOutcome",
                                         "issue": [{"severity": "error", "code": "not-found", "diagnostics": "Resource Patient/zz is not known"}]})  # fmt: skip

    with httpx.Client(transport=httpx.MockTransport(not_found)) as client:
        with pytest.raises(ClinqaError) as err:
            load_fhir_server(BASE, "zz", client=client)
    assert str(err.value) == (
        f"{BASE}/Patient/zz/$everything: HTTP 404 (Resource Patient/zz is not known; "
        "no such patient, or the server does not support $everything)"
    )

    def down(request):
        raise httpx.ConnectError("connection refused")

    with httpx.Client(transport=httpx.MockTransport(down)) as client:
        with pytest.raises(ClinqaError, match=r"cannot reach the FHIR server \(ConnectError: connection refused\)"):
            load_fhir_server(BASE, "p1", client=client)

    def html(request):
        return httpx.Response(200, text="<html>login</html>", headers={"content-type": "text/html"})

    with httpx.Client(transport=httpx.MockTransport(html)) as client:
        with pytest.raises(ClinqaError, match="not JSON"):
            load_fhir_server(BASE, "p1", client=client)


def test_load_records_dispatches_patient_urls():
    def handler(request):
        assert request.url.raw_path.decode() == "/r4/Patient/p1/$everything"
        return httpx.Response(200, json=_searchset([PATIENT]))

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        (record,) = load_records(f"{BASE}/Patient/p1", client=client)
    assert record.patient_id == "p1"
    with pytest.raises(ClinqaError, match="give a patient URL"):
        load_records(BASE)
