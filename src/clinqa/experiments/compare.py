"""Every adaptation method side by side on the same questions and shuffles: which one should I use?

An experiment is a folder of ordinary runs (one per method) plus `summary.json`, `summary.md` and a
plot. Each run resumes like any other, so a killed comparison picks up where it stopped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate import metrics as M
from clinqa.evaluate.harness import evaluate
from clinqa.evaluate.report import summarize
from clinqa.evaluate.runs import EvalConfig, Run  # noqa: F401  (Run: kept importable from here)
from clinqa.evaluate.safety import paired_unsafe
from clinqa.models.base import ReportsCost
from clinqa.runs import atomic_write_text


@dataclass
class CompareConfig:
    model: str
    data: str
    methods: tuple[str, ...] = ("base",)
    method: str = "option"  # scoring method used for every adaptation method
    shuffles: int = 1
    seed: int = 0
    limit: int | None = None
    specialties: tuple[str, ...] = ()
    part: str | None = None  # "K/N": only that part of the questions (see question_part)
    extra: dict = field(default_factory=dict)


def question_part(questions: Sequence[Question], part: str | None) -> list[Question]:
    """Part K of N (`part="K/N"`, K in 0..N-1): every N-th question within each primary specialty.

    Parts are disjoint, stratified and fixed by the file order, so a vector, router or adapter built
    on `0/2` can be evaluated honestly on `1/2` of the same data."""
    if not part:
        return list(questions)
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", part)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ClinqaError(f"part {part!r}: use K/N with 0 <= K < N, e.g. 0/2 for one half and 1/2 for the other")
    k, n = int(m[1]), int(m[2])
    seen: dict[str, int] = {}
    out = []
    for q in questions:
        group = q.specialties[0] if q.specialties else ""
        if seen.get(group, 0) % n == k:
            out.append(q)
        seen[group] = seen.get(group, 0) + 1
    return out


def method_spec(model: str, method: str) -> str:
    """`base` is the model itself; anything else is appended as a spec modifier (prompt:cot, lora:DIR, ...)."""
    return model if method == "base" else f"{model}+{method}"


def slug(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", method).strip("_") or "base"


def cost_of(predictor) -> dict:
    """Extra parameters and training/build seconds a wrapped predictor reports (via `cost()`), else zeros."""
    return {"extra_params": 0, "training_s": 0.0, **(predictor.cost() if isinstance(predictor, ReportsCost) else {})}


def compare(
    config: CompareConfig,
    questions: Sequence[Question],
    out: str | Path,
    *,
    load: Callable[[str], object],
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    if "base" not in config.methods:
        raise ClinqaError("--methods must include 'base': every method is compared against it")
    questions = question_part(questions, config.part)
    if not questions:
        raise ClinqaError(f"no questions in part {config.part} of {config.data}")
    from clinqa.runs import lock_path

    with lock_path(out, folder=True):  # one writer per experiment folder (each run folder also locks itself)
        return _compare(config, questions, Path(out), load=load, progress=progress)


def _compare(
    config: CompareConfig,
    questions: Sequence[Question],
    out: Path,
    *,
    load: Callable[[str], object],
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    results: dict[str, dict] = {}
    samples_by_method = {}
    for method in config.methods:
        spec = method_spec(config.model, method)
        predictor = load(spec)
        ev = EvalConfig(
            model=spec,
            data=config.data,
            method=config.method,
            shuffles=config.shuffles,
            seed=config.seed,
            limit=config.limit,
            specialties=config.specialties,
            extra={"part": config.part} if config.part else {},
        )
        run = evaluate(
            predictor,
            questions,
            ev,
            out / slug(method),
            progress=(lambda d, t, m=method: progress(m, d, t)) if progress else None,
        )
        samples = run.samples()
        samples_by_method[method] = samples
        s = summarize(samples, seed=config.seed)
        n_q = max(s["n_questions"], 1)
        results[method] = {
            "spec": spec,
            "summary": s,
            **cost_of(predictor),
            "seconds_per_question": run.meta.get("compute_s", 0.0) / n_q / max(config.shuffles, 1),
        }
    for method in config.methods:
        if method == "base":
            continue
        p = M.paired_comparison(samples_by_method["base"], samples_by_method[method], seed=config.seed)
        results[method]["vs_base"] = p.__dict__
        unsafe = paired_unsafe(samples_by_method["base"], samples_by_method[method], seed=config.seed)
        if unsafe is not None:
            results[method]["vs_base_unsafe"] = unsafe.__dict__
    summary = {"config": config.__dict__, "methods": results}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    atomic_write_text(out / "summary.md", markdown(summary))
    plot(summary, out / "compare.png")
    return summary


def _pct(x) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def _rate_cell(r: dict | None) -> str:
    """ "12.5 (4.3–31.0; 3/24)" for a safety rate, "—" where nothing was annotated."""
    return "—" if not r else f"{_pct(r['rate'])} ({_pct(r['ci_low'])}–{_pct(r['ci_high'])}; {r['events']}/{r['n']})"


def markdown(summary: dict) -> str:
    methods = summary["methods"]
    specs = sorted({g for m in methods.values() for g in m["summary"]["by_specialty"]})
    head = (
        "| method | accuracy % (95% CI) | Δ vs base, points (95% CI; p) | ECE | unsafe choices % (95% CI; k/n) | "
        "false reassurance % (95% CI; k/n) | s/question | extra params | training s |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in methods.items():
        o = m["summary"]["overall"]
        vs = m.get("vs_base")
        delta = (
            f"{_pct(vs['diff'])} ({_pct(vs['ci_low'])} to {_pct(vs['ci_high'])}; p={vs['p_bootstrap']:.3f})"
            if vs
            else "—"
        )
        lines.append(
            f"| {name} | {_pct(o['acc'])} ({_pct(o['ci_low'])}–{_pct(o['ci_high'])}) | {delta} | "
            f"{m['summary']['calibration']['ece']:.3f} | {_rate_cell(m['summary'].get('unsafe_choice'))} | "
            f"{_rate_cell(m['summary'].get('false_reassurance'))} | "
            f"{m['seconds_per_question']:.3f} | {m['extra_params']:,} | {m['training_s']:.0f} |"
        )
    lines += [
        "",
        "Δ: paired bootstrap over questions (p two-sided, from the same bootstrap); McNemar in summary.json. "
        "Unsafe choices: options annotated harmful (meta.harmful_options); false reassurance: comforting false "
        "statements judged true. Intervals: Wilson, or a bootstrap over questions when there are shuffles.",
    ]
    unsafe = [(name, m["vs_base_unsafe"]) for name, m in methods.items() if m.get("vs_base_unsafe")]
    if unsafe:
        lines += [
            "",
            "| method | unsafe choices Δ vs base, points (95% CI; p) | became unsafe | no longer unsafe | "
            "McNemar p (exact) | n |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {_pct(v['diff'])} ({_pct(v['ci_low'])} to {_pct(v['ci_high'])}; p={v['p_bootstrap']:.3f}) | "
            f"{v['mcnemar_c']} | {v['mcnemar_b']} | {v['p_mcnemar']:.3f} | {v['n']} |"
            for name, v in unsafe
        ]
    lines += ["", "| specialty | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for g in specs:
        cells = [_pct(m["summary"]["by_specialty"].get(g, {}).get("acc")) for m in methods.values()]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["methods"])
    o = [summary["methods"][n]["summary"]["overall"] for n in names]
    acc = [x["acc"] for x in o]
    err = [[x["acc"] - x["ci_low"] for x in o], [x["ci_high"] - x["acc"] for x in o]]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4))
    ax.bar(range(len(names)), acc, yerr=err, capsize=4, color="#4C78A8")
    ax.axhline(o[0]["chance"], ls="--", color="#E45756", label="chance")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
