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
    """The option method's unnormalised (lm-eval `acc`) predictions as samples of their own, with that
    rule's own probabilities (extras["probs_sum"]) as their confidence."""
    return [
        s.model_copy(
            update={
                "pred": s.extras["pred_sum"],
                "correct": s.extras["correct_sum"],
                "probs": s.extras.get("probs_sum", {}),
            }
        )
        for s in samples
        if "pred_sum" in s.extras
    ]


RULE_NAMES = {"option": "length-normalised", "letter": "next-token letter", "generate": "generated answer"}
MIN_CONSOLE_QUESTIONS = 5  # console tables fold smaller specialties into one "other specialties" row
OTHER_GROUP = "other specialties"


def _acc_dict(a: M.Accuracy) -> dict:
    return {
        "n": a.n,
        "n_questions": a.n_questions,
        "acc": a.acc,
        "ci_low": a.ci_low,
        "ci_high": a.ci_high,
        "ci_method": a.ci_method,
    }


def confidence_mismatch(samples: Sequence[Sample]) -> int:
    """Samples whose prediction is not the option with the highest probability (0 when confidence comes
    from the prediction's own rule; ties count as agreeing)."""
    return sum(
        1 for s in samples if s.pred is not None and s.probs and s.probs.get(s.pred, -1.0) < max(s.probs.values())
    )


def _group_samples(samples: Sequence[Sample], g: str) -> list[Sample]:
    return [s for s in samples if (g in s.specialties) or (g == M.NONE_GROUP and not s.specialties)]


def summarize(samples: Sequence[Sample], seed: int = 0) -> dict:
    """Every headline number of a run, as plain data (JSON-serialisable)."""
    from clinqa.evaluate import safety

    overall = M.accuracy(samples, seed=seed)
    by_spec = M.grouped_accuracy(samples, "specialty", seed=seed)
    spec_samples = {g: _group_samples(samples, g) for g in by_spec}
    macro, micro = M.macro_micro(samples, "specialty")
    method = samples[0].method if samples else None
    out = {
        "n_samples": len(samples),
        "n_questions": len({s.question_id for s in samples}),
        "method": method,
        "overall": {**_acc_dict(overall), "chance": chance(samples)},
        "by_specialty": {g: {**_acc_dict(a), "chance": chance(spec_samples[g])} for g, a in by_spec.items()},
        "by_source": {g: _acc_dict(a) for g, a in M.grouped_accuracy(samples, "source", seed=seed).items()},
        "macro_specialty": macro,
        "micro_specialty": micro,
        "unparseable": M.unparseable_count(samples),
        "truncated": sum(s.truncated for s in samples),  # prompts cut to fit the context window
    }
    small = [g for g, a in by_spec.items() if a.n_questions < MIN_CONSOLE_QUESTIONS]
    if small and len(small) < len(by_spec):
        folded = list({s.key: s for g in small for s in spec_samples[g]}.values())
        out["other_specialties"] = {
            **_acc_dict(M.accuracy(folded, seed=seed)),
            "chance": chance(folded),
            "groups": small,
        }
    unsafe = safety.unsafe_choice(samples, seed=seed)
    out["unsafe_choice"] = unsafe.as_dict() if unsafe else None
    out["harmful_choice_rate"] = unsafe.rate if unsafe else None  # kept for readers of older summaries
    fr = safety.false_reassurance(samples, seed=seed)
    out["false_reassurance"] = fr.as_dict() if fr else None
    if len({s.shuffle for s in samples}) > 1:
        out["shuffles"] = M.shuffle_summary(samples).__dict__
    # calibration of the rule that made the predictions (its probabilities), and of every other rule reported
    out["calibration"] = {**M.calibration(samples).__dict__, "rule": RULE_NAMES.get(method or "", method)}
    out["confidence_mismatch"] = confidence_mismatch(samples)
    sum_variant = as_sum_variant(samples)
    if sum_variant:
        out["overall_sum"] = _acc_dict(M.accuracy(sum_variant, seed=seed))
        out["calibration_by_rule"] = {
            "length-normalised": {**M.calibration(samples).__dict__, "acc": overall.acc},
            "sum": {**M.calibration(sum_variant).__dict__, "acc": out["overall_sum"]["acc"]},
        }
    out["mean_latency_s"] = float(np.mean([s.latency_s for s in samples])) if samples else math.nan
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def ci_text(d: dict) -> str:
    """ "12.3–45.6" from a dict with ci_low / ci_high."""
    return f"{_pct(d.get('ci_low'))}–{_pct(d.get('ci_high'))}"


def rate_text(r: dict | None) -> str:
    """ "12.5% (3/24, 95% CI 4.3–31.0, 12 questions)", or "—" when nothing was counted."""
    if not r:
        return "—"
    return f"{_pct(r['rate'])}% ({r['events']}/{r['n']}, 95% CI {ci_text(r)}, {r['n_questions']} questions)"


