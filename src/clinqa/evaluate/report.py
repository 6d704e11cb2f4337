"""Reports from run folders: a summary dict, markdown tables and PNG plots, all from samples.jsonl."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from clinqa.evaluate import metrics as M
from clinqa.evaluate.runs import Run
from clinqa.evaluate.sample import Sample


def chance(samples: Sequence[Sample]) -> float:
    return float(np.mean([1.0 / len(s.options) for s in samples])) if samples else math.nan


def as_sum_variant(samples: Sequence[Sample]) -> list[Sample]:
    """The option method's unnormalised (lm-eval `acc`) predictions as samples of their own."""
    return [s.model_copy(update={"pred": s.extras["pred_sum"], "correct": s.extras["correct_sum"]})
            for s in samples if "pred_sum" in s.extras]


def _acc_dict(a: M.Accuracy) -> dict:
    return {"n": a.n, "acc": a.acc, "ci_low": a.ci_low, "ci_high": a.ci_high}


def summarize(samples: Sequence[Sample], seed: int = 0) -> dict:
    """Every headline number of a run, as plain data (JSON-serialisable)."""
    overall = M.accuracy(samples, seed=seed)
    by_spec = M.grouped_accuracy(samples, "specialty", seed=seed)
    spec_samples = {g: [s for s in samples if (g in s.specialties) or (g == M.NONE_GROUP and not s.specialties)] for g in by_spec}
    macro, micro = M.macro_micro(samples, "specialty")
    out = {
        "n_samples": len(samples),
        "n_questions": len({s.question_id for s in samples}),
        "method": samples[0].method if samples else None,
        "overall": {**_acc_dict(overall), "chance": chance(samples)},
        "by_specialty": {g: {**_acc_dict(a), "chance": chance(spec_samples[g])} for g, a in by_spec.items()},
        "by_source": {g: _acc_dict(a) for g, a in M.grouped_accuracy(samples, "source", seed=seed).items()},
        "macro_specialty": macro,
        "micro_specialty": micro,
        "unparseable": M.unparseable_count(samples),
        "truncated": sum(s.truncated for s in samples),  # prompts cut to fit the context window
        "harmful_choice_rate": M.harmful_choice_rate(samples),
    }
    if len({s.shuffle for s in samples}) > 1:
        out["shuffles"] = M.shuffle_summary(samples).__dict__
    cal = M.calibration(samples)
    out["calibration"] = cal.__dict__
    sum_variant = as_sum_variant(samples)
    if sum_variant:
        out["overall_sum"] = _acc_dict(M.accuracy(sum_variant, seed=seed))
    out["mean_latency_s"] = float(np.mean([s.latency_s for s in samples])) if samples else math.nan
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown(run: Run, summary: dict) -> str:
    cfg = run.config
    lines = [f"# clinqa run: {run.path.name}", "",
             f"model `{cfg.get('model')}` · data `{cfg.get('data')}` · method `{cfg.get('method')}` · "
             f"shuffles {cfg.get('shuffles')} · seed {cfg.get('seed')} · git {run.meta.get('git')}", "",
             "Accuracy in %, 95% bootstrap CI over questions; chance = 1/number of options.", "",
             "| group | n | accuracy | 95% CI | chance |", "|---|---:|---:|---:|---:|"]
    o = summary["overall"]
    lines.append(f"| **all** | {o['n']} | {_pct(o['acc'])} | {_pct(o['ci_low'])}–{_pct(o['ci_high'])} | {_pct(o['chance'])} |")
    for g, a in summary["by_specialty"].items():
        lines.append(f"| {g} | {a['n']} | {_pct(a['acc'])} | {_pct(a['ci_low'])}–{_pct(a['ci_high'])} | {_pct(a['chance'])} |")
    lines += ["", f"Macro average over specialties {_pct(summary['macro_specialty'])}, micro {_pct(summary['micro_specialty'])}."]
    if "overall_sum" in summary:
        s = summary["overall_sum"]
        lines.append(f"Option method: length-normalised (acc_norm) {_pct(o['acc'])}; unnormalised sum (acc) {_pct(s['acc'])} "
                     f"({_pct(s['ci_low'])}–{_pct(s['ci_high'])}).")
    if "shuffles" in summary:
        sh = summary["shuffles"]
        lines.append(f"Shuffles: k={sh['k']}, accuracy per shuffle {_pct(sh['min_acc'])}–{_pct(sh['max_acc'])} "
                     f"(sd {_pct(sh['std_acc_across_shuffles'])} points); consistency {_pct(sh['consistency'])}% of questions "
                     "choose the same option under every shuffle.")
    c = summary["calibration"]
    lines.append(f"Calibration: ECE {c['ece']:.3f}, Brier {c['brier']:.3f}, mean confidence {_pct(c['mean_confidence'])} "
                 f"vs accuracy {_pct(c['accuracy'])} (overconfidence {_pct(c['overconfidence'])} points; n={c['n']}).")
    lines.append(f"Unparseable answers: {summary['unparseable']}.")
    if summary.get("truncated"):
        lines.append(f"Prompts truncated to fit the context window: {summary['truncated']} (their scores saw only the end of the question).")
    if summary["harmful_choice_rate"] is not None:
        lines.append(f"Unsafe-option choice rate (questions with a harmful option): {_pct(summary['harmful_choice_rate'])}%.")
    if len(summary["by_source"]) > 1:
        lines += ["", "| source | n | accuracy | 95% CI |", "|---|---:|---:|---:|"]
        for g, a in summary["by_source"].items():
            lines.append(f"| {g} | {a['n']} | {_pct(a['acc'])} | {_pct(a['ci_low'])}–{_pct(a['ci_high'])} |")
    return "\n".join(lines) + "\n"


