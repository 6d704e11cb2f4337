"""Record-QA runs side by side: every metric with its interval, and paired tests against a baseline.

`summarize_records` gives a run's point figures; a reader comparing stage-1 methods (BM25, MiniLM, an
LLM selector, a fine-tuned one) on the same questions needs to know which differences are more than
noise. Per question, from the run folders' samples:

- stage-1 F1 of the selected resources against the relevant ones (questions with relevant ones);
- exact match (questions with a checkable answer), METEOR and ROUGE-L of the answer;
- false abstention (an answerable question answered "not in the record") and correct abstention (an
  unanswerable one);
- micro stage-1 precision/recall/F1 over all questions, with an interval from resampling questions.

Each mean carries a 95% percentile bootstrap interval over questions; each run is compared with the
baseline on the questions both answered (paired bootstrap of the per-question difference, and of the
difference of micro F1s over resampled questions: interval and two-sided p). `clinqa records compare` prints the tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clinqa.errors import ClinqaError
from clinqa.evaluate.metrics import bootstrap_ci, bootstrap_mean_test
from clinqa.records.metrics import prf

# (key, label) of the per-question metrics, in table order
METRICS: tuple[tuple[str, str], ...] = (
    ("stage1_f1", "stage-1 F1 per question"),
    ("exact_match", "exact match"),
    ("meteor", "METEOR"),
    ("rouge_l", "ROUGE-L"),
    ("false_abstention", "false abstention"),
    ("correct_abstention", "abstains when unanswerable"),
)


def _selection_counts(sample: Mapping[str, Any]) -> tuple[int, int, int]:
    """(tp, fp, fn) of the selected resources against the relevant ones."""
    sel, rel = {x["id"] for x in sample.get("selected") or []}, set(sample.get("relevant_ids") or [])
    return len(sel & rel), len(sel - rel), len(rel - sel)


def per_question(sample: Mapping[str, Any]) -> dict[str, float | None]:
    """One sample's per-question values (None where a metric does not apply to the question)."""
    relevant = bool(sample.get("relevant_ids"))
    m = sample.get("metrics") or {}
    answerable = bool(m.get("answerable", relevant))
    abstained = bool(m.get("abstained"))

    def num(key: str) -> float | None:
        v = m.get(key)
        return None if v is None else float(v)

    return {
        "stage1_f1": prf(*_selection_counts(sample))["f1"] if relevant else None,
        "exact_match": num("exact_match"),
        "meteor": num("meteor"),
        "rouge_l": num("rouge_l"),
        "false_abstention": float(abstained) if answerable else None,
        "correct_abstention": None if answerable else float(abstained),
    }


def run_figures(samples: Sequence[Mapping[str, Any]], *, seed: int = 0) -> dict[str, Any]:
    """Means with intervals of one run's per-question metrics, and micro stage-1 P/R/F1 with intervals."""
    if not samples:
        raise ClinqaError("a records run with no samples has nothing to compare")
    rows = [per_question(s) for s in samples]
    out: dict[str, Any] = {"n": len(samples)}
    for key, _ in METRICS:
        vals = [r[key] for r in rows if r[key] is not None]
        lo, hi = bootstrap_ci(vals, seed=seed) if vals else (None, None)
        out[key] = {"n": len(vals), "mean": float(np.mean(vals)) if vals else None, "ci95": [lo, hi]}
    counts = np.asarray([_selection_counts(s) for s in samples], dtype=int).reshape(-1, 3)
    idx = np.arange(len(samples), dtype=float)
    for name in ("precision", "recall", "f1"):
        lo, hi = bootstrap_ci(idx, seed=seed, stat=lambda i, k=name: prf(*counts[i.astype(int)].sum(0))[k])
        out[f"stage1_micro_{name}"] = {"n": len(samples), "mean": prf(*counts.sum(0))[name], "ci95": [lo, hi]}
    secs = [float((s.get("timings") or {}).get("total", 0.0)) for s in samples]
    out["seconds_per_question"] = float(np.mean(secs))
    return out


