"""Records runs on the run store: RecordSample lines keep the old field names, an edited reference
answer is refused, and a folder written before the store resumes."""

from __future__ import annotations

import hashlib
import json
from datetime import date

import pytest

from clinqa.errors import ClinqaError
from clinqa.records.fhir import record_from_bundle
from clinqa.records.pipeline import RetrievalSelector, _describe, _questions_digest, evaluate_records, read_records_run
from clinqa.records.questions import generate_questions
from clinqa.records.synth import synthesize_patients

OLD_KEYS = {
    "key",
    "question_id",
    "patient_id",
    "qtype",
    "question",
    "reference",
    "relevant_ids",
    "selected",
    "types",
    "context_ids",
    "answer",
    "citations",
    "invalid_citations",
    "timings",
    "tokens",
    "metrics",
}


@pytest.fixture(scope="module")
def setup():
    records = [record_from_bundle(b, source=f"s-{i}") for i, b in enumerate(synthesize_patients(1, seed=3))]
    qs = [q for q in generate_questions(records[0], now=date(2025, 1, 1), seed=0, per_type=1)][:3]
    return records, qs


def _run(pred, records, qs, out):
    return evaluate_records(
        pred, records, qs, selector=RetrievalSelector("bm25", top_k=2), out=out, max_new_tokens=2, with_meteor=False
    )


def test_samples_keep_their_field_names_and_edited_answers_are_refused(setup, tiny_predictor, tmp_path):
    records, qs = setup
    out = tmp_path / "r"
    _run(tiny_predictor, records, qs, out)
    lines = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and set(lines[0]) == OLD_KEYS
    edited = [qs[0], qs[1].model_copy(update={"answer": qs[1].answer + " (edited)"}), qs[2]]
    with pytest.raises(ClinqaError, match=rf"other data \(1 questions differ, first: {qs[1].id} answer\)"):
        _run(tiny_predictor, records, edited, out)


def test_records_folder_from_before_the_store_resumes(setup, tiny_predictor, tmp_path):
    records, qs = setup
    out = tmp_path / "old"
    _run(tiny_predictor, records, qs, out)
    before = (out / "records.jsonl").read_bytes()
    meta = json.loads((out / "run.json").read_text())
    for k in ("store", "data"):
        meta.pop(k)
    # the identity the old code wrote: a hash of the config dict with the questions' digest
    old_cfg = {
        "model": tiny_predictor.info.spec,
        "model_name": tiny_predictor.info.name,
        "selector": _describe(RetrievalSelector("bm25", top_k=2)),
        "questions": _questions_digest(qs),
        "n_questions": 3,
        "max_new_tokens": 2,
        "meteor": False,
    }
    meta["identity"] = hashlib.sha256(json.dumps(old_cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    (out / "run.json").write_text(json.dumps(meta))
    summary = _run(tiny_predictor, records, qs, out)
    assert summary["n"] == 3 and (out / "records.jsonl").read_bytes() == before
    assert json.loads((out / "run.json").read_text())["store"] == 2
    assert len(read_records_run(out)) == 3
