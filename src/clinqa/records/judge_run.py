"""Judge answers question by question, optionally into a resumable run folder.

    blind, named, verdicts = collect_judgements(judge, items, answers, orders, pairwise=True, out="runs/judge")

Questions are judged in chunks (`chunk` questions at a time: the blind panel, the named panel and,
with `pairwise`, every pair in both orders). With `out`, the folder (`clinqa.runs.RunFolder`, kind
"records-judge") gets one `judged.jsonl` line per question after each chunk: its blind and named
grades, its verdicts and a hash of the answers it judged. A killed judge loses at most one chunk, and
a rerun judges only what is missing:

- questions not judged yet (a grown question set: the run's data may grow);
- questions whose answers changed since they were judged (a system's run was redone or grew).

run.json holds what determines the grades: the judge's model spec, how grades are read, whether the
chat template is used, the seed of the panel order, whether pairs are asked, and the systems' names
in order. Another judge, reading, seed or set of systems is refused, as for any run folder.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from clinqa.records.judge import Grade, Judge, Verdict, judge_pairs, judge_panel
from clinqa.records.questions import RecordQuestion
from clinqa.runs import Progress, RunFolder, digest, fingerprint

JUDGED_FILE = "judged.jsonl"
REPORT_FILE = "report.json"
KIND = "records-judge"


class JudgedQuestion(BaseModel):
    """One question's judgements: a line of a judge run's judged.jsonl."""

    key: str  # the question id
    answers: str  # hash of {system: answer} that was judged; another hash is stale
    blind: list[dict[str, Any]] = Field(default_factory=list)  # Grade dicts
    named: list[dict[str, Any]] = Field(default_factory=list)
    verdicts: list[dict[str, Any]] = Field(default_factory=list)  # Verdict fields (no derived "winner")


def answers_hash(q: RecordQuestion, answers: Mapping[str, Mapping[str, str]]) -> str:
    """Hash of the answers the systems gave to `q` (systems that did not answer it left out)."""
    return digest({name: a[q.id] for name, a in answers.items() if q.id in a})


def collect_judgements(
    judge: Judge,
    items: Sequence[RecordQuestion],
    answers: Mapping[str, Mapping[str, str]],
    orders: Mapping[str, Sequence[str]],
    *,
    pairwise: bool = True,
    seed: int = 0,
    out: str | Path | None = None,
    chunk: int = 16,
    progress: Progress | None = None,
) -> tuple[list[Grade], list[Grade], list[Verdict]]:
    """The blind and named panel grades and (with `pairwise`) the verdicts for every question, in the
    order of `items`; written to and resumed from the run folder `out` when given (module docstring).
    `progress(done, total)` counts questions."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    pairwise = pairwise and len(answers) >= 2
    hashes = {q.id: answers_hash(q, answers) for q in items}
    judged: dict[str, JudgedQuestion] = {}
    run = None
    if out is not None:
        config = {
            "judge": judge.spec, "reading": judge.reading, "chat": judge.chat, "seed": seed, "pairwise": pairwise,
            "systems": list(answers),
        }  # fmt: skip
        data = fingerprint((q.id, {"question": q.question, "answer": q.answer}) for q in items)
        run = RunFolder.open(out, config, kind=KIND, sample_type=JudgedQuestion, samples_file=JUDGED_FILE, data=data)
    try:
        if run is not None:
            judged = {s.key: s for s in run.samples() if s.key in hashes and s.answers == hashes[s.key]}
        todo = [q for q in items if q.id not in judged]
        total = len(items)
        if progress:
            progress(total - len(todo), total)
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            t0 = time.perf_counter()
            blind = judge_panel(judge, part, answers, named=False, orders=orders)
            named = judge_panel(judge, part, answers, named=True, orders=orders)
            verdicts = judge_pairs(judge, part, answers) if pairwise else []
            rows = [
                JudgedQuestion(
                    key=q.id,
                    answers=hashes[q.id],
                    blind=[g.to_dict() for g in blind if g.question_id == q.id],
                    named=[g.to_dict() for g in named if g.question_id == q.id],
                    verdicts=[asdict(x) for x in verdicts if x.question_id == q.id],
                )  # fmt: skip
                for q in part
            ]
            judged.update((r.key, r) for r in rows)
            if run is not None:
                run.add_compute(time.perf_counter() - t0)
                run.append(rows)
                run.save_meta()
            if progress:
                progress(total - len(todo) + start + len(part), total)
        if run is not None:
            run.finish(n=len(items))
    finally:
        if run is not None:
            run.close()
    rows = [judged[q.id] for q in items]
    return (
        [Grade(**g) for r in rows for g in r.blind],
        [Grade(**g) for r in rows for g in r.named],
        [Verdict(**v) for r in rows for v in r.verdicts],
    )


__all__ = ["JUDGED_FILE", "KIND", "REPORT_FILE", "JudgedQuestion", "answers_hash", "collect_judgements"]