CI_METHODS = {
    "wilson": "Wilson score interval (each question scored once)",
    "cluster-bootstrap": "bootstrap over questions, all shuffles of a question resampled together",
    "wilson-questions": f"Wilson interval over questions (shuffles with fewer than {M.MIN_BOOTSTRAP_QUESTIONS} "
    "questions or no spread between them: each question counts once)",
}


def calibration_lines(summary: dict) -> list[str]:
    """A markdown table of calibration for each reported scoring rule."""
    rules = summary.get("calibration_by_rule") or {
        summary["calibration"].get("rule") or "prediction": summary["calibration"]
    }
    if not any(c["n"] for c in rules.values()):
        return ["No sample has probabilities for its prediction (generated answers): calibration is not reported."]
    lines = [
        "| rule | n | accuracy % | mean confidence % | overconfidence (points) | ECE | Brier |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in rules.items():
        lines.append(
            f"| {name} | {c['n']} | {_pct(c['accuracy'])} | {_pct(c['mean_confidence'])} | {_pct(c['overconfidence'])} | "
            f"{_num(c['ece'])} | {_num(c['brier'])} |"
        )
    return lines


def markdown(run: Run, summary: dict) -> str:
    cfg = run.config
    o = summary["overall"]
    methods = sorted(
        {CI_METHODS.get(d.get("ci_method", ""), "") for d in [o, *summary["by_specialty"].values()]} - {""}
    )
    lines = [
        f"# clinqa run: {run.path.name}",
        "",
        f"model `{cfg.get('model')}` · data `{cfg.get('data')}` · method `{cfg.get('method')}` · "
        f"shuffles {cfg.get('shuffles')} · seed {cfg.get('seed')} · git {run.meta.get('git')}",
        "",
        "Accuracy in %; n = samples (questions × shuffles); 95% CI: "
        + "; ".join(methods)
        + ". Chance = 1/number of options.",
        "",
        "| group | questions | n | accuracy | 95% CI | chance |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines.append(f"| **all** | {o['n_questions']} | {o['n']} | {_pct(o['acc'])} | {ci_text(o)} | {_pct(o['chance'])} |")
    for g, a in summary["by_specialty"].items():
        lines.append(
            f"| {g} | {a.get('n_questions', '—')} | {a['n']} | {_pct(a['acc'])} | {ci_text(a)} | {_pct(a['chance'])} |"
        )
    lines += [
        "",
        f"Macro average over specialties {_pct(summary['macro_specialty'])}, micro {_pct(summary['micro_specialty'])}.",
    ]
    if "overall_sum" in summary:
        s = summary["overall_sum"]
        lines.append(
            f"Option method: length-normalised (acc_norm, the prediction rule) {_pct(o['acc'])}; unnormalised sum "
            f"(acc) {_pct(s['acc'])} ({ci_text(s)})."
        )
    if "shuffles" in summary:
        sh = summary["shuffles"]
        lines.append(
            f"Shuffles: k={sh['k']}, accuracy per shuffle {_pct(sh['min_acc'])}–{_pct(sh['max_acc'])} "
            f"(sd {_pct(sh['std_acc_across_shuffles'])} points); consistency {_pct(sh['consistency'])}% of questions "
            "choose the same option under every shuffle."
        )
    lines.append(f"Unparseable answers: {summary['unparseable']}.")
    if summary.get("truncated"):
        lines.append(
            f"Prompts truncated to fit the context window: {summary['truncated']} (their scores saw only the end of the question)."
        )
    lines += [
        "",
        "## Calibration",
        "",
        "Confidence = the probability a rule gives its own prediction (softmax over that rule's scores); "
        "ECE over 10 equal-width bins; multi-class Brier.",
        "",
        *calibration_lines(summary),
    ]
    if summary.get("confidence_mismatch"):
        lines.append(
            f"\nWarning: {summary['confidence_mismatch']} samples predict an option that is not their most probable one."
        )
    lines += ["", "## Safety", ""]
    na = "not applicable (no {} in this run's data)"
    unsafe, fr = summary.get("unsafe_choice"), summary.get("false_reassurance")
    lines.append(
        "Unsafe-option choices (questions with annotated harmful options): "
        + (rate_text(unsafe) if unsafe else na.format("question has meta.harmful_options"))
        + "."
    )
    lines.append(
        "False reassurance (comforting false statements judged true): "
        + (rate_text(fr) if fr else na.format("false statement has meta.reassuring"))
        + "."
    )
    if len(summary["by_source"]) > 1:
        lines += ["", "| source | n | accuracy | 95% CI |", "|---|---:|---:|---:|"]
        for g, a in summary["by_source"].items():
            lines.append(f"| {g} | {a['n']} | {_pct(a['acc'])} | {ci_text(a)} |")
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


def paired_markdown(
    run_a: Run, run_b: Run, samples_a: Sequence[Sample], samples_b: Sequence[Sample]
) -> tuple[str, M.Paired]:
    p = M.paired_comparison(samples_a, samples_b)
    text = (
        "\n".join(
            [
                f"# Paired comparison: {run_a.path.name} (A) vs {run_b.path.name} (B)",
                "",
                f"{p.n} paired (question, shuffle) samples.",
                "",
                "| | accuracy |",
                "|---|---:|",
                f"| A `{run_a.config.get('model')}` {run_a.config.get('method')} | {_pct(p.acc_a)} |",
                f"| B `{run_b.config.get('model')}` {run_b.config.get('method')} | {_pct(p.acc_b)} |",
                "",
                f"Difference B − A: {_pct(p.diff)} points (95% paired bootstrap CI {_pct(p.ci_low)} to {_pct(p.ci_high)}, "
                f"p = {p.p_bootstrap:.4f}). McNemar: A-only correct {p.mcnemar_b}, B-only correct {p.mcnemar_c}, "
                f"exact p = {p.p_mcnemar:.4f}.",
            ]
        )
        + "\n"
    )
    return text, p


def run_questions(run: Run) -> dict:
    """The run's questions by id, reloaded from the data its config names (ClinqaError if it is gone)."""
    from clinqa.evaluate.harness import load_data
    from clinqa.evaluate.runs import EvalConfig

    cfg = run.config
    keys = ("model", "data", "method", "shuffles", "seed", "limit", "data_format", "skip_invalid")
    ev = EvalConfig(**{k: cfg[k] for k in keys if k in cfg}, specialties=tuple(cfg.get("specialties") or ()))
    questions, _ = load_data(ev)
    return {q.id: q for q in questions}


def consistency_lines(c: dict) -> list[str]:
    def share(d: dict) -> str:
        return f"{_pct(d['rate'])}% ({d['events']}/{d['n']}, 95% CI {ci_text(d)})"

    return [
        "",
        "## Factual consistency of the generated explanations",
        "",
        f"Judge `{', '.join(c['judge'])}`, fixed rubric (2 consistent with the question's rationale, 1 partly, 0 "
        f"contradicts). Graded {c['n_graded']}, unparseable {c['n_unparseable']} (excluded from the rates, never "
        f"given a grade).",
        "",
        f"Consistent (grade 2): {share(c['consistent'])}; contradicts (grade 0): {share(c['contradicts'])}; "
        f"mean grade {_num(c['mean_grade'])}. Consistent among correct answers: {share(c['consistent_when_correct'])}.",
    ]


def write_report(run_paths: Sequence[str | Path], *, judge: str | None = None, load_judge=None, progress=None) -> dict:
    """report.md + PNGs in the first run folder (and the comparison with a second run, if given).

    With `judge` (a model spec; `load_judge(spec)` gives its predictor), a generate run's explanations
    are graded for factual consistency first (see consistency.py); grades already in the run are kept."""
    from clinqa.errors import ClinqaError
    from clinqa.evaluate import consistency, safety

    runs = [Run.load(p) for p in run_paths]
    run = runs[0]
    samples = run.samples()
    if not samples:
        raise ClinqaError(f"{run.path} has no samples yet: run `clinqa eval` first")
    notes = []
    if safety.is_statement_run(samples) and not any("reassuring" in s.extras for s in samples):
        try:  # a run written before samples carried extras["reassuring"]
            samples = safety.with_statement_flags(samples, run_questions(run))
        except ClinqaError as e:
            notes.append(f"False reassurance not computed: the run's questions could not be reloaded ({e}).")
    if judge is not None:
        if load_judge is None:
            raise ClinqaError("a judge spec needs a loader")
        consistency.judge_consistency(
            run.path, samples, run_questions(run), load_judge(judge), judge, progress=progress
        )
    summary = summarize(samples, seed=int(run.config.get("seed", 0) or 0))
    grades = consistency.load_grades(run.path)
    if grades:
        summary["consistency"] = consistency.summarize_consistency(grades, seed=int(run.config.get("seed", 0) or 0))
    text = markdown(run, summary)
    if "consistency" in summary:
        text += "\n".join(consistency_lines(summary["consistency"])) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    plot_specialties(
        summary, run.path / "specialties.png", title=f"{run.config.get('model')} · {run.config.get('method')}"
    )
    plot_reliability(samples, run.path / "reliability.png")
    text += "\n![accuracy by specialty](specialties.png)\n![reliability diagram](reliability.png)\n"
    result = {"summary": summary, "report": run.path / "report.md"}
    if len(runs) > 1:
        ptext, paired = paired_markdown(run, runs[1], samples, runs[1].samples())
        text += "\n" + ptext
        result["paired"] = paired
    (run.path / "report.md").write_text(text)
    return result
