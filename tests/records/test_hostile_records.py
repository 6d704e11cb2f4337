"""Hostile bundles (issue 16): a resource about a patient who is not in the bundle joins no record,
entries that are not objects are reported, errors name the CLI's flags."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from clinqa.errors import ClinqaError
from clinqa.records.fhir import load_records, record_from_bundle
from clinqa.records.questions import generate_questions


def patient(pid, given):
    return {
        "fullUrl": f"urn:uuid:{pid}",
        "resource": {"resourceType": "Patient", "id": pid, "name": [{"given": [given], "family": "Doe"}]},
    }


def condition(cid, subject, text):
    return {
        "resource": {
            "resourceType": "Condition",
            "id": cid,
            "code": {"text": text},
            "subject": {"reference": subject},
            "onsetDateTime": "2020-01-01",
        }
    }


def test_a_resource_about_a_ghost_patient_joins_no_record(tmp_path):
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            patient("p1", "Ann"),
            condition("c1", "urn:uuid:p1", "Asthma"),
            condition("c2", "Patient/ghost", "Leukaemia"),
        ],
    }
    f = tmp_path / "b.json"
    f.write_text(json.dumps(bundle))
    (rec,) = load_records(f)
    assert set(rec.resources) == {"p1", "c1"}  # c2 was kept in Ann's record before
    assert any(
        "Condition/c2" in p and "'Patient/ghost', a patient not in the bundle; left out of every record" in p
        for p in rec.problems
    )
    qs = generate_questions(rec, now=dt.date(2025, 1, 1), seed=0, per_type=5)
    assert qs and not any("Leukaemia" in q.answer + q.question or "c2" in q.relevant_ids for q in qs)


def test_split_bundles_do_not_pull_a_ghost_resource_into_a_referring_patient(tmp_path):
    enc = {
        "resource": {
            "resourceType": "Encounter",
            "id": "e9",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": "Patient/ghost"},
        }
    }
    obs = {
        "resource": {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"text": "Weight"},
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e9"},
        }
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [patient("p1", "Ann"), patient("p2", "Bob"), obs, enc, condition("c3", "Patient/p2", "Gout")],
    }
    recs = {r.patient_id: r for r in record_from_bundle_split(bundle)}
    assert set(recs["p1"].resources) == {"p1", "o1"} and set(recs["p2"].resources) == {"p2", "c3"}
    assert all(any("Encounter/e9" in p for p in r.problems) for r in recs.values())


def record_from_bundle_split(bundle):
    from clinqa.records.fhir import _Assembly, _bundle_items

    asm = _Assembly("<b>", lenient=False, include_billing=False)
    for item in _bundle_items(bundle, "<b>"):
        asm.add(item)
    asm.link()
    return asm.split()


@pytest.mark.parametrize("entry,kind", [(None, "null"), (3, "a number"), ("x", "a string")])
def test_entries_that_are_not_objects_are_reported(entry, kind):
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [patient("p1", "Ann"), entry]}
    with pytest.raises(ClinqaError) as exc:
        record_from_bundle(bundle, source="b.json")
    assert str(exc.value) == (
        f"b.json: entry[1]: not a FHIR resource ({kind}, not an object) "
        "(use --lenient (serve: records_lenient) to load the rest and list the problems)"
    )
    rec = record_from_bundle(bundle, source="b.json", lenient=True)
    assert rec.problems == [f"b.json: entry[1]: not a FHIR resource ({kind}, not an object)"]
