"""Questions about a record: hand-checked ground truth, invariants on synthetic records, phrasings, files."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from datetime import date

import pytest
from dateutil.relativedelta import relativedelta

from clinqa.errors import ClinqaError
from clinqa.records import (
    NOT_IN_RECORD,
    PHRASINGS,
    QTYPES,
    RecordQuestion,
    generate_questions,
    read_questions,
    record_from_bundle,
    write_questions,
)
from clinqa.records.questions import STEPS, clean_name, drug_name, measurement_series, trend_label
from clinqa.records.synth import synthesize_patients

NOW = date(2025, 1, 1)
LOINC, SNOMED, RXNORM = "http://loinc.org", "http://snomed.info/sct", "http://www.nlm.nih.gov/research/umls/rxnorm"


def _cc(system, code, display):
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _obs(oid, day, value, code="4548-4", display="Hemoglobin A1c/Hemoglobin.total in Blood", unit="%", enc=None):
    o = {"resourceType": "Observation", "id": oid, "status": "final", "code": _cc(LOINC, code, display),
         "subject": {"reference": "urn:uuid:p1"}, "effectiveDateTime": f"{day}T09:00:00+00:00",
         "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}  # fmt: skip
    if enc:
        o["encounter"] = {"reference": f"urn:uuid:{enc}"}
    return o


def _enc(eid, day):
    return {"resourceType": "Encounter", "id": eid, "status": "finished", "class": {"code": "AMB"},
            "subject": {"reference": "urn:uuid:p1"}, "period": {"start": f"{day}T09:00:00+00:00", "end": f"{day}T09:30:00+00:00"}}  # fmt: skip


def _cond(cid, code, display, onset, enc, abated=None):
    c = {"resourceType": "Condition", "id": cid, "clinicalStatus": {"coding": [{"code": "resolved" if abated else "active"}]},
         "verificationStatus": {"coding": [{"code": "confirmed"}]}, "code": _cc(SNOMED, code, display),
         "subject": {"reference": "urn:uuid:p1"}, "encounter": {"reference": f"urn:uuid:{enc}"}, "onsetDateTime": f"{onset}T09:00:00+00:00"}  # fmt: skip
    if abated:
        c["abatementDateTime"] = f"{abated}T09:00:00+00:00"
    return c


def _med(mid, code, display, day, status, reason, enc):
    return {"resourceType": "MedicationRequest", "id": mid, "status": status, "intent": "order",
            "medicationCodeableConcept": _cc(RXNORM, code, display), "subject": {"reference": "urn:uuid:p1"},
            "encounter": {"reference": f"urn:uuid:{enc}"}, "authoredOn": f"{day}T09:00:00+00:00",
            "reasonReference": [{"reference": f"urn:uuid:{reason}"}]}  # fmt: skip


METFORMIN = "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet"
AMOX = "amoxicillin 250 MG / clavulanate 125 MG Oral Tablet"


def hand_record():
    """A diabetic whose HbA1c drifts up to 8.2 at diagnosis (2023-01-10), then falls on metformin."""
    resources = [
        {"resourceType": "Patient", "id": "p1", "name": [{"given": ["Ann"], "family": "Lee"}], "gender": "female", "birthDate": "1960-05-01"},
        _enc("e1", "2022-03-01"), _enc("e2", "2023-01-10"), _enc("e3", "2024-09-01"), _enc("e4", "2024-11-20"),
        _cond("sin", "444814009", "Viral sinusitis (disorder)", "2022-03-01", "e1", abated="2022-03-15"),
        _med("amox", "562251", AMOX, "2022-03-01", "completed", "sin", "e1"),
        _obs("a1", "2022-01-05", 6.1), _obs("a2", "2022-07-05", 6.6), _obs("a3", "2023-01-10", 8.2, enc="e2"),
        _cond("dm", "44054006", "Diabetes mellitus type 2 (disorder)", "2023-01-10", "e2"),
        _med("met", "860975", METFORMIN, "2023-01-10", "active", "dm", "e2"),
        _obs("a4", "2023-04-12", 7.4), _obs("a5", "2023-10-15", 6.9), _obs("a6", "2024-09-01", 6.8, enc="e3"),
        _obs("w1", "2023-01-10", 80.0, "29463-7", "Body weight", "kg"), _obs("w2", "2024-09-01", 80.4, "29463-7", "Body weight", "kg"),
        _obs("w3", "2024-11-20", 80.2, "29463-7", "Body weight", "kg"),
        {"resourceType": "AllergyIntolerance", "id": "al", "clinicalStatus": {"coding": [{"code": "active"}]},
         "code": _cc(SNOMED, "764146007", "Penicillin (substance)"), "patient": {"reference": "urn:uuid:p1"}, "recordedDate": "2022-03-01"},
        _obs("future", "2025-06-01", 9.9),  # after `now`: does not exist yet
    ]  # fmt: skip
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}  # fmt: skip
    return record_from_bundle(bundle, source="hand")


@pytest.fixture(scope="module")
def hand():
    record = hand_record()
    return record, generate_questions(record, now=NOW, seed=0, per_type=40)


def _by(qs, template, **meta):
    return [q for q in qs if q.meta["template"] == template and all(q.meta.get(k) == v for k, v in meta.items())]


def test_hand_checked_latest_trend_and_lists(hand):
    record, qs = hand
    (latest,) = _by(qs, "latest", measurement="hemoglobin A1c")
    assert (latest.answer, latest.answer_value, latest.unit, latest.relevant_ids) == (
        "6.8 % (on 2024-09-01)",
        6.8,
        "%",
        ["a6"],
    )
    (weight,) = _by(qs, "latest", measurement="body weight")
    assert weight.answer_value == 80.2 and weight.relevant_ids == ["w3"]
    (trend,) = _by(qs, "trend", measurement="hemoglobin A1c")
    assert trend.answer_value == "decreasing" and trend.relevant_ids in (["a4", "a5", "a6"], ["a3", "a4", "a5", "a6"])
    (stable,) = _by(qs, "trend", measurement="body weight")
    assert stable.answer_value == "stable" and stable.relevant_ids == ["w1", "w2", "w3"]
    (meds,) = _by(qs, "list_medications")
    assert meds.answer_value == [METFORMIN] and meds.relevant_ids == ["met"]  # the completed antibiotic is not current
    (conds,) = _by(qs, "list_conditions")
    assert conds.answer_value == ["Diabetes mellitus type 2 (disorder)"] and conds.relevant_ids == ["dm"]
    (allergies,) = _by(qs, "list_allergies")
    assert allergies.answer_value == ["Penicillin (substance)"] and allergies.relevant_ids == ["al"]
    assert "future" not in {rid for q in qs for rid in q.relevant_ids}


def test_hand_checked_multi_resource(hand):
    record, qs = hand
    after_dx = {q.meta["diagnosis_date"]: q for q in _by(qs, "multi_med_after_dx")}
    assert after_dx["2023-01-10"].answer_value == [METFORMIN]
    assert after_dx["2023-01-10"].relevant_ids == ["dm", "met"]
    assert after_dx["2023-01-10"].answer == f"{METFORMIN} (started 2023-01-10)"
    assert "type 2" in after_dx["2023-01-10"].question
    assert after_dx["2022-03-01"].answer_value == [AMOX]
    (at_start,) = _by(qs, "multi_lab_at_start", measurement="hemoglobin A1c")
    assert (at_start.answer_value, at_start.relevant_ids) == (8.2, ["met", "a3"])
    assert "metformin hydrochloride" in at_start.question
    (after,) = _by(qs, "multi_lab_after_start", measurement="hemoglobin A1c")
    assert (after.answer_value, after.relevant_ids, after.answer) == (7.4, ["met", "a4"], "7.4 % (on 2023-04-12)")


def test_hand_checked_counts_windows_existence_and_unanswerable(hand):
    record, qs = hand
    years = {q.question: q for q in _by(qs, "count_encounters")}
    assert {re.search(r"\d{4}", k).group(): q.answer_value for k, q in years.items()} == {
        "2022": 1,
        "2023": 1,
        "2024": 2,
    }
    for q in _by(qs, "window", measurement="hemoglobin A1c"):
        start = NOW - relativedelta(months=q.meta["window_months"])
        expected = [
            o
            for o in ("a1", "a2", "a3", "a4", "a5", "a6")
            if date.fromisoformat(record.resources[o]["effectiveDateTime"][:10]) > start
        ]
        assert q.relevant_ids == expected
    exists = _by(qs, "exists_condition")
    yes = {q.meta["probe"]: q for q in exists if q.answer_value is True}
    no = {q.meta["probe"]: q for q in exists if q.answer_value is False}
    assert yes["diabetes mellitus type 2"].relevant_ids == ["dm"]
    assert yes["diabetes mellitus type 2"].answer == "Yes: Diabetes mellitus type 2 (disorder) (2023-01-10)"
    assert (
        "type 2 diabetes" not in no
        and "asthma" in no
        and no["asthma"].relevant_ids == []
        and no["asthma"].answer == "No"
    )
    med_no = {q.meta["probe"] for q in _by(qs, "exists_medication") if q.answer_value is False}
    assert "metformin" not in med_no and "warfarin" in med_no
    unanswerable = [q for q in qs if q.qtype == "unanswerable"]
    assert unanswerable
    probes = {q.meta["probe"] for q in unanswerable}
    assert "hemoglobin A1c" not in probes and "type 2 diabetes" not in probes
    assert "TSH" in probes or "asthma" in probes
    for q in unanswerable:
        assert (q.answer, q.answer_value, q.relevant_ids) == (NOT_IN_RECORD, None, [])


def _check_ground_truth(record, q: RecordQuestion, now: date) -> None:
    """Recompute each question's answer from the record (independently of how it was chosen)."""
    assert set(q.relevant_ids) <= set(record.resources), q
    series = measurement_series(record, now)
    s = series.get(q.meta.get("measurement", ""))
    points = {p.rid: p for p in s.points} if s else {}
    if q.qtype == "lookup":
        (rid,) = q.relevant_ids
        assert points[rid].day.isoformat() in q.question and points[rid].value == q.answer_value
        assert sum(p.day == points[rid].day for p in s.points) == 1
    elif q.qtype == "latest":
        (rid,) = q.relevant_ids
        assert points[rid] == s.points[-1] and q.answer_value == points[rid].value
    elif q.meta["template"] in ("window", "count_measurements", "average"):
        start = date.fromisoformat(q.meta["window_start"])
        inside = [p.rid for p in s.points if start < p.day <= now]
        assert q.relevant_ids == inside and inside
        if q.qtype == "count":
            assert q.answer_value == len(inside)
        if q.qtype == "average":
            assert abs(q.answer_value - sum(points[r].value for r in inside) / len(inside)) <= 0.005 + 1e-9
        if q.qtype == "window":
            assert q.answer_value == [points[r].value for r in inside]
    elif q.meta["template"] == "count_encounters":
        year = int(re.search(r"\d{4}", q.question).group())
        encounters = [
            k
            for k, r in record.resources.items()
            if r["resourceType"] == "Encounter" and r["period"]["start"][:4] == str(year)
        ]
        assert q.answer_value == len(encounters) == len(q.relevant_ids)
    elif q.qtype == "trend":
        values = [points[r].value for r in q.relevant_ids]
        assert trend_label(values)[0] == q.answer_value
        assert q.relevant_ids == [p.rid for p in s.points[-len(values) :]]
    elif q.qtype == "exists":
        assert bool(q.relevant_ids) == q.answer_value
        assert q.answer.startswith("Yes") if q.answer_value else q.answer == "No"
    elif q.qtype == "multi":
        types = [record.resources[r]["resourceType"] for r in q.relevant_ids]
        assert "MedicationRequest" in types and len(types) >= 2
    elif q.qtype == "unanswerable":
        assert q.relevant_ids == [] and q.answer == NOT_IN_RECORD and q.answer_value is None
    elif q.qtype == "list":
        assert all(
            record.resources[r]["resourceType"] in ("MedicationRequest", "Condition", "AllergyIntolerance")
            for r in q.relevant_ids
        )