def paired(
    base: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]], *, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Per metric: mean of other - base over the questions both runs answered and the metric applies
    to, with a paired bootstrap interval and two-sided p; and `stage1_micro_f1`, the difference of the
    two micro F1s over the shared questions, its interval and p from resampling those questions."""
    ra, rb = {s["question_id"]: s for s in base}, {s["question_id"]: s for s in other}
    a, b = {q: per_question(s) for q, s in ra.items()}, {q: per_question(s) for q, s in rb.items()}
    shared = [q for q in a if q in b]
    out = {}
    for key, _ in METRICS:
        diffs = [b[q][key] - a[q][key] for q in shared if a[q][key] is not None and b[q][key] is not None]
        mean, lo, hi, p = bootstrap_mean_test(diffs, seed=seed) if diffs else (None, None, None, None)
        out[key] = {"n": len(diffs), "difference": mean, "ci95": [lo, hi], "p": p}
    # micro F1 pools the lines of all questions: resample the shared questions, recompute both
    ca = np.asarray([_selection_counts(ra[q]) for q in shared], dtype=int).reshape(-1, 3)
    cb = np.asarray([_selection_counts(rb[q]) for q in shared], dtype=int).reshape(-1, 3)

    def micro_diff(i: np.ndarray) -> float:
        i = i.astype(int)
        return prf(*cb[i].sum(0))["f1"] - prf(*ca[i].sum(0))["f1"]

    idx = np.arange(len(shared), dtype=float)
    mean, lo, hi, p = bootstrap_mean_test(idx, seed=seed, stat=micro_diff) if shared else (None, None, None, None)
    out["stage1_micro_f1"] = {"n": len(shared), "difference": mean, "ci95": [lo, hi], "p": p}
    return out


def compare_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], baseline: str | None = None) -> dict[str, Any]:
    """Figures of every run and paired differences of every other run against `baseline` (default: the first)."""
    if not runs:
        raise ClinqaError("no runs to compare")
    baseline = baseline or next(iter(runs))
    if baseline not in runs:
        raise ClinqaError(f"--baseline {baseline!r} is not one of the runs: {', '.join(runs)}")
    return {
        "baseline": baseline,
        "runs": {name: run_figures(samples) for name, samples in runs.items()},
        "vs_baseline": {name: paired(runs[baseline], s) for name, s in runs.items() if name != baseline},
    }


def _ci(d: Mapping[str, Any], sign: str = "") -> str:
    v = d.get("mean", d.get("difference"))
    lo, hi = d["ci95"]
    if v is None:
        return "—"
    return f"{v:{sign}.3f} ({lo:{sign}.3f} to {hi:{sign}.3f})"


def to_markdown(result: Mapping[str, Any]) -> str:
    """The comparison as two markdown tables: figures per run, and differences against the baseline."""
    runs, base = result["runs"], result["baseline"]
    cols = [("stage1_micro_f1", "stage-1 micro F1")] + list(METRICS)
    lines = [
        "Per run: mean (95% bootstrap CI over questions); n per metric in brackets where it differs from the run's n.",
        "",
        "| run | n | " + " | ".join(label for _, label in cols) + " | s / question |",
        "|---|---:|" + "---:|" * (len(cols) + 1),
    ]
    for name, fig in runs.items():
        cells = []
        for key, _ in cols:
            d = fig[key]
            cells.append(_ci(d) + ("" if d["n"] == fig["n"] else f" [{d['n']}]"))
        lines.append(f"| {name} | {fig['n']} | " + " | ".join(cells) + f" | {fig['seconds_per_question']:.1f} |")
    if result["vs_baseline"]:
        lines += [
            "",
            f"Against {base}, on the same questions: mean difference (run − {base}), 95% paired bootstrap CI, p "
            "(false abstention: lower is better).",
            "",
            "| run | " + " | ".join(label for _, label in cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for name, diffs in result["vs_baseline"].items():
            cells = []
            for key, _ in cols:
                d = diffs[key]
                cells.append("—" if d["difference"] is None else f"{_ci(d, sign='+')} p={d['p']:.3f} [{d['n']}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["METRICS", "compare_runs", "paired", "per_question", "run_figures", "to_markdown"]
