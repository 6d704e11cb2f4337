"""`clinqa eval`, `report` and `compare`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from clinqa.cli.app import app
from clinqa.cli.common import (
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    _at_least,
    _pct,
    _writable_out,
    console,
    err,
    load_predictor,
    print_summary,
    progress_bar,
)
from clinqa.errors import ClinqaError
from clinqa.textsafe import plain, safe


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(
        ...,
        help="model spec: default, a folder or HF id, a .gguf file, or openai:URL#MODEL, with +lora:/+steer:/+rag: modifiers",
    ),
    data: str = typer.Argument(
        ...,
        help="questions: bundled, bundled:control, or a file/folder (MedQA, MedMCQA, MMLU, PubMedQA, MIRAGE, JSONL/CSV/Parquet)",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="run folder (re-running the same command resumes)"),
    method: str = typer.Option("option", help="letter | option | generate"),
    shuffles: int = typer.Option(1, help="seeded option permutations per question (S-MedQA uses 5)"),
    limit: Optional[int] = typer.Option(None, help="only the first N questions"),
    specialty: list[str] = typer.Option([], "--specialty", help="keep only questions of this specialty (repeatable)"),
    seed: int = typer.Option(0),
    data_format: Optional[str] = typer.Option(None, "--format", help="force a data format instead of auto-detecting"),
    skip_invalid: bool = typer.Option(
        False, "--skip-invalid", help="skip malformed rows (counted) instead of stopping"
    ),
    batch_size: int = typer.Option(16, help="questions per batch; samples are saved after every batch"),
    max_new_tokens: int = typer.Option(128, help="generate method: token budget"),
    alpha: Optional[float] = typer.Option(
        None, help="steering strength for +steer: models (overrides the spec's @alpha)"
    ),
    matcher: str = typer.Option(
        "regex",
        help="generate method: how an answer is mapped to an option: regex | minilm | loglik (docs/protocols.md)",
    ),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Evaluate a model on multiple-choice questions; writes run.json + samples.jsonl to --out."""
    from clinqa.evaluate import EvalConfig, evaluate, load_data
    from clinqa.evaluate.report import summarize

    _at_least("--batch-size", batch_size)
    _at_least("--shuffles", shuffles)
    _at_least("--limit", limit)
    _at_least("--max-new-tokens", max_new_tokens)
    _writable_out(out)
    if alpha is not None:
        model = _with_alpha(model, alpha)
    config = EvalConfig(
        model=model,
        data=data,
        method=method,
        shuffles=shuffles,
        seed=seed,
        limit=limit,
        specialties=tuple(specialty),
        data_format=data_format,
        skip_invalid=skip_invalid,
        max_new_tokens=max_new_tokens,
        extra=_matcher_extra(matcher, method),
    )
    questions, skipped = load_data(config)
    if skipped:
        err.print(f"[yellow]skipped {skipped} invalid rows[/yellow]")
    from clinqa.evaluate.shuffle import too_many_shuffles

    if note := too_many_shuffles(questions, shuffles):
        err.print(f"[yellow]note:[/yellow] {note}", markup=True, highlight=False)
    from clinqa.runs import lock_path

    with lock_path(out, folder=True):  # a second writer is refused before it loads a model
        predictor = load_predictor(model)
        with progress_bar(f"{method} · {len(questions)} questions × {shuffles}") as update:
            run = evaluate(predictor, questions, config, out, batch_size=batch_size, progress=update, skipped=skipped)
    summary = summarize(run.samples(), seed=seed)
    print_summary(summary, f"{model} · {data} · method={method} · shuffles={shuffles}")
    console.print(f"run saved in [bold]{safe(out)}[/bold] · `clinqa report {safe(out)}` writes report.md and plots")


def _matcher_extra(matcher: str, method: str) -> dict:
    """EvalConfig.extra for --matcher: empty for the default, so older runs keep their identity."""
    from clinqa.evaluate.matcher import MatcherConfig

    MatcherConfig(matcher)  # an unknown name is a one-line error
    if matcher != "regex" and method != "generate":
        raise ClinqaError(f"--matcher {matcher} maps generated answers: use it with --method generate")
    return {} if matcher == "regex" else {"matcher": matcher}