def test_ground_truth_on_synthetic_records(synthetic_records):
    kinds = Counter()
    for record in synthetic_records:
        qs = generate_questions(record, now=NOW, seed=3)
        assert len({q.id for q in qs}) == len(qs) and len({q.question for q in qs}) == len(qs)
        for q in qs:
            _check_ground_truth(record, q, NOW)
            assert q.patient_id == record.patient_id and q.now == NOW
        kinds.update(q.qtype for q in qs)
    assert set(kinds) == set(QTYPES)  # every question type shows up on synthetic data


def test_ground_truth_on_the_hand_record(hand):
    record, qs = hand
    for q in qs:
        _check_ground_truth(record, q, NOW)


def test_deterministic_and_seed_changes_phrasing(synthetic_records):
    record = synthetic_records[0]
    a = generate_questions(record, now=NOW, seed=1)
    assert [q.model_dump() for q in a] == [q.model_dump() for q in generate_questions(record, now="2025-01-01", seed=1)]
    b = generate_questions(record, now=NOW, seed=2)
    assert [q.question for q in a] != [q.question for q in b]
    used = Counter()
    for seed in range(12):
        for q in generate_questions(record, now=NOW, seed=seed, qtypes=["latest"]):
            used[q.meta["phrasing"]] += 1
    assert len(used) >= 3