def plot_specialties(summary: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary["by_specialty"])
    acc = np.array([summary["by_specialty"][g]["acc"] for g in groups])
    lo = np.array([summary["by_specialty"][g]["ci_low"] for g in groups])
    hi = np.array([summary["by_specialty"][g]["ci_high"] for g in groups])
    ch = [summary["by_specialty"][g]["chance"] for g in groups]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) + 2), 4))
    x = np.arange(len(groups))
    ax.bar(x, acc, yerr=[acc - lo, hi - acc], capsize=4, color="#4C78A8")
    ax.scatter(x, ch, marker="_", s=600, color="#E45756", label="chance", zorder=3)
    ax.set_xticks(x, [g.replace("_", " ") for g in groups], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_title(title or "accuracy by specialty")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(samples: Sequence[Sample], path: Path, n_bins: int = 10) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [s for s in samples if s.confidence is not None]
    bins = M.reliability_bins([s.confidence for s in usable], [s.correct for s in usable], n_bins)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    xs = [b.mean_conf for b in bins if b.count]
    ys = [b.acc for b in bins if b.count]
    ax.plot(xs, ys, "o-", color="#4C78A8", label="model")
    for b in bins:
        if b.count:
            ax.annotate(str(b.count), (b.mean_conf, b.acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title("reliability diagram")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def paired_markdown(run_a: Run, run_b: Run, samples_a: Sequence[Sample], samples_b: Sequence[Sample]) -> tuple[str, M.Paired]:
    p = M.paired_comparison(samples_a, samples_b)
    text = "\n".join([
        f"# Paired comparison: {run_a.path.name} (A) vs {run_b.path.name} (B)", "",
        f"{p.n} paired (question, shuffle) samples.", "",
        "| | accuracy |", "|---|---:|",
        f"| A `{run_a.config.get('model')}` {run_a.config.get('method')} | {_pct(p.acc_a)} |",
        f"| B `{run_b.config.get('model')}` {run_b.config.get('method')} | {_pct(p.acc_b)} |", "",
        f"Difference B − A: {_pct(p.diff)} points (95% paired bootstrap CI {_pct(p.ci_low)} to {_pct(p.ci_high)}, "
        f"p = {p.p_bootstrap:.4f}). McNemar: A-only correct {p.mcnemar_b}, B-only correct {p.mcnemar_c}, "
        f"exact p = {p.p_mcnemar:.4f}.",
    ]) + "\n"
    return text, p


def write_report(run_paths: Sequence[str | Path]) -> dict:
    """report.md + PNGs in the first run folder (and the comparison with a second run, if given)."""
    runs = [Run.load(p) for p in run_paths]
    run = runs[0]
    samples = run.samples()
    if not samples:
        from clinqa.errors import ClinqaError

        raise ClinqaError(f"{run.path} has no samples yet: run `clinqa eval` first")
    summary = summarize(samples, seed=int(run.config.get("seed", 0) or 0))
    text = markdown(run, summary)
    plot_specialties(summary, run.path / "specialties.png", title=f"{run.config.get('model')} · {run.config.get('method')}")
    plot_reliability(samples, run.path / "reliability.png")
    text += "\n![accuracy by specialty](specialties.png)\n![reliability diagram](reliability.png)\n"
    result = {"summary": summary, "report": run.path / "report.md"}
    if len(runs) > 1:
        ptext, paired = paired_markdown(run, runs[1], samples, runs[1].samples())
        text += "\n" + ptext
        result["paired"] = paired
    (run.path / "report.md").write_text(text)
    return result
