"""What a judge's grades are worth: named vs blind, self-preference, position bias, agreement with exact match.

    rep = judge_report(Judge("default"), questions, {"bm25": "runs/bm25", "full": "runs/full"}, out="runs/judge")

With `out`, the grades go to a resumable run folder as they come (`clinqa.records.judge_run`: a killed
judge loses at most one chunk of questions, a grown question set or a redone system's answers are
judged on the next run, nothing else) and the report to its report.json.

- named minus blind, per system: per question the named panel's expected grade minus the blind
  panel's (same prompt, same answer order, only the authors' names added); the mean over questions
  with a percentile bootstrap interval over questions, a bootstrap p-value and a Wilcoxon signed-rank
  p-value (paired; questions where either grade is unparseable are left out and counted).
- self-preference: a system whose model is the judge's own (its run's model spec equals the judge's,
  adapters and steering included, since a fine-tuned model is another model; or named by the caller)
  is "self". Its inflation relative to the others: per question,
  the self system's named-minus-blind difference minus the mean difference of the other systems, with
  the same interval and tests. Also, where exact match applies, how much more often the blind judge
  calls the self system's answers correct than exact match does, relative to the others.
- position bias, from the pairwise mode: for each pair of answers asked in both orders, the verdict
  follows the position when it picks the same slot (A both times, or B both times) and so a different
  answer. Reported: the rate (Wilson interval), how often A wins overall (exact binomial test against
  1/2), and how many pairs the judge decided consistently.
- Cohen's kappa (sklearn) between "judge says correct" (grade >= 3) and exact match, per mode and
  per system, over the questions where exact match applies.
- unparseable grades and verdicts, per mode and system: counted, never defaulted.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clinqa.evaluate.metrics import bootstrap_mean_test
from clinqa.records.judge import (
    CORRECT_FROM,
    Grade,
    Judge,
    Verdict,
    answers_of,
    by_system,
    panel_orders,
)
from clinqa.records.judge_run import REPORT_FILE, collect_judgements
from clinqa.records.metrics import exact_match
from clinqa.records.questions import RecordQuestion
from clinqa.runs import Progress, atomic_write_text


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def paired_mean(diffs: Sequence[float], *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean of per-question differences, bootstrap interval and p, Wilcoxon signed-rank p (scipy)."""
    from scipy.stats import wilcoxon

    arr = np.asarray(diffs, dtype=float)
    if arr.size == 0:
        return {"n": 0, "mean": None, "ci_low": None, "ci_high": None, "p_bootstrap": None, "p_wilcoxon": None}
    mean, lo, hi, p = bootstrap_mean_test(arr, n_boot=n_boot, seed=seed)
    p_w = 1.0 if not np.any(np.abs(arr) > 1e-12) else float(wilcoxon(arr, zero_method="wilcox").pvalue)
    return {"n": int(arr.size), "mean": float(mean), "ci_low": lo, "ci_high": hi, "p_bootstrap": p, "p_wilcoxon": p_w}


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float | None, float | None]:
    """Wilson score interval for k successes in n (95% by default); (None, None) for n = 0."""
    if n == 0:
        return (None, None)
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def kappa_with_exact_match(grades: Sequence[Mapping[str, Any] | Grade], items: Sequence[RecordQuestion],
                           answers: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:  # fmt: skip
    """Cohen's kappa (sklearn) between the judge's correct (grade >= 3) and exact match, over the parsed
    grades whose question has an exact-match reference; {"kappa", "n", "agreement"}. kappa is None when
    undefined (fewer than 2 answers, or both raters constant)."""
    from sklearn.metrics import cohen_kappa_score

    by_id = {q.id: q for q in items}
    judge_says, em_says = [], []
    for g in grades:
        g = g.to_dict() if isinstance(g, Grade) else g
        q = by_id.get(g["question_id"])
        if q is None or g["grade"] is None:
            continue
        em = exact_match(q, answers[g["system"]][q.id])
        if em is None:
            continue
        judge_says.append(int(g["grade"] >= CORRECT_FROM))
        em_says.append(int(em))
    n = len(em_says)
    agreement = sum(a == b for a, b in zip(judge_says, em_says)) / n if n else None
    kappa = None
    if n >= 2 and (len(set(judge_says)) > 1 or len(set(em_says)) > 1):
        k = float(cohen_kappa_score(em_says, judge_says))
        kappa = None if math.isnan(k) else k
    return {"kappa": kappa, "n": n, "agreement": agreement}


def position_bias(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """From verdicts on the same pair in both orders: how often the verdict follows the position."""
    from scipy.stats import binomtest

    pairs: dict[tuple[str, frozenset], list[Verdict]] = defaultdict(list)
    for v in verdicts:
        pairs[(v.question_id, frozenset((v.first, v.second)))].append(v)
    both = [vs for vs in pairs.values() if len(vs) == 2 and all(v.choice is not None for v in vs)]
    follows = sum(vs[0].choice == vs[1].choice for vs in both)
    parsed = [v for v in verdicts if v.choice is not None]
    a_wins = sum(v.choice == "A" for v in parsed)
    lo, hi = wilson(follows, len(both))
    return {
        "pairs": len(both), "follows_position": follows,
        "rate": follows / len(both) if both else None, "ci_low": lo, "ci_high": hi,
        "consistent": len(both) - follows,
        "verdicts": len(parsed), "first_wins": a_wins,
        "first_win_rate": a_wins / len(parsed) if parsed else None,
        "p_first_vs_half": float(binomtest(a_wins, len(parsed), 0.5).pvalue) if parsed else None,
        "unparseable": len(verdicts) - len(parsed),
        "pairs_with_unparseable": sum(1 for vs in pairs.values() if any(v.choice is None for v in vs)),
    }  # fmt: skip


def pairwise_wins(verdicts: Sequence[Verdict], systems: Sequence[str]) -> dict[str, Any]:
    """Per system, pairwise win rate: a pair decided the same way in both orders counts 1 to its
    winner; one that follows the position counts 1/2 to each (a tie)."""
    pairs: dict[tuple[str, frozenset], list[Verdict]] = defaultdict(list)
    for v in verdicts:
        pairs[(v.question_id, frozenset((v.first, v.second)))].append(v)
    score: dict[str, float] = defaultdict(float)
    played: dict[str, int] = defaultdict(int)
    for (_, pair), vs in pairs.items():
        if len(vs) != 2 or any(v.choice is None for v in vs):
            continue
        w0, w1 = vs[0].winner, vs[1].winner
        for s in pair:
            played[s] += 1
            score[s] += 1.0 if w0 == w1 == s else (0.5 if w0 != w1 else 0.0)
    return {s: {"pairs": played[s], "win_rate": score[s] / played[s] if played[s] else None} for s in systems}


def model_identity(spec: str | None) -> str | None:
    """A model spec in normal form (parse_spec), so "default" and " default " compare equal; None for
    an empty one. Adapters and steering are part of it: a fine-tuned judge model is another model."""
    if not spec:
        return None
    from clinqa.models.spec import parse_spec

    try:
        return str(parse_spec(spec))
    except Exception:  # noqa: BLE001 - a spec written by another version: compare it as text
        return str(spec).strip()


def run_model_spec(folder: str | Path) -> str | None:
    """The model spec a records run folder was made with (its run.json config), or None."""
    f = Path(folder) / "run.json"
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    cfg = data.get("config", data) if isinstance(data, dict) else {}
    return cfg.get("model") if isinstance(cfg, dict) else None


def self_systems(judge_spec: str | None, system_specs: Mapping[str, str | None]) -> list[str]:
    """The systems whose model is the judge's own: the same model spec, modifiers included."""
    me = model_identity(judge_spec)
    return [name for name, spec in system_specs.items() if me is not None and model_identity(spec) == me]


def _per_question_diff(named: Sequence[Grade], blind: Sequence[Grade]) -> dict[str, dict[str, float]]:
    b = {(g.system, g.question_id): g for g in blind if g.expected is not None}
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for g in named:
        other = b.get((g.system, g.question_id))
        if g.expected is not None and other is not None:
            out[g.system][g.question_id] = g.expected - other.expected
    return out


def _em_excess(
    grades: Sequence[Grade], items: Sequence[RecordQuestion], answers: Mapping[str, Mapping[str, str]]
) -> dict[str, dict[str, float]]:
    """Per system and question: judge-correct minus exact match, where exact match applies."""
    by_id = {q.id: q for q in items}
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for g in grades:
        q = by_id.get(g.question_id)
        if q is None or g.grade is None:
            continue
        em = exact_match(q, answers[g.system][q.id])
        if em is not None:
            out[g.system][q.id] = float(g.grade >= CORRECT_FROM) - float(em)
    return out


def _relative(
    per_q: Mapping[str, Mapping[str, float]], mine: Sequence[str], others: Sequence[str], **kw
) -> dict[str, Any]:
    """Per question, the mean over `mine` minus the mean over `others` (questions with both), paired tests."""
    diffs = []
    qids = sorted({q for s in mine for q in per_q.get(s, {})})
    for q in qids:
        a = [per_q[s][q] for s in mine if q in per_q.get(s, {})]
        b = [per_q[s][q] for s in others if q in per_q.get(s, {})]
        if a and b:
            diffs.append(float(np.mean(a)) - float(np.mean(b)))
    return paired_mean(diffs, **kw)


def judge_report(judge: Judge, items: Sequence[RecordQuestion], systems: Mapping[str, Mapping[str, str] | str | Path], *,
                 seed: int = 0, pairwise: bool = True, system_specs: Mapping[str, str | None] | None = None,
                 self_names: Sequence[str] | None = None, n_boot: int = 2000, out: str | Path | None = None,
                 chunk: int = 16, progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """The full comparison (module docstring). `systems`: name -> {question id: answer} or a records run
    folder; `system_specs`: name -> model spec (read from run folders when not given); `self_names`
    overrides which systems count as the judge's own model. `out`: a run folder the grades are written
    to as they come and resumed from (`clinqa.records.judge_run`), with the report in its report.json;
    `chunk` questions are judged at a time, `progress(done, total)` after each chunk."""
    answers = {name: answers_of(src) for name, src in systems.items()}
    names = list(answers)
    if system_specs is None:
        system_specs = {n: (run_model_spec(s) if not isinstance(s, Mapping) else None) for n, s in systems.items()}
    mine = list(self_names) if self_names is not None else self_systems(judge.spec, system_specs)
    orders = panel_orders(items, answers, seed)
    blind, named, verdicts = collect_judgements(
        judge, items, answers, orders, pairwise=pairwise, seed=seed, out=out, chunk=chunk, progress=progress
    )
    diffs = _per_question_diff(named, blind)
    b_sys, n_sys = by_system(blind, names), by_system(named, names)
    per_system = {}
    for i, name in enumerate(names):
        per_system[name] = {
            "self": name in mine, "model": system_specs.get(name), "blind": b_sys[name], "named": n_sys[name],
            "named_minus_blind": paired_mean([diffs[name][q] for q in sorted(diffs.get(name, {}))], n_boot=n_boot, seed=seed + i),
            "kappa_blind": kappa_with_exact_match([g for g in blind if g.system == name], items, answers),
            "kappa_named": kappa_with_exact_match([g for g in named if g.system == name], items, answers),
        }  # fmt: skip
    others = [n for n in names if n not in mine]
    self_pref = None
    if mine and others:
        self_pref = {
            "systems": mine, "judge": judge.spec,
            "named_inflation": _relative(diffs, mine, others, n_boot=n_boot, seed=seed),
            "blind_excess_over_exact_match": _relative(_em_excess(blind, items, answers), mine, others, n_boot=n_boot, seed=seed),
        }  # fmt: skip
    report: dict[str, Any] = {
        "judge": judge.spec, "reading": judge.reading, "seed": seed, "n_questions": len(items), "systems": per_system,
        "self_preference": self_pref,
        "kappa_blind": kappa_with_exact_match(blind, items, answers),
        "kappa_named": kappa_with_exact_match(named, items, answers),
        "unparseable": {"blind": sum(g.grade is None for g in blind), "named": sum(g.grade is None for g in named)},
        "grades": {"blind": [g.to_dict() for g in blind], "named": [g.to_dict() for g in named]},
    }  # fmt: skip
    if pairwise and len(names) >= 2:
        report["position_bias"] = position_bias(verdicts)
        report["pairwise_wins"] = pairwise_wins(verdicts, names)
        report["unparseable"]["pairwise"] = sum(v.choice is None for v in verdicts)
        report["verdicts"] = [v.to_dict() for v in verdicts]
    if out is not None:
        atomic_write_text(Path(out) / REPORT_FILE, json.dumps(report, indent=2, default=str))
    return report


__all__ = ["judge_report", "kappa_with_exact_match", "model_identity", "paired_mean", "pairwise_wins", "position_bias",
           "run_model_spec", "self_systems", "wilson"]  # fmt: skip