def test_phrasings_are_plentiful_and_overridable(synthetic_records):
    assert all(len(v) >= 3 for v in PHRASINGS.values())
    record = synthetic_records[0]
    qs = generate_questions(record, now=NOW, seed=0, qtypes=["latest"], phrasings={"latest": ["Latest {name}?"]})
    assert qs and all(re.fullmatch(r"Latest .+\?", q.question) for q in qs)
    with pytest.raises(ValueError, match="uses \\['drug'\\]"):
        generate_questions(record, now=NOW, seed=0, phrasings={"latest": ["{drug}?"]})
    with pytest.raises(ValueError, match="unknown question template"):
        generate_questions(record, now=NOW, seed=0, phrasings={"nonsense": ["x"]})
    with pytest.raises(ValueError, match="unknown question types"):
        generate_questions(record, now=NOW, seed=0, qtypes=["essay"])


def test_now_limits_what_exists():
    record = hand_record()
    early = generate_questions(record, now=date(2023, 2, 1), seed=0, per_type=40)
    (latest,) = _by(early, "latest", measurement="hemoglobin A1c")
    assert latest.answer_value == 8.2 and latest.relevant_ids == ["a3"]
    default = generate_questions(record, now=None, seed=0, qtypes=["latest"], per_type=40)
    assert default[0].now == date(2025, 6, 2)  # the day after the last dated resource