def _with_alpha(model: str, alpha: float) -> str:
    from clinqa.models.spec import ModelSpec, Modifier, parse_spec

    ms = parse_spec(model)
    if not any(m.kind == "steer" for m in ms.modifiers):
        raise ClinqaError("--alpha applies to a +steer: model spec, e.g. default+steer:vectors/NAME")
    mods = tuple(
        Modifier(m.kind, m.target, {**m.params, "alpha": str(alpha)}) if m.kind == "steer" else m for m in ms.modifiers
    )
    return str(ModelSpec(ms.kind, ms.target, ms.model_name, mods))


@app.command("report")
def report_cmd(
    run: Path = typer.Argument(..., help="run folder"),
    other: Optional[Path] = typer.Argument(None, help="a second run on the same questions: adds a paired comparison"),
    judge: Optional[str] = typer.Option(
        None,
        "--judge",
        help="generate runs: grade each explanation's factual consistency "
        "with the question's rationale by this judge model spec (saved in consistency.jsonl)",
    ),
) -> None:
    """Write report.md and PNG plots (per-specialty accuracy, reliability diagram) into a run folder."""
    from clinqa.evaluate.report import write_report

    if judge is not None:
        with progress_bar(f"judging consistency · {judge}") as update:
            result = write_report(
                [run] + ([other] if other else []), judge=judge, load_judge=load_predictor, progress=update
            )
    else:
        result = write_report([run] + ([other] if other else []))
    print_summary(result["summary"], f"{run}")
    if "paired" in result:
        p = result["paired"]
        console.print(
            f"paired vs {safe(other)}: B−A {_pct(p.diff)} points (95% CI {_pct(p.ci_low)} to {_pct(p.ci_high)}), "
            f"bootstrap p={p.p_bootstrap:.4f}, McNemar p={p.p_mcnemar:.4f}"
        )
    console.print(f"wrote {safe(result['report'])}")


@app.command("compare")
def compare_cmd(
    model: str = typer.Argument(..., help="base model spec"),
    data: str = typer.Argument(..., help="questions (bundled, a file, ...)"),
    methods: str = typer.Option(
        "base,prompt:expert,prompt:fewshot@k=3",
        help="comma-separated: base, prompt:NAME, lora:DIR, steer:DIR, rag:INDEX",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="experiment folder (one run per method; resumable)"),
    method: str = typer.Option("option", help="scoring method for every adaptation method: letter | option | generate"),
    shuffles: int = typer.Option(1),
    limit: Optional[int] = typer.Option(None),
    specialty: list[str] = typer.Option([], "--specialty"),
    seed: int = typer.Option(0),
    part: Optional[str] = typer.Option(
        None,
        "--part",
        help="only part K/N of the questions (every N-th per specialty), e.g. 1/2 "
        "when vectors/adapters were built on 0/2",
    ),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Run every adaptation method on the same questions and shuffles: one table with CIs, paired tests and cost."""
    from clinqa.evaluate import EvalConfig, load_data
    from clinqa.experiments.compare import CompareConfig, compare

    _at_least("--shuffles", shuffles)
    _at_least("--limit", limit)
    _writable_out(out)
    # a method list may contain '@a=1,b=2' parameters: split on commas that start a new method
    names = [m for m in re.split(r",(?=\s*(?:base|prompt:|lora:|steer:|rag:))", methods) if m.strip()]
    cfg = CompareConfig(
        model=model,
        data=data,
        methods=tuple(m.strip() for m in names),
        method=method,
        shuffles=shuffles,
        seed=seed,
        limit=limit,
        specialties=tuple(specialty),
        part=part,
    )
    questions, _ = load_data(EvalConfig(model=model, data=data, limit=limit, specialties=tuple(specialty)))
    with progress_bar("compare") as update:
        compare(cfg, questions, out, load=load_predictor, progress=lambda m, d, t: update(d, t, m))
    console.print(plain((out / "summary.md").read_text()), markup=False, highlight=False)
    console.print(f"wrote {safe(out)}/summary.md, summary.json and compare.png")
