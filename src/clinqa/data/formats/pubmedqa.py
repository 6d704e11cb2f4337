"""PubMedQA ori_pqal.json: {PMID: {QUESTION, CONTEXTS, final_decision, LONG_ANSWER, MESHES, ...}};
options yes/no/maybe."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from clinqa.data.formats.common import Problem, Raw, RowError, json_object, question, record, require
from clinqa.data.schema import Question

PUBMEDQA_OPTIONS: dict[str, str] = {"A": "yes", "B": "no", "C": "maybe"}


def read_pubmedqa(path: Path) -> Iterator[Raw | Problem]:
    data, problem = json_object(path, "PMID")
    if problem:
        yield problem
        return
    for pmid, rec in data.items():
        yield Raw(path, None, str(pmid), rec)


def from_pubmedqa(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """PubMedQA: options A yes, B no, C maybe; meta has contexts (joined with blank lines), long_answer, meshes."""
    rec = record(raw)
    decision = require(rec, "final_decision")
    answer = {v: k for k, v in PUBMEDQA_OPTIONS.items()}.get(str(decision).strip().lower())
    if answer is None:
        raise RowError("final_decision", f"must be yes, no or maybe, got {decision!r}")
    contexts = rec.get("CONTEXTS") or []
    meta = {
        "pmid": raw.key,
        "contexts": "\n\n".join(contexts) if isinstance(contexts, list) else str(contexts),
        "long_answer": rec.get("LONG_ANSWER") or "",
        "meshes": rec.get("MESHES") or [],
        "labels": rec.get("LABELS") or [],
        "year": rec.get("YEAR"),
        **{k: v for k, v in rec.items() if k.startswith("reasoning_")},
    }
    fields = {
        "id": f"pubmedqa-{raw.key}",
        "question": require(rec, "QUESTION"),
        "options": dict(PUBMEDQA_OPTIONS),
        "answer": answer,
        "source": "pubmedqa",
        "meta": meta,
    }
    return question(fields, {"question": "QUESTION", "answer": "final_decision"})