def test_names():
    assert clean_name("Essential hypertension (disorder)") == "essential hypertension"
    assert clean_name("Leukocytes [#/volume] in Blood by Automated count") == "leukocytes in blood by automated count"
    assert clean_name("Body mass index 30+ - obesity (finding)") == "body mass index 30+ - obesity"
    assert drug_name(METFORMIN) == "metformin hydrochloride"
    assert drug_name("Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet") == "amoxicillin / clavulanate"
    assert drug_name("Clonazepam [Klonopin]") == "clonazepam"
    assert drug_name("200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler") == "albuterol"


def test_trend_label():
    assert trend_label([7.4, 6.9, 6.8]) == ("decreasing", -0.0853)
    assert trend_label([6.6, 8.2, 7.4, 6.9, 6.8]) is None  # not monotonic: no clear answer
    assert trend_label([120, 121, 120])[0] == "stable"
    assert trend_label([100, 104, 109])[0] == "increasing"
    assert trend_label([100, 103, 104]) is None  # +4%: neither stable nor a clear rise


def test_write_and_read_questions(tmp_path, hand):
    _, qs = hand
    path = write_questions(tmp_path / "q" / "questions.jsonl", qs)
    back = read_questions(path)
    assert [q.model_dump() for q in back] == [q.model_dump() for q in qs]
    assert {type(q.answer_value) for q in back if q.qtype == "exists"} == {bool}
    assert {type(q.answer_value) for q in back if q.qtype == "count"} == {int}
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["qtype"] = "essay"
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ClinqaError, match=r"bad\.jsonl: line 2: field 'qtype': Input should be 'lookup'"):
        read_questions(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{\n")
    with pytest.raises(ClinqaError, match=r"broken\.jsonl: line 1: not JSON"):
        read_questions(tmp_path / "broken.jsonl")
    with pytest.raises(ClinqaError, match="no such file"):
        read_questions(tmp_path / "missing.jsonl")


def test_registry_has_one_step_per_type_and_each_makes_only_its_type(synthetic_records):
    assert tuple(STEPS) == QTYPES
    record = synthetic_records[0]
    for qtype in QTYPES:
        made = generate_questions(record, now=NOW, seed=1, qtypes=[qtype])
        assert {q.qtype for q in made} <= {qtype}


def test_questions_are_pinned_to_the_generator_before_the_split():
    """sha256 of the questions for 3 synthetic patients, computed with the single-module questions.py
    (commit c95262a) before it became a package: splitting it must not change a question."""
    records = [record_from_bundle(b) for b in synthesize_patients(3, seed=11)]
    qs = [q.model_dump(mode="json") for r in records for q in generate_questions(r, now="2025-01-01", seed=2)]
    assert len(qs) == 89
    assert (
        hashlib.sha256(json.dumps(qs).encode()).hexdigest()
        == "54d15923e2254d69d83736a1da91c72480196493b639ee57167899158740009b"
    )
