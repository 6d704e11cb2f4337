"""Training pairs for fine-tuning either stage of the records pipeline: `stage1_examples` (select
prompt -> " yes" / " no"), `stage2_examples` (answer prompt -> reference answer with [Type/id]
citations); `write_examples` / `read_examples` save and load them as JSON Lines."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from clinqa.records.answering import ANSWER_SYSTEM, answer_prompt
from clinqa.records.fhir import PatientRecord
from clinqa.records.lines import _by_patient, _handle, _LineCache, _resource_type
from clinqa.records.metrics import NOT_IN_RECORD_ANSWER
from clinqa.records.questions import RecordQuestion
from clinqa.records.selectors import NO, YES, select_prompt


def stage1_examples(records: Mapping[str, PatientRecord] | Sequence[PatientRecord], questions: Sequence[RecordQuestion],
                    *, negatives: int = 3, hard_fraction: float = 0.5, seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """Training pairs for the stage-1 selector: {"prompt": SELECT_PROMPT filled, "target": " yes" | " no",
    "question_id", "resource_id"}. Every relevant line is a positive; `negatives` negatives per positive
    (at least `negatives` per question, so unanswerable questions teach "no"), sampled with `seed`;
    `hard_fraction` of them from the positives' resource types (the confusable ones)."""
    by_patient = _by_patient(records)
    lines = _LineCache(by_patient)
    rng = random.Random(f"clinqa-stage1:{seed}")
    out = []
    for q in questions:
        all_lines = lines[q.patient_id]
        record = by_patient[q.patient_id]
        rel = set(q.relevant_ids)
        pos = [(rid, t) for rid, t in all_lines if rid in rel]
        neg_pool = [(rid, t) for rid, t in all_lines if rid not in rel]
        want = min(len(neg_pool), max(negatives, negatives * len(pos)))
        pos_types = {_resource_type(record, rid) for rid, _ in pos}
        hard = [x for x in neg_pool if _resource_type(record, x[0]) in pos_types]
        n_hard = min(len(hard), int(round(want * hard_fraction)))
        chosen = rng.sample(hard, n_hard) if n_hard else []
        taken = {rid for rid, _ in chosen}
        rest = [x for x in neg_pool if x[0] not in taken]
        chosen += rng.sample(rest, min(len(rest), want - len(chosen)))
        for (rid, text), target in [*((p, YES) for p in pos), *((n, NO) for n in chosen)]:
            out.append(
                {"prompt": select_prompt(q.question, text), "target": target, "question_id": q.id, "resource_id": rid}
            )
    rng.shuffle(out)
    return out


def reference_with_citations(record: PatientRecord, question: RecordQuestion) -> str:
    """The reference answer with its relevant resources cited as [Type/id] (NOT_IN_RECORD_ANSWER for an
    unanswerable question)."""
    if question.qtype == "unanswerable":
        return NOT_IN_RECORD_ANSWER
    cites = " ".join(f"[{_handle(record, rid)}]" for rid in question.relevant_ids)
    return f"{question.answer} {cites}".strip()


def stage2_examples(records: Mapping[str, PatientRecord] | Sequence[PatientRecord], questions: Sequence[RecordQuestion],
                    *, distractors: int = 3, seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """Training pairs for the stage-2 answerer: {"system": ANSWER_SYSTEM, "prompt": the stage-2 prompt over
    the relevant lines plus `distractors` random other lines (record order), "target": the reference
    answer with [Type/id] citations, "question_id"}. Unanswerable questions get distractors only and
    the target "Not in the record.". Apply the chat template with `system` when training a chat model."""
    by_patient = _by_patient(records)
    lines = _LineCache(by_patient)
    rng = random.Random(f"clinqa-stage2:{seed}")
    out = []
    for q in questions:
        all_lines = lines[q.patient_id]
        record = by_patient[q.patient_id]
        rel = set(q.relevant_ids)
        others = [i for i, (rid, _) in enumerate(all_lines) if rid not in rel]
        k = min(len(others), max(distractors, 1 if not rel else 0))
        keep = {i for i, (rid, _) in enumerate(all_lines) if rid in rel} | set(rng.sample(others, k))
        ctx = [all_lines[i] for i in sorted(keep)]
        out.append({"system": ANSWER_SYSTEM, "prompt": answer_prompt(q.question, ctx),
                    "target": reference_with_citations(record, q), "question_id": q.id})  # fmt: skip
    return out


def write_examples(path: str | Path, examples: Iterable[Mapping[str, Any]]) -> Path:
    """Examples as JSON Lines (parent folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(dict(ex), ensure_ascii=False) + "\n")
    return out


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
