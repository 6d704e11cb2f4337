"""Factual consistency of generated explanations against the question's rationale, graded by a judge.

For `--method generate` runs: every sample whose question has a reference rationale (meta.rationale)
is shown to a judge model (any model spec) with a fixed rubric (RUBRIC, grades 0-2). The judge
writes its grade as free text; `parse_grade` reads "Grade: N" (or a lone leading digit) and anything
else is *unparseable*: counted and reported, never turned into a default grade.

Grades are appended to RUN/consistency.jsonl as they are produced (one line per sample, with the
judge's spec and its raw reply), so a killed judging resumes, and a report never needs the judge
again. `summarize` gives the share of parseable grades that are 2 (consistent) and 0 (contradicts),
each with n and a 95% interval (Wilson, or the clustered bootstrap with shuffles), the mean grade,
and the unparseable count.

CLI: `clinqa report RUN --judge SPEC` grades what is missing and adds the section to report.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from clinqa.errors import ClinqaError
from clinqa.evaluate.metrics import proportion_ci
from clinqa.evaluate.sample import Sample
from clinqa.jsonl import read_appended

__all__ = [
    "CONSISTENCY_FILE",
    "GRADES",
    "RUBRIC",
    "Graded",
    "consistency_prompt",
    "judge_consistency",
    "load_grades",
    "parse_grade",
    "summarize_consistency",
]

CONSISTENCY_FILE = "consistency.jsonl"
GRADES = (0, 1, 2)
RUBRIC = (
    "You check a medical explanation against a reference rationale written by clinicians. Judge only factual "
    "consistency with the reference, not style or length.\n"
    "Grade 2: consistent - its medical claims agree with the reference and it reaches the same conclusion.\n"
    "Grade 1: partly consistent - incomplete, vague or with a minor error, but it does not contradict the "
    "reference's key point.\n"
    "Grade 0: inconsistent - it contradicts the reference or reaches a different conclusion.\n"
    "Reply with one line: 'Grade: N' where N is 0, 1 or 2."
)


def consistency_prompt(question: str, rationale: str, explanation: str) -> str:
    return (
        f"{RUBRIC}\n\nQuestion: {question.strip()}\n\nReference rationale: {rationale.strip()}\n\n"
        f"Explanation to grade: {explanation.strip()}\n\nGrade:"
    )


_GRADE_RE = re.compile(r"grade\s*[:=]?\s*\(?([0-9]+)\)?", re.IGNORECASE)


def parse_grade(text: str) -> int | None:
    """The grade in a judge's reply, or None (unparseable). The reply continues the prompt's
    "Grade:", so "2", " 2 - consistent" and "Grade: 2" all read 2; a number outside 0-2, two
    different grades, or no grade at all are unparseable."""
    found = {int(m) for m in _GRADE_RE.findall(text)}
    if not found:
        m = re.match(r"\s*\(?([0-9]+)\)?(?![0-9.])", text)
        found = {int(m[1])} if m else set()
    if len(found) != 1:
        return None
    g = found.pop()
    return g if g in GRADES else None


@dataclass(frozen=True)
class Graded:
    question_id: str
    shuffle: int
    judge: str
    grade: int | None  # None = unparseable
    raw: str
    correct: bool  # whether the graded answer picked the right option

    @property
    def key(self) -> tuple[str, int]:
        return (self.question_id, self.shuffle)


def load_grades(run_path: str | Path) -> list[Graded]:
    path = Path(run_path) / CONSISTENCY_FILE
    return read_appended(
        path,
        lambda line: Graded(**json.loads(line)),
        corrupt="corrupt consistency line; move consistency.jsonl aside and re-run",
    )


def judge_consistency(
    run_path: str | Path,
    samples: Sequence[Sample],
    questions_by_id: dict,
    judge,
    judge_spec: str,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[Graded]:
    """Grade every generated explanation that has a reference rationale and is not graded yet."""
    from clinqa.models.base import GenerationConfig

    todo_all = [
        s
        for s in samples
        if s.method == "generate"
        and s.extras.get("generated")
        and (questions_by_id.get(s.question_id) is not None)
        and str(questions_by_id[s.question_id].meta.get("rationale") or "").strip()
    ]
    if not [s for s in samples if s.method == "generate"]:
        raise ClinqaError("consistency grading needs a `--method generate` run (generated explanations)")
    if not todo_all:
        raise ClinqaError("no generated answer in this run has a reference rationale (meta.rationale) to grade against")
    done = load_grades(run_path)
    judges = {g.judge for g in done}
    if judges and judges != {judge_spec}:
        raise ClinqaError(
            f"{Path(run_path) / CONSISTENCY_FILE} holds grades by {', '.join(sorted(judges))}: "
            "move it aside to grade with another judge"
        )
    seen = {g.key for g in done}
    todo = [s for s in todo_all if s.key not in seen]
    finished = len(todo_all) - len(todo)
    if progress:
        progress(finished, len(todo_all))
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, seed=0)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        prompts = []
        for s in batch:
            q = questions_by_id[s.question_id]
            prompts.append(consistency_prompt(q.question, str(q.meta["rationale"]), s.extras["generated"]))
        replies = judge.generate(prompts, cfg)
        graded = [
            Graded(s.question_id, s.shuffle, judge_spec, parse_grade(r), r, s.correct) for s, r in zip(batch, replies)
        ]
        with open(Path(run_path) / CONSISTENCY_FILE, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(asdict(g)) + "\n" for g in graded))
            fh.flush()
            os.fsync(fh.fileno())
        finished += len(batch)
        if progress:
            progress(finished, len(todo_all))
    return load_grades(run_path)


def _share(flags: list[bool], qids: list[str], seed: int) -> dict:
    lo, hi, how = proportion_ci(flags, qids, seed=seed)
    return {
        "n": len(flags),
        "events": int(sum(flags)),
        "rate": sum(flags) / len(flags) if flags else float("nan"),
        "ci_low": lo,
        "ci_high": hi,
        "n_questions": len(set(qids)),
        "ci_method": how,
    }


def summarize_consistency(grades: Sequence[Graded], seed: int = 0) -> dict:
    """Counts and rates over the grades: n, unparseable, consistent (2) and contradicts (0) with CIs."""
    parsed = [g for g in grades if g.grade is not None]
    qids = [g.question_id for g in parsed]
    out = {
        "judge": sorted({g.judge for g in grades}),
        "n_graded": len(grades),
        "n_unparseable": len(grades) - len(parsed),
        "mean_grade": sum(g.grade for g in parsed) / len(parsed) if parsed else float("nan"),
        "consistent": _share([g.grade == 2 for g in parsed], qids, seed),
        "contradicts": _share([g.grade == 0 for g in parsed], qids, seed),
    }
    right = [g for g in parsed if g.correct]
    out["consistent_when_correct"] = _share([g.grade == 2 for g in right], [g.question_id for g in right], seed)
    return out
