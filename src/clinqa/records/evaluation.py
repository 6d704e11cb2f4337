"""A records run: answer a question set into a resumable run folder (`clinqa.runs.RunFolder` of
`RecordSample`s: run.json, one JSON line per question in records.jsonl, summary.json) and summarise
stage 1 and stage 2 metrics and cost."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from clinqa.errors import ClinqaError
from clinqa.models.base import Predictor
from clinqa.records.answering import answer_question
from clinqa.records.fhir import PatientRecord
from clinqa.records.lines import _by_patient, _LineCache, _resource_type
from clinqa.records.metrics import answer_metrics, stage1_metrics, stage2_summary
from clinqa.records.questions import RecordQuestion
from clinqa.records.selectors import Selector, _describe
from clinqa.runs import Progress, atomic_write_text

RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"


class RecordSample(BaseModel):
    """One answered record question: a line of a records run's records.jsonl (field names unchanged
    since the first records runs, so old folders still read)."""

    model_config = ConfigDict(extra="allow")

    key: str
    question_id: str
    patient_id: str
    qtype: str
    question: str
    reference: str
    relevant_ids: list[str] = Field(default_factory=list)
    selected: list[dict[str, Any]] = Field(default_factory=list)  # [{"id", "score"}] in stage 1's order
    types: dict[str, str] = Field(default_factory=dict)  # resource id -> resource type
    context_ids: list[str] | None = None
    answer: str = ""
    citations: list[str] = Field(default_factory=list)
    invalid_citations: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    tokens: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)


def read_records_run(path: str | Path) -> list[dict[str, Any]]:
    """The samples of a records run folder as dicts (a torn last line, from a kill mid-write, is
    repaired away)."""
    from clinqa.runs import RunFolder, read_meta

    read_meta(path)  # a one-line error for a folder that is not a run
    return [s.model_dump() for s in RunFolder.load(path, RecordSample, samples_file=RECORDS_FILE).samples()]


def records_fingerprint(questions: Sequence[RecordQuestion]) -> dict[str, Any]:
    """The content of a records question set, per question and field (clinqa.runs.fingerprint)."""
    from clinqa.runs import fingerprint

    return fingerprint(
        (
            (
                q.id,
                {
                    "patient_id": q.patient_id,
                    "question": q.question,
                    "answer": q.answer,
                    "qtype": q.qtype,
                    "relevant_ids": list(q.relevant_ids),
                },
            )
            for q in questions
        ),
        noun="questions",
    )


def _questions_digest(questions: Sequence[RecordQuestion]) -> str:
    """How records runs before store version 2 identified their questions (kept to resume them)."""
    h = hashlib.sha256()
    for q in questions:
        h.update(f"{q.id}\t{q.patient_id}\t{q.question}\t{q.answer}\n".encode())
    return h.hexdigest()[:16]


def summarize_records(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """All metrics of a records run from its samples: stage 1 (micro, per resource type, per question
    type), stage 2 (METEOR, ROUGE-L, exact match, citation precision, abstention), cost."""
    qtypes = [s["qtype"] for s in samples]
    stage1 = stage1_metrics([[x["id"] for x in s["selected"]] for s in samples], [s["relevant_ids"] for s in samples],
                            qtypes=qtypes, types=[s.get("types", {}) for s in samples])  # fmt: skip
    stage2 = stage2_summary([s["metrics"] for s in samples], qtypes)
    total_s = sum(s["timings"].get("total", 0.0) for s in samples)
    n = len(samples)
    cost = {
        "tokens_per_question": sum(s["tokens"] for s in samples) / n if n else None,
        "seconds_per_question": total_s / n if n else None,
        "questions_per_second": n / total_s if total_s else None,
        "select_seconds_per_question": sum(s["timings"].get("select", 0.0) for s in samples) / n if n else None,
        "answer_seconds_per_question": sum(s["timings"].get("answer", 0.0) for s in samples) / n if n else None,
        "model_calls_skipped": sum(1 for s in samples if not s.get("context_ids")),
        "context_lines_per_question": sum(len(s.get("context_ids") or []) for s in samples) / n if n else None,
    }
    return {"n": n, "stage1": stage1, "stage2": stage2, "cost": cost}


def evaluate_records(predictor: Predictor, records_by_patient: Mapping[str, PatientRecord] | Sequence[PatientRecord],
                     questions: Sequence[RecordQuestion], *, selector: Selector, out: str | Path,
                     progress: Progress | None = None, max_new_tokens: int = 128,
                     with_meteor: bool = True, tuning: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Answer every question into the run folder `out` and return the summary (also written to
    out/summary.json). Resumable: questions already in out/records.jsonl are not recomputed; a folder
    holding a different config (model, selector, questions, max_new_tokens) is refused.
    `progress(done, total)` after the resume check and after each question. METEOR needs WordNet
    (`apt-get install wordnet-base`); `with_meteor=False` skips it. `tuning`: how the selector's
    threshold was tuned (`tune_threshold`'s result with its `tuning_key`), kept in run.json so a rerun
    can read it back (`earlier_tuning`) instead of tuning again."""
    by_patient = _by_patient(records_by_patient)
    missing = sorted({q.patient_id for q in questions} - set(by_patient))
    if missing:
        raise ClinqaError(
            f"no record for patient(s) {', '.join(missing[:3])}: pass the records the questions were made from"
        )
    wordnet = None
    if with_meteor:
        from clinqa.records.wordnet import ensure_wordnet

        wordnet = ensure_wordnet()  # fail before any model work if WordNet is missing
    config = {
        "model": predictor.info.spec, "model_name": predictor.info.name, "selector": _describe(selector),
        "questions": _questions_digest(questions), "n_questions": len(questions), "max_new_tokens": max_new_tokens,
        "meteor": with_meteor,
    }  # fmt: skip
    from clinqa.runs import RunFolder

    legacy = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    lines = _LineCache(by_patient)
    with RunFolder.open(
        out,
        config,
        kind="records",
        sample_type=RecordSample,
        samples_file=RECORDS_FILE,
        data=records_fingerprint(questions),
        legacy_identity=legacy,
        identity_keys=lambda c: {k: v for k, v in c.items() if k not in ("questions", "n_questions")},
    ) as run:
        if tuning is not None and run.meta.get("tuning") != dict(tuning):
            run.meta["tuning"] = dict(tuning)
            run.save_meta()
        done = run.done_keys(lambda s: s.key)
        todo = [q for q in questions if q.id not in done]
        total, finished = len(questions), len(questions) - len(todo)
        if progress:
            progress(finished, total)
        for q in todo:
            record = by_patient[q.patient_id]
            t0 = time.perf_counter()
            res = answer_question(
                predictor, record, q, selector=selector, max_new_tokens=max_new_tokens, lines=lines[q.patient_id]
            )
            run.add_compute(time.perf_counter() - t0)
            ids = {s.id for s in res.selected} | set(q.relevant_ids) | set(res.citations)
            sample = RecordSample(
                key=q.id, question_id=q.id, patient_id=q.patient_id, qtype=q.qtype, question=q.question,
                reference=q.answer, relevant_ids=list(q.relevant_ids),
                selected=[{"id": s.id, "score": s.score} for s in res.selected],
                types={rid: _resource_type(record, rid) for rid in sorted(ids)},
                context_ids=res.context_ids, answer=res.answer, citations=res.citations,
                invalid_citations=res.invalid_citations, timings=res.timings, tokens=res.tokens,
                metrics=answer_metrics(q, res.answer, res.citations, res.invalid_citations, with_meteor=with_meteor,
                                       wordnet=wordnet),
            )  # fmt: skip
            run.append([sample])
            finished += 1
            if progress:
                progress(finished, total)
        wanted = {q.id for q in questions}
        samples = [s.model_dump() for s in run.samples() if s.key in wanted]
        summary = {"model": config["model"], "selector": config["selector"], **summarize_records(samples)}
        atomic_write_text(run.path / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
        run.finish(n=len(samples))
    return summary
