"""The `clinqa` command: thin typer wrappers that parse, call one library function, print with rich."""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from clinqa.errors import ClinqaError
from clinqa.textsafe import plain, safe

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="clinqa: clinical question answering with language models, run privately.",
)


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's wrapping; a file or pipe gets whole lines (no wrap at 80 columns), so
    what a script greps for never depends on the terminal's width or the length of a path."""
    c = Console(stderr=stderr)
    if c.is_terminal:
        return c
    return Console(stderr=stderr, soft_wrap=True, width=max(c.width, 240))


console = _console()
err = _console(stderr=True)


@contextmanager
def progress_bar(description: str) -> Iterator:
    """A rich progress bar; yields a callback(done, total) for long jobs."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    ) as prog:
        task = prog.add_task(safe(description), total=None, extra="")

        def update(done: int, total: int, extra: str = "") -> None:
            prog.update(task, completed=done, total=total, extra=safe(extra))

        yield update


def _at_least(option: str, value: int | None, minimum: int = 1) -> None:
    """Refuse a number below `minimum` up front, as a one-line error (None: not given)."""
    if value is not None and value < minimum:
        raise ClinqaError(f"{option} must be at least {minimum}, got {value}")


def _writable_out(out: Path, folder: bool = True) -> None:
    from clinqa.runs import check_writable

    check_writable(out, folder=folder)


def _runtime_option(field: str):
    """Callback of --device/--dtype/--device-map: sets the process-wide runtime model loading reads
    (clinqa.models.runtime); the combination is checked before the first model loads."""

    def callback(value: Optional[str]) -> Optional[str]:
        from clinqa.models.runtime import update_runtime

        update_runtime(**{field: value})
        return value

    return callback


DeviceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--device",
        callback=_runtime_option("device"),
        show_default=False,
        help="auto | cpu | cuda | cuda:N | mps (env CLINQA_DEVICE; auto: CUDA, then MPS, then CPU)",
    ),
]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dtype",
        callback=_runtime_option("dtype"),
        show_default=False,
        help="auto | float32 | bfloat16 | float16 (env CLINQA_DTYPE; auto: bf16 on a GPU, fp32 on the CPU)",
    ),
]
DeviceMapOpt = Annotated[
    Optional[str],
    typer.Option(
        "--device-map",
        callback=_runtime_option("device_map"),
        show_default=False,
        help="auto: spread a model larger than one GPU over all GPUs (accelerate; env CLINQA_DEVICE_MAP)",
    ),
]


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def load_predictor(spec: str):
    """Resolve a model spec (base model plus any +modifiers) into a Predictor."""
    _quiet_transformers()
    from clinqa.adapt import load_predictor as _load

    with err.status(f"loading model {safe(spec)} ..."):
        return _load(spec)


def _pct(x) -> str:
    import math

    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def print_summary(summary: dict, title: str) -> None:
    """The console table: specialties with fewer than 5 questions fold into one "other specialties" row
    (report.md keeps every row), then one line per note, so no figure is split from its label."""
    from clinqa.evaluate.report import MIN_CONSOLE_QUESTIONS, OTHER_GROUP, rate_text

    console.print(plain(title), markup=False, highlight=False)  # a whole line: a table title wraps at the table's width
    table = Table()
    for col, just in (
        ("specialty", "left"),
        ("questions", "right"),
        ("n", "right"),
        ("accuracy %", "right"),
        ("95% CI", "right"),
        ("chance %", "right"),
    ):
        table.add_column(col, justify=just)

    def row(name: str, a: dict, bold: bool = False) -> None:
        b = "[bold]" if bold else ""
        table.add_row(
            f"{b}{safe(name)}",
            str(a.get("n_questions", "—")),
            str(a["n"]),
            f"{b}{_pct(a['acc'])}",
            f"{_pct(a['ci_low'])}–{_pct(a['ci_high'])}",
            _pct(a["chance"]),
        )

    other = summary.get("other_specialties")
    folded = set(other["groups"]) if other else set()
    for g, a in summary["by_specialty"].items():
        if g not in folded:
            row(g, a)
    if other:
        row(f"{OTHER_GROUP} ({len(folded)}, <{MIN_CONSOLE_QUESTIONS} questions each)", other)
    row("all", summary["overall"], bold=True)
    console.print(table)
    notes = [f"macro {_pct(summary['macro_specialty'])} · micro {_pct(summary['micro_specialty'])}"]
    if "shuffles" in summary:
        sh = summary["shuffles"]
        notes.append(
            f"{sh['k']} shuffles: per-shuffle accuracy {_pct(sh['min_acc'])}–{_pct(sh['max_acc'])}, consistency {_pct(sh['consistency'])}%"
        )
    rules = summary.get("calibration_by_rule") or {
        summary["calibration"].get("rule") or "prediction": summary["calibration"]
    }
    for name, c in rules.items():
        if not c["n"]:  # no probabilities (generated answers): no calibration to show
            continue
        acc = f"accuracy {_pct(c['accuracy'])}% · " if len(rules) > 1 else ""
        notes.append(
            f"{name} rule: {acc}ECE {c['ece']:.3f} · Brier {c['brier']:.3f} · mean confidence {_pct(c['mean_confidence'])}%"
        )
    notes.append(f"unparseable {summary['unparseable']}")
    if summary.get("truncated"):
        notes.append(f"truncated {summary['truncated']} (prompts cut to fit the context window)")
    if summary.get("unsafe_choice"):
        notes.append(f"unsafe-option choices {rate_text(summary['unsafe_choice'])}")
    if summary.get("false_reassurance"):
        notes.append(f"false reassurance {rate_text(summary['false_reassurance'])}")
    if summary.get("consistency"):
        c = summary["consistency"]
        notes.append(
            f"explanations consistent with the rationale {rate_text(c['consistent'])}, unparseable grades {c['n_unparseable']}"
        )
    for line in notes:
        console.print(plain(line), markup=False, highlight=False)


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

    # a method list may contain '@a=1,b=2' parameters: split on commas that start a new method
    _at_least("--shuffles", shuffles)
    _at_least("--limit", limit)
    _writable_out(out)
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


analyze_app = typer.Typer(no_args_is_help=True, help="Analyses of what adaptation changed.")
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("token-shift")
def token_shift_cmd(
    base: str = typer.Argument(..., help="base model spec (a local model)"),
    adapted: str = typer.Argument(..., help="comma-separated LoRA adapter folders (include the control adapter)"),
    data: str = typer.Argument("bundled", help="clinical questions with specialty labels"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for token_shift.md/.json and the plot"),
    control: str = typer.Option("bundled:control", help="non-medical questions: their words are not clinical terms"),
    max_terms: int = typer.Option(40, help="clinical terms per specialty"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Mean log-probability of each specialty's clinical terms under the base model and each adapter."""
    import json as _json

    from clinqa.analysis.token_shift import clinical_terms, plot_shift, token_shift
    from clinqa.data.loaders import load_questions

    questions = load_questions(data).questions
    terms = clinical_terms(questions, load_questions(control).questions, max_terms=max_terms)
    predictor = load_predictor(base)
    if not hasattr(predictor, "load_adapter"):
        raise ClinqaError("token-shift needs a local base model (adapters are switched on one model object)")
    views = {Path(a).name: predictor.load_adapter(a) for a in adapted.split(",") if a}
    with progress_bar("token-shift models") as update:
        result = token_shift(predictor, views, questions, terms, progress=update)
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_shift.md").write_text(result.markdown())
    (out / "token_shift.json").write_text(
        _json.dumps(
            {
                "rows": [r.__dict__ for r in result.rows],
                "terms": result.terms,
                "contrasts": [c.__dict__ for c in result.contrasts],
            },
            indent=2,
        )
    )
    plot_shift(result, out / "token_shift.png")
    console.print(plain(result.markdown()), markup=False, highlight=False)


CHECKPOINTING_HELP = (
    "recompute activations in the backward pass: ~7x less peak memory for long examples, ~1.35x the time, same weights"
)


@app.command("finetune")
def finetune_cmd(
    model: str = typer.Argument(..., help="base model spec (a local model)"),
    data: str = typer.Argument("bundled", help="training questions"),
    out: Path = typer.Option(..., "--out", "-o", help="adapter folder (a killed run resumes from its checkpoint)"),
    specialty: list[str] = typer.Option([], "--specialty", help="train on this specialty's questions (repeatable)"),
    control: bool = typer.Option(
        False, "--control", help="train on the non-medical control set instead (bundled:control)"
    ),
    balance: bool = typer.Option(False, "--balance", help="subsample every specialty to the smallest one's size"),
    epochs: Optional[int] = typer.Option(None, help="at most this many epochs [default: 10]"),
    learning_rate: Optional[float] = typer.Option(
        None, "--lr", help="LoRA learning rate [default: 2e-4; s-medqa preset: 2e-5]"
    ),
    rank: int = typer.Option(32),
    alpha: float = typer.Option(16),
    dropout: float = typer.Option(0.1),
    batch_size: int = typer.Option(8),
    patience: Optional[int] = typer.Option(
        None, help="early stopping: epochs without a lower validation loss [default: 2]"
    ),
    prompt_format: str = typer.Option("cloze", help="cloze (matches --method option) or letter"),
    part: Optional[str] = typer.Option(
        None,
        "--part",
        help="train on part K/N of the questions only (every N-th per specialty): train on 0/2, compare on 1/2",
    ),
    seed: int = typer.Option(0),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help=CHECKPOINTING_HELP),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="s-medqa: the paper's lr 2e-5, up to 10 epochs, early stopping; explicit flags win"
    ),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """LoRA fine-tuning (loss on the answer only) on one specialty, several, or the control set."""
    from clinqa.adapt.lora import LoraTrainConfig, finetune
    from clinqa.data.loaders import load_questions
    from clinqa.experiments.compare import question_part
    from clinqa.experiments.presets import apply_preset
    from clinqa.specialties.taxonomy import resolve_specialty

    chosen = apply_preset(
        preset,
        {"epochs": epochs, "learning_rate": learning_rate, "patience": patience},
        {"epochs": 10, "learning_rate": 2e-4, "patience": 2},
    )
    epochs, learning_rate, patience = chosen["epochs"], chosen["learning_rate"], chosen["patience"]
    cfg = LoraTrainConfig(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        epochs=epochs,
        patience=patience,
        learning_rate=learning_rate,
        batch_size=batch_size,
        prompt_format=prompt_format,
        seed=seed,
        balance=balance,
        gradient_checkpointing=gradient_checkpointing,
    )
    if control:
        questions = load_questions("bundled:control" if data == "bundled" else data).questions
    elif specialty:
        specs = [resolve_specialty(s) for s in specialty]
        all_q = load_questions(data, specialties=specs).questions
        questions = {s: [q for q in all_q if q.specialties and q.specialties[0] == s] for s in specs}
    else:
        questions = load_questions(data).questions
    if part:
        questions = (
            {s: question_part(qs, part) for s, qs in questions.items()}
            if isinstance(questions, dict)
            else question_part(questions, part)
        )
    base = load_predictor(model)
    with progress_bar("finetune") as update:
        result = finetune(
            base,
            questions,
            cfg,
            out,
            metadata={"control": control, "data": data, "part": part, "preset": preset},
            progress=lambda step, total, loss: update(step, total, f"loss {loss:.3f}" if loss is not None else ""),
        )
    md = result.metadata
    if preset:
        console.print(f"preset {safe(preset)}: lr {learning_rate:g}, up to {epochs} epochs, patience {patience}")
    console.print(
        f"adapter in [bold]{safe(result.path)}[/bold] ({'already trained' if result.cached else 'trained'}) · best epoch "
        f"{md.get('best_epoch')} · {md.get('train_seconds', 0):.0f} s · use it as [bold]{safe(model)}{safe(result.spec_modifier)}[/bold]"
    )


experiment_app = typer.Typer(no_args_is_help=True, help="Experiments: folders of runs plus one summary table.")
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("cross-specialty")
def cross_specialty_cmd(
    model: str = typer.Argument(..., help="base model spec (a local model)"),
    data: str = typer.Argument("bundled"),
    specialties: str = typer.Option(
        "cardiology,gastroenterology,infectious_diseases,neurology,obstetrics_gynecology,pediatrics",
        help="comma-separated specialties (ids or aliases: cardio, gastro, ...)",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="experiment folder (adapters/, runs/, summary.md, matrix.png)"),
    control: str = typer.Option("bundled:control", help="non-medical questions for the control adapter ('' for none)"),
    test_fraction: float = typer.Option(0.3),
    epochs: Optional[int] = typer.Option(
        None, help="LoRA epochs per adapter [default: 3; s-medqa preset: up to 10, early stopping]"
    ),
    learning_rate: Optional[float] = typer.Option(
        None, "--lr", help="LoRA learning rate [default: LoraTrainConfig's 2e-4; s-medqa preset: 2e-5]"
    ),
    patience: Optional[int] = typer.Option(None, help="early stopping patience [default: LoraTrainConfig's 2]"),
    method: Optional[str] = typer.Option(
        None, help="letter | option | generate [default: option; s-medqa preset: generate]"
    ),
    shuffles: Optional[int] = typer.Option(None, help="option shuffles per question [default: 1; s-medqa preset: 5]"),
    matcher: Optional[str] = typer.Option(
        None, help="generate method: regex | minilm | loglik [default: regex; s-medqa preset: minilm]"
    ),
    control_data: str = typer.Option(
        "bundled:control",
        "--control-data",
        help="non-medical questions every model is also tested on "
        "(general ability; e.g. an MMLU CSV folder; '' for none)",
    ),
    balance: bool = typer.Option(True, help="equal training sizes across specialties"),
    seed: int = typer.Option(0),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help=CHECKPOINTING_HELP),
    preset: Optional[str] = typer.Option(
        None,
        "--preset",
        help="s-medqa: the paper's protocol (lr 2e-5, up to 10 epochs with early stopping, "
        "5 shuffles, generate + MiniLM matcher); explicit flags win",
    ),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Train one adapter per specialty (+ control), evaluate every adapter on every specialty's test split and the control set."""
    from clinqa.data.loaders import load_questions
    from clinqa.evaluate.matcher import MatcherConfig
    from clinqa.experiments.cross_specialty import CrossSpecialtyConfig, cross_specialty
    from clinqa.experiments.presets import apply_preset

    chosen = apply_preset(
        preset,
        {
            "epochs": epochs,
            "learning_rate": learning_rate,
            "patience": patience,
            "method": method,
            "shuffles": shuffles,
            "matcher": matcher,
        },
        {"epochs": 3, "learning_rate": None, "patience": None, "method": "option", "shuffles": 1, "matcher": "regex"},
    )
    MatcherConfig(chosen["matcher"])
    if chosen["matcher"] != "regex" and chosen["method"] != "generate":
        raise ClinqaError(f"--matcher {chosen['matcher']} maps generated answers: use it with --method generate")
    lora = {"epochs": chosen["epochs"], **({"gradient_checkpointing": True} if gradient_checkpointing else {})}
    lora.update({k: chosen[k] for k in ("learning_rate", "patience") if chosen[k] is not None})
    _at_least("--shuffles", chosen["shuffles"])
    _at_least("--epochs", chosen["epochs"])
    _writable_out(out)
    cfg = CrossSpecialtyConfig(model=model, data=data, specialties=tuple(s.strip() for s in specialties.split(",") if s.strip()),
                               control_data=control or None, test_fraction=test_fraction, balance=balance, method=chosen["method"],
                               shuffles=chosen["shuffles"], seed=seed, lora=lora, matcher=chosen["matcher"], preset=preset,
                               control_eval=control_data or None)  # fmt: skip
    questions = load_questions(data).questions
    control_qs = load_questions(control).questions if control else []
    general_qs = (
        (control_qs if control_data == control else load_questions(control_data).questions) if control_data else []
    )
    base = load_predictor(model)
    if not hasattr(base, "load_adapter"):
        raise ClinqaError("the cross-specialty experiment needs a local base model (it trains LoRA adapters)")
    with progress_bar("cross-specialty") as update:
        cross_specialty(
            cfg,
            questions,
            out,
            base=base,
            control_questions=control_qs,
            control_eval_questions=general_qs,
            progress=lambda what, d, t: update(d, t, what),
        )
    console.print(plain((out / "summary.md").read_text()), markup=False, highlight=False)
    console.print(f"wrote {safe(out)}/summary.md, summary.json and matrix.png")


@app.command("annotate")
def annotate_cmd(
    data: str = typer.Argument(..., help="questions to label with specialties"),
    out: Path = typer.Option(..., "--out", "-o", help="annotations JSONL (resumable)"),
    model: str = typer.Option("default", "--model", help="the annotating model (spec)"),
    prompts: int = typer.Option(5, "--prompts", help="differently worded prompts that each vote"),
    min_votes: int = typer.Option(3, "--min-votes", help="votes the majority label needs to be kept"),
    calibrate: bool = typer.Option(True, help="contextual calibration against a content-free question"),
    train: Optional[str] = typer.Option(
        None,
        "--train",
        help="labelled questions: annotate with the MiniLM classifier trained on them instead of prompting a model (bundled = bundled:all, all fifteen specialties)",
    ),
    calibration: Optional[str] = typer.Option(
        None,
        "--calibration",
        help="labelled questions to calibrate conformal label sets on (else DATA itself is split, if labelled)",
    ),
    alpha: float = typer.Option(0.1, help="error rate of the conformal multi-label sets"),
    labelled: Optional[Path] = typer.Option(
        None,
        "--labelled",
        help="write DATA as clinqa JSONL with these specialties (the conformal set with --calibration, else the kept majority label)",
    ),
    limit: Optional[int] = typer.Option(None),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Label questions with specialties by majority vote over prompts (labels scored, never parsed) or with
    the MiniLM classifier (--train), report the accuracy/coverage trade-off and split-conformal
    multi-label sets where gold labels exist, and optionally write the labelled questions (--labelled)."""
    from clinqa.data.loaders import load_questions, write_questions
    from clinqa.specialties import conformal
    from clinqa.specialties.annotate import annotate_to_file, conformal_from_probs, tradeoff_table, write_annotations
    from clinqa.specialties.label import conformal_sets, embedding_annotations, gold_labels, labelled_questions

    _at_least("--limit", limit)
    _at_least("--prompts", prompts)
    _writable_out(out, folder=False)
    questions = load_questions(data, limit=limit).questions
    cal_qs = load_questions(calibration).questions if calibration else []
    cal_gold = gold_labels(cal_qs, calibration) if calibration else []  # fail before any annotating
    if train:
        from clinqa.specialties.embed import EmbeddingAnnotator
        from clinqa.specialties.label import annotator_training_spec

        if annotator_training_spec(train) != train:
            err.print(
                f"--train {train}: the MiniLM annotator trains on {annotator_training_spec(train)} (all fifteen "
                "specialties); --train bundled:clinical for the six experiment specialties only"
            )
            train = annotator_training_spec(train)
        train_qs = load_questions(train).questions
        train_ids = {q.id for q in train_qs}
        if train_ids & {q.id for q in cal_qs}:
            raise ClinqaError(
                f"--calibration {calibration} shares question ids with --train {train}: a classifier is "
                "over-confident on its own training questions, so the sets would under-cover; use disjoint sets"
            )
        if train_ids & {q.id for q in questions}:
            err.print(
                f"[yellow]warning:[/yellow] {len(train_ids & {q.id for q in questions})} questions of {safe(data)} are "
                f"also in --train {safe(train)}: their accuracy below is not held out"
            )
        with console.status("MiniLM annotator: embedding and fitting"):
            annotator = EmbeddingAnnotator().fit(train_qs)
            anns = embedding_annotations(annotator.predict_proba(questions), questions)
            cal_anns = embedding_annotations(annotator.predict_proba(cal_qs), cal_qs) if cal_qs else []
        write_annotations(out, anns)
        n_votes = 1
    else:
        predictor = load_predictor(model)
        with progress_bar(f"annotate · {prompts} prompts") as update:
            anns = annotate_to_file(
                predictor, questions, out, n_prompts=prompts, min_votes=min_votes, calibrate=calibrate, progress=update
            )
        cal_anns = []
        if cal_qs:
            with progress_bar("annotate calibration set") as update:
                cal_anns = annotate_to_file(
                    predictor,
                    cal_qs,
                    out.with_name(out.stem + ".calibration.jsonl"),
                    n_prompts=prompts,
                    min_votes=min_votes,
                    calibrate=calibrate,
                    progress=update,
                )
        n_votes = prompts
    rows = tradeoff_table(anns, questions, n_prompts=n_votes)
    if train:  # one classifier, no votes: only its accuracy, where DATA has gold labels
        if rows[0]["accuracy"] is not None:
            console.print(
                f"MiniLM annotator: top label is a gold label for {rows[0]['accuracy']:.3f} of {rows[0]['n_gold']} questions"
            )
    else:
        table = Table(title="accuracy / coverage by vote threshold")
        for col in ("min votes", "coverage", "accuracy (any gold label)"):
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(
                str(row["min_votes"]),
                f"{row['coverage']:.3f}",
                "—" if row["accuracy"] is None else f"{row['accuracy']:.3f}",
            )
        console.print(table)
    gold = [q.specialties for q in questions]
    sets = None
    if cal_qs:
        sets, cal = conformal_sets([a.probs for a in cal_anns], cal_gold, [a.probs for a in anns], alpha)
        line = f"conformal sets (alpha={alpha}, calibrated on {cal.n} questions of {safe(calibration)}): mean set size {sum(map(len, sets)) / len(sets):.2f}"
        if all(gold):
            m = conformal.evaluate_sets(sets, gold)
            line += f"; on {safe(data)}: coverage {m.coverage_any:.3f} (target {1 - alpha:.2f}), precision {m.precision:.2f}, recall {m.recall:.2f}"
        console.print(line)
    elif all(gold) and len(questions) >= 20:
        try:
            c = conformal_from_probs(anns, gold, alpha)
            console.print(
                f"conformal sets (alpha={alpha}, calibrated on {c['n_cal']}, tested on {c['n_test']}): coverage "
                f"{c['coverage']:.3f} (target {c['target']:.2f}), mean set size {c['mean_set_size']:.2f}, "
                f"precision {c['precision']:.2f}, recall {c['recall']:.2f}"
            )
        except ClinqaError as exc:
            err.print(f"[yellow]conformal sets skipped:[/yellow] {safe(exc)}")
    console.print(f"annotations in [bold]{safe(out)}[/bold]")
    if labelled:
        out_qs = labelled_questions(questions, anns, sets)
        write_questions(labelled, out_qs)
        n_lab = sum(bool(q.specialties) for q in out_qs)
        console.print(
            f"labelled questions in [bold]{safe(labelled)}[/bold] ({n_lab} of {len(out_qs)} with a specialty, from "
            f"{'conformal sets' if sets is not None else 'the majority vote'}); use it as DATA in eval, finetune "
            "and experiment cross-specialty"
        )


steer_app = typer.Typer(no_args_is_help=True, help="Activation steering: build vectors, sweep layers x alphas.")
app.add_typer(steer_app, name="steer")


def _int_list(text: Optional[str]) -> Optional[list[int]]:
    return [int(x) for x in text.split(",") if x.strip()] if text else None


@steer_app.command("build")
def steer_build(
    model: str = typer.Argument(..., help="a local model spec"),
    data: str = typer.Argument(
        "bundled", help="labelled questions: correct vs incorrect answers give the contrastive pairs"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="vector folder"),
    by: Optional[str] = typer.Option(
        None, "--by", help="one vector per category: 'specialty' or a meta key (adds a router)"
    ),
    layers: Optional[str] = typer.Option(None, help="comma-separated hidden-state layers (default: the penultimate)"),
    position: str = typer.Option("answer_last", help="answer_last | answer_mean"),
    aggregator: str = typer.Option("mean_diff", help="mean_diff | pca | probe"),
    max_pairs: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0),
    gguf: bool = typer.Option(False, help="also export llama.cpp's control-vector GGUF"),
    part: Optional[str] = typer.Option(
        None, "--part", help="only part K/N of the questions (every N-th per specialty): build on 0/2, evaluate on 1/2"
    ),
    router: str = typer.Option("embed", "--router", help="with --by: router features, embed | hidden | embed+hidden"),
    router_layer: Optional[int] = typer.Option(
        None, help="hidden-state layer for the router (default: the last steering layer)"
    ),
    router_c: Optional[float] = typer.Option(
        None, "--router-c", help="router regularisation (default: chosen by 5-fold CV)"
    ),
    coverage: float = typer.Option(0.9, help="router: route about this share of questions, the rest unsteered"),
    threshold: Optional[float] = typer.Option(None, help="router: a fixed top-probability cut instead of --coverage"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Build a steering vector (or one per category plus a router); use it as MODEL+steer:OUT@alpha=A."""
    from clinqa.adapt.steering import SteeringConfig, build_steering_vector
    from clinqa.data.loaders import load_questions
    from clinqa.experiments.compare import question_part

    cfg = SteeringConfig(
        layers=_int_list(layers), position=position, aggregator=aggregator, max_pairs=max_pairs, seed=seed
    )
    questions = question_part(load_questions(data).questions, part)
    data = f"{data} (part {part})" if part else data
    predictor = load_predictor(model)
    with progress_bar("steering pairs") as update:
        if by:
            from clinqa.adapt.router import build_category_vectors

            options = {
                "mode": router,
                "layer": router_layer,
                "C": router_c,
                "coverage": coverage,
                "threshold": threshold,
            }
            index = build_category_vectors(
                predictor, questions, by, cfg, out, progress=update, router=options, data=data
            )
            console.print_json(data=index)
            return
        vector = build_steering_vector(predictor, questions, cfg, progress=update, data=data)
    vector.save(out)
    if gguf:
        vector.export_gguf(out / "control_vector.gguf")
    console.print(f"vector in [bold]{safe(out)}[/bold]; use {safe(model)}+steer:{safe(out)}@alpha=1")


@steer_app.command("sweep")
def steer_sweep(
    model: str = typer.Argument(..., help="a local model spec"),
    data: str = typer.Argument("bundled"),
    vector: Path = typer.Option(
        ..., "--vector", help="vector folder from `steer build` (built with the layers to sweep)"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="folder for sweep.csv/.md/.png (resumable)"),
    layers: Optional[str] = typer.Option(None, help="comma-separated layers (default: all in the vector)"),
    alphas: str = typer.Option("-4,-2,-1,0,1,2,4", help="comma-separated alphas (units of activation std)"),
    method: str = typer.Option("option"),
    shuffles: int = typer.Option(1),
    limit: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0),
    part: Optional[str] = typer.Option(
        None, "--part", help="only part K/N of the questions, e.g. 1/2 when the vector was built on 0/2"
    ),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Accuracy for every (layer, alpha) with the per-question flip rates (wrong→right and right→wrong)."""
    from clinqa.adapt.control import sweep
    from clinqa.adapt.steering import SteeringVector
    from clinqa.data.loaders import load_questions
    from clinqa.experiments.compare import question_part

    _at_least("--shuffles", shuffles)
    _at_least("--limit", limit)
    _writable_out(out)
    vec = SteeringVector.load(vector)
    questions = question_part(load_questions(data, limit=limit).questions, part)
    predictor = load_predictor(model)
    with progress_bar("steer sweep") as update:
        result = sweep(
            predictor,
            questions,
            vec,
            _int_list(layers) or list(vec.layers),
            [float(a) for a in alphas.split(",")],
            method=method,
            shuffles=shuffles,
            seed=seed,
            out=out,
            progress=update,
        )
    console.print(plain(result.markdown()), markup=False, highlight=False)


index_app = typer.Typer(
    no_args_is_help=True, help="Retrieval indexes (BM25 + dense MiniLM + fusion) over your documents."
)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    docs: str = typer.Argument(
        ..., help="a folder of .txt/.md/.jsonl documents, a file, or 'bundled' (the reference corpus)"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="index folder"),
    dense: bool = typer.Option(True, help="also embed passages with MiniLM (offline) for dense and fused search"),
    max_words: int = typer.Option(120, help="passage length in words"),
    overlap: int = typer.Option(20, help="words shared by consecutive passages"),
) -> None:
    """Chunk documents and build a persistent index; use it as MODEL+rag:INDEX."""
    from clinqa.adapt.retrieval import build_index_cmd, describe

    with progress_bar("index") as update:
        index = build_index_cmd(
            docs,
            out,
            dense=dense,
            max_words=max_words,
            overlap=overlap,
            progress=lambda stage, d, t: update(d, t, stage),
        )
    console.print(safe(describe(index)), highlight=False)


@index_app.command("query")
def index_query(
    index: str = typer.Argument(..., help="index folder, or 'bundled'"),
    text: str = typer.Argument(..., help="the query"),
    k: int = typer.Option(5, "-k", "--k", help="passages to return"),
    mode: str = typer.Option("fused", help="bm25 | dense | fused"),
) -> None:
    """The top passages for a query."""
    from clinqa.adapt.retrieval import format_hits, query

    console.print(plain(format_hits(query(index, text, k=k, mode=mode))), markup=False, highlight=False)


records_app = typer.Typer(
    no_args_is_help=True, help="Patient records over FHIR R4: load, render, synthesise, question generation."
)
keys_app = typer.Typer(no_args_is_help=True, help="API keys for the service, with SMART-style scopes (stored hashed).")
audit_app = typer.Typer(no_args_is_help=True, help="The service's tamper-evident audit log.")
app.add_typer(records_app, name="records")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")


@records_app.command("synth")
def records_synth(
    patients: int = typer.Option(10, "--patients", "-n", help="how many patients"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., "--out", "-o", help="folder for one Bundle JSON file per patient"),
    now: str = typer.Option("2025-01-01", help="the 'today' the histories end at (YYYY-MM-DD)"),
) -> None:
    """Generate realistic synthetic FHIR R4 patients (deterministic for a seed)."""
    import datetime as dt

    from clinqa.records.synth import synthesize_patients, write_patients

    try:
        today = dt.date.fromisoformat(now)
    except ValueError as exc:
        raise ClinqaError(f"--now {now!r} is not a date (YYYY-MM-DD)") from exc
    with err.status(f"synthesising {patients} patients ..."):
        paths = write_patients(out, synthesize_patients(patients, seed=seed, now=today))
    console.print(f"wrote {len(paths)} patient bundles to [bold]{safe(out)}[/bold]")


@records_app.command("show")
def records_show(
    source: str = typer.Argument(
        ..., help="a Bundle JSON file, a folder of bundles, an NDJSON export, or https://server/fhir/Patient/ID"
    ),
    lenient: bool = typer.Option(False, "--lenient", help="keep resources that fail validation and report them"),
    include_billing: bool = typer.Option(False, "--include-billing", help="keep Claim/ExplanationOfBenefit"),
    limit: int = typer.Option(40, help="rendered lines to print per patient (0 = all)"),
) -> None:
    """Load and validate records, then print each patient's resources as the model sees them."""
    from clinqa.records.fhir import load_records
    from clinqa.records.render import render_record

    records = load_records(source, lenient=lenient, include_billing=include_billing)
    for rec in records:
        lines = render_record(rec)
        console.print(
            f"[bold]{safe(rec.name)}[/bold] ({safe(rec.patient_id)}) · {len(rec.resources)} resources · {len(rec.problems)} problems"
        )
        for problem in rec.problems:
            err.print(f"[yellow]problem:[/yellow] {safe(problem)}")
        for _rid, line in lines[: limit or None]:
            console.print(plain(line), highlight=False, markup=False)
        if limit and len(lines) > limit:
            console.print(f"... {len(lines) - limit} more")


@records_app.command("questions")
def records_questions(
    source: str = typer.Argument(
        ..., help="records: a folder of bundles (e.g. from `records synth`), a bundle, or an NDJSON export"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="questions JSONL (relevant resource ids and reference answers)"),
    seed: int = typer.Option(0),
    per_type: int = typer.Option(3, help="questions per question type per patient"),
    now: Optional[str] = typer.Option(
        None, help="fixed 'today' for time-window questions (default: each record's last date + 30 days)"
    ),
) -> None:
    """Generate questions with ground truth from records (works on real Synthea bundles too)."""
    import datetime as dt
    from collections import Counter

    from clinqa.records.fhir import load_records
    from clinqa.records.questions import generate_questions, record_end, write_questions

    records = load_records(source)
    qs = []
    with progress_bar("questions") as update:
        for i, rec in enumerate(records):
            today = dt.date.fromisoformat(now) if now else (record_end(rec) or dt.date.today()) + dt.timedelta(days=30)
            qs += generate_questions(rec, now=today, seed=seed, per_type=per_type)
            update(i + 1, len(records))
    write_questions(out, qs)
    counts = Counter(q.qtype for q in qs)
    console.print(
        f"wrote {len(qs)} questions for {len(records)} patients to [bold]{safe(out)}[/bold]: "
        + ", ".join(f"{safe(k)} {v}" for k, v in sorted(counts.items()))
    )


def _selector(selector: str, model_predictor, top_k: int, threshold: float | None):
    from clinqa.records.pipeline import FullRecordBaseline, LLMSelector, RetrievalSelector

    threshold = 0.5 if threshold is None else threshold
    if selector in ("bm25", "embedding"):
        return RetrievalSelector(selector, top_k=top_k)
    if selector == "llm":
        return LLMSelector(model_predictor, threshold=threshold)
    if selector == "full":
        return FullRecordBaseline()
    raise ClinqaError(f"unknown selector {selector!r}: use bm25, embedding, llm or full")


SELECTOR_HELP = "stage 1: bm25 | embedding | llm (P(yes) from the model; use MODEL+lora:... for a fine-tuned one) | full (whole record baseline)"


@records_app.command("ask")
def records_ask(
    source: str = typer.Argument(..., help="a patient's Bundle JSON file (or any records source with one patient)"),
    question: str = typer.Argument(..., help="the question about this patient"),
    model: str = typer.Option("default", help="model spec"),
    selector: str = typer.Option("bm25", help=SELECTOR_HELP),
    top_k: int = typer.Option(8, help="lines kept by a retrieval selector"),
    threshold: float = typer.Option(0.5, help="P(yes) threshold of the llm selector"),
    patient: Optional[str] = typer.Option(None, help="patient id when the source holds several"),
    max_new_tokens: int = typer.Option(128),
    max_question_chars: int = typer.Option(2000, help="refuse longer questions (the service's default limit)"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Answer a question from one patient's record: the answer, its cited resources, and stage 1's selection."""
    from clinqa.records.fhir import load_records
    from clinqa.records.pipeline import answer_question
    from clinqa.records.render import render_record

    if not question.strip():
        raise ClinqaError("the question is empty: ask something about the patient")
    if len(question) > max_question_chars:
        raise ClinqaError(
            f"the question is {len(question):,} characters, over the limit of {max_question_chars:,} "
            "(raise it with --max-question-chars)"
        )
    records = load_records(source)
    if patient:
        records = [r for r in records if r.patient_id == patient]
    if len(records) != 1:
        raise ClinqaError(f"{source} holds {len(records)} patients: choose one with --patient ID")
    record = records[0]
    predictor = load_predictor(model)
    with err.status("answering ..."):
        res = answer_question(
            predictor,
            record,
            question,
            selector=_selector(selector, predictor, top_k, threshold),
            max_new_tokens=max_new_tokens,
        )
    lines = dict(render_record(record))
    console.print(f"[bold]answer:[/bold] {safe(res.answer)}", highlight=False)
    for rid in res.citations:
        console.print(plain(f"  cites {lines.get(rid, rid)}"), highlight=False, markup=False)
    if res.invalid_citations:
        console.print(
            f"[yellow]removed citations to resources outside this record:[/yellow] {safe(', '.join(res.invalid_citations))}"
        )
    if not res.supported:
        err.print(
            "[bold yellow]unsupported:[/bold yellow] the answer cites nothing in this patient's record; do not trust it"
        )
    console.print(f"stage 1 ({selector}) selected {len(res.selected)} of {len(lines)} resources:")
    for sel in res.selected[:12]:
        console.print(plain(f"  {sel.score:.3f} {lines.get(sel.id, sel.id)}"), highlight=False, markup=False)
    console.print(f"{res.tokens} tokens · " + " · ".join(f"{k} {v:.2f}s" for k, v in res.timings.items()))


@records_app.command("eval")
def records_eval(
    model: str = typer.Argument(..., help="model spec answering stage 2 (and stage 1 with --selector llm)"),
    qa: Path = typer.Argument(..., help="questions JSONL from `clinqa records questions`"),
    records: str = typer.Option(..., "--records", help="the records the questions were generated from"),
    out: Path = typer.Option(..., "--out", "-o", help="run folder (resumable)"),
    selector: str = typer.Option("bm25", help=SELECTOR_HELP),
    top_k: int = typer.Option(8),
    threshold: Optional[float] = typer.Option(
        None, help="P(yes) threshold of the llm selector (default: the tuned one with --adapters, else 0.5)"
    ),
    limit: Optional[int] = typer.Option(None, help="only the first N questions"),
    max_new_tokens: int = typer.Option(128),
    meteor: bool = typer.Option(True, help="compute METEOR (needs Debian's wordnet-base)"),
    adapters: Optional[Path] = typer.Option(
        None,
        help="fine-tuned stages from `records finetune`: MODEL is their base; "
        "stage 1 is the llm selector with the stage-1 adapter and its tuned threshold",
    ),
    stage1_model: Optional[str] = typer.Option(None, help="model spec of the llm selector when it differs from MODEL"),
    tune: Optional[Path] = typer.Option(
        None, help="validation questions JSONL: set the llm selector's threshold for the best stage-1 F1 on them first"
    ),
    tune_records: Optional[str] = typer.Option(None, help="records of --tune (default: --records)"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Stage-1 precision/recall/F1 and stage-2 METEOR, ROUGE-L, exact match, citation precision, abstention."""
    import json as _json

    from clinqa.records.pipeline import evaluate_records

    _at_least("--limit", limit)
    _at_least("--top-k", top_k)
    _at_least("--max-new-tokens", max_new_tokens)
    _writable_out(out)
    recs, questions = _records_and_questions(qa, records, limit)
    if adapters is not None:
        from clinqa.records.train import read_stages

        stages = read_stages(adapters)
        stage1_model, model = f"{model}+lora:{stages['stage1']}", f"{model}+lora:{stages['stage2']}"
        selector, threshold = "llm", stages["threshold"] if threshold is None else threshold
    predictor = load_predictor(model)
    stage1 = load_predictor(stage1_model) if stage1_model else predictor
    chosen = _selector(selector, stage1, top_k, threshold)
    if tune is not None:
        from clinqa.records.pipeline import selection_examples, tune_threshold

        if selector != "llm":
            raise ClinqaError("--tune sets the llm selector's threshold: use it with --selector llm (or --adapters)")
        trecs, tq = _records_and_questions(tune, tune_records or records)
        with err.status(f"tuning the stage-1 threshold on {len(tq)} questions ..."):
            tuned = tune_threshold(chosen, selection_examples(trecs, tq))
        console.print(f"stage-1 threshold {tuned['threshold']:.4f}: F1 {tuned['f1']:.3f} on {len(tq)} tuning questions")
    with progress_bar(f"records · {selector}") as update:
        summary = evaluate_records(
            predictor,
            recs,
            questions,
            selector=chosen,
            out=out,
            progress=update,
            max_new_tokens=max_new_tokens,
            with_meteor=meteor,
        )
    console.print_json(_json.dumps(summary, default=str))
    console.print(f"run saved in [bold]{safe(out)}[/bold]")


@records_app.command("judge")
def records_judge(
    qa: Path = typer.Argument(..., help="the questions JSONL the runs answered"),
    run: list[str] = typer.Option(
        ..., "--run", help="NAME=RUN_FOLDER of a `records eval` run (repeatable); NAME is what the named judge is told"
    ),
    judge: str = typer.Option("default", help="judge model spec (any backend, e.g. openai:URL#MODEL)"),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="write every grade, verdict and the report as JSON here"
    ),
    seed: int = typer.Option(0, help="seed of the blind panel's answer order (and of the bootstrap)"),
    reading: str = typer.Option(
        "logprob",
        help="logprob: grades from the judge's next-token distribution; generate: the judge writes them (servers without log-probabilities)",
    ),
    pairwise: bool = typer.Option(
        True, "--pairwise/--no-pairwise", help="also ask every pair of answers in both orders (position bias)"
    ),
    self_name: list[str] = typer.Option(
        [],
        "--self",
        help="system NAME that uses the judge's own model (repeatable; default: read from the run folders' model spec)",
    ),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """LLM-as-judge of record answers: blind (all systems' answers, anonymised, shuffled) vs named, self-preference, position bias."""
    import json as _json

    from clinqa.records.judge import Judge
    from clinqa.records.judge_report import judge_report
    from clinqa.records.questions import read_questions

    systems = {}
    for item in run:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ClinqaError(f"--run {item!r}: use NAME=RUN_FOLDER")
        if not (Path(folder) / "run.json").is_file():
            raise ClinqaError(f"--run {item!r}: {folder} is not a run folder (no run.json)")
        systems[name] = folder
    unknown = [n for n in self_name if n not in systems]
    if unknown:
        raise ClinqaError(f"--self {unknown[0]!r} is not one of the --run names ({', '.join(systems)})")
    questions = read_questions(qa)
    judge_model = Judge(load_predictor(judge), reading=reading)
    with err.status(
        f"judging {len(systems)} systems x {len(questions)} questions: blind, named{', pairwise' if pairwise else ''} ..."
    ):
        rep = judge_report(judge_model, questions, systems, seed=seed, pairwise=pairwise, self_names=self_name or None)
    fmt = lambda v, d=2: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    table = Table("system", "self", "n", "blind", "named", "named − blind [95% CI]", "p (Wilcoxon)", "κ vs EM (blind)",
                  "unparseable b/n", title="judge grades 0-4 (expected grade), per system")  # fmt: skip
    for name, r in rep["systems"].items():
        d = r["named_minus_blind"]
        table.add_row(safe(name), "yes" if r["self"] else "", str(d["n"]), fmt(r["blind"]["mean_expected"]), fmt(r["named"]["mean_expected"]),
                      f"{fmt(d['mean'], 3)} [{fmt(d['ci_low'], 3)}, {fmt(d['ci_high'], 3)}]", fmt(d["p_wilcoxon"], 3),
                      fmt(r["kappa_blind"]["kappa"]), f"{r['blind']['unparseable']}/{r['named']['unparseable']}")  # fmt: skip
    console.print(table)
    sp = rep["self_preference"]
    if sp:
        i, e = sp["named_inflation"], sp["blind_excess_over_exact_match"]
        console.print(f"self-preference ({', '.join(sp['systems'])} use the judge's model): named inflation vs the others "
                      f"{fmt(i['mean'], 3)} [{fmt(i['ci_low'], 3)}, {fmt(i['ci_high'], 3)}] p={fmt(i['p_wilcoxon'], 3)} (n={i['n']}); "
                      f"blind correct minus exact match vs the others {fmt(e['mean'], 3)} [{fmt(e['ci_low'], 3)}, {fmt(e['ci_high'], 3)}] (n={e['n']})")  # fmt: skip
    else:
        console.print(
            "self-preference: no judged system uses the judge's model (or all do); pass --self NAME to name one"
        )
    pb = rep.get("position_bias")
    if pb:
        console.print(f"position bias: {pb['follows_position']} of {pb['pairs']} pairs asked in both orders follow the position "
                      f"({fmt(pb['rate'] and 100 * pb['rate'], 1)}% [{fmt(pb['ci_low'] and 100 * pb['ci_low'], 1)}, "
                      f"{fmt(pb['ci_high'] and 100 * pb['ci_high'], 1)}]); A chosen {pb['first_wins']} of {pb['verdicts']} "
                      f"(p vs 1/2 {fmt(pb['p_first_vs_half'], 3)}); unparseable verdicts {pb['unparseable']}")  # fmt: skip
    kb, kn = rep["kappa_blind"], rep["kappa_named"]
    console.print(
        f"κ with exact match (judge correct = grade >= 3): blind {fmt(kb['kappa'])}, named {fmt(kn['kappa'])} (n={kb['n']})"
    )
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_json.dumps({"judge": judge, **rep}, indent=2, default=str))
        console.print(f"grades in [bold]{safe(out)}[/bold]")


def _stages_config(
    mode: str,
    epochs: int,
    learning_rate: float,
    rank: int,
    batch_size: int,
    max_length: int,
    seed: int,
    tune_questions: int = 8,
    gradient_checkpointing: bool = False,
):
    from clinqa.adapt.lora import LoraTrainConfig
    from clinqa.records.train import StagesConfig

    lora = LoraTrainConfig(
        rank=rank,
        alpha=16,
        epochs=epochs,
        patience=1,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
    )
    return StagesConfig(
        mode=mode, lora=lora, seed=seed, max_tune=tune_questions, tune_fraction=0.1 if tune_questions else 0.0
    )


def _records_and_questions(qa: Path, records: str, limit: int | None = None):
    from clinqa.records.fhir import load_records
    from clinqa.records.questions import read_questions

    questions = read_questions(qa)
    return load_records(records), questions[:limit] if limit else questions


def _stage_progress(update):
    return lambda what, done, total: update(done, total, what)


@records_app.command("finetune")
def records_finetune(
    model: str = typer.Argument(..., help="base model spec (a local model)"),
    qa: Path = typer.Argument(..., help="training questions JSONL (`records questions` on training patients)"),
    records: str = typer.Option(..., "--records", help="the records the training questions were generated from"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the stage adapters and stages.json (resumable)"),
    mode: str = typer.Option(
        "separate", help="separate (one adapter per stage) | sequential | multitask (one adapter for both)"
    ),
    sequential: bool = typer.Option(
        False, "--sequential", help="same as --mode sequential: stage 2 continues the stage-1 adapter"
    ),
    test: Optional[Path] = typer.Option(
        None, help="with --sequential: test questions to measure stage-1 F1 before vs after stage 2"
    ),
    test_records: Optional[str] = typer.Option(None, help="the records of --test (default: --records)"),
    limit: Optional[int] = typer.Option(None, help="only the first N training questions"),
    epochs: int = typer.Option(3),
    learning_rate: float = typer.Option(2e-4, "--lr"),
    rank: int = typer.Option(16),
    batch_size: int = typer.Option(4),
    max_length: int = typer.Option(
        768, help="tokens per training example (a stage-2 prompt holds several record lines)"
    ),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help=CHECKPOINTING_HELP),
    tune_questions: int = typer.Option(
        8, help="training questions held out to tune the stage-1 threshold (0: use 0.5)"
    ),
    seed: int = typer.Option(0),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """LoRA fine-tuning of both record stages (stage 1 relevant yes/no, stage 2 cited answers); tunes the stage-1 threshold."""
    from clinqa.records.train import finetune_stages, forgetting

    mode = "sequential" if sequential else mode
    recs, questions = _records_and_questions(qa, records, limit)
    cfg = _stages_config(
        mode, epochs, learning_rate, rank, batch_size, max_length, seed, tune_questions, gradient_checkpointing
    )
    base = load_predictor(model)
    with progress_bar("records finetune") as update:
        stages = finetune_stages(base, recs, questions, out, cfg, progress=_stage_progress(update))
    console.print(
        f"{safe(mode)} stages in [bold]{safe(out)}[/bold]: stage 1 {safe(stages['stage1'])} ({stages['n_examples']['stage1']} pairs), "
        f"stage 2 {safe(stages['stage2'])} ({stages['n_examples']['stage2']} answers); stage-1 threshold "
        f"{stages['threshold']:.3f} (F1 {stages['tuning'].get('f1', float('nan')):.3f} on {stages['n_tune_questions']} held-out questions)"
    )
    console.print(
        f"evaluate: clinqa records eval {safe(model)} TEST_QA --records TEST_RECORDS --adapters {safe(out)} --out runs/NAME"
    )
    if test is not None:
        if mode != "sequential":
            raise ClinqaError("--test measures forgetting, which needs --sequential")
        trecs, tq = _records_and_questions(test, test_records or records)
        with progress_bar("stage-1 F1 before/after") as update:
            result = forgetting(base, trecs, tq, out, progress=_stage_progress(update))
        console.print(
            f"stage-1 micro F1 on {len(tq)} test questions: before stage 2 {result['before']['micro']['f1']:.3f}, "
            f"after {result['after']['micro']['f1']:.3f} (drop {result['f1_drop']:+.3f}); saved in {safe(out)}/forgetting.json"
        )
        rev = result.get("reverse")
        for key, label in (("meteor", "METEOR"), ("rouge_l", "ROUGE-L")):
            c = rev and rev.get(f"{key}_change")
            if c:
                console.print(
                    f"reverse order, stage-2 {label} on the gold lines: before stage 1 {rev['before'][key]:.3f}, after "
                    f"{rev['after'][key]:.3f} (change {c['diff']:+.3f}, 95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}, "
                    f"p={c['p']:.3f}, n={c['n']})"
                )


@records_app.command("sweep")
def records_sweep(
    model: str = typer.Argument(..., help="base model spec (a local model)"),
    train: Path = typer.Argument(..., help="training questions JSONL"),
    test: Path = typer.Argument(..., help="test questions JSONL"),
    records: str = typer.Option(..., "--records", help="records of the training questions"),
    test_records: Optional[str] = typer.Option(None, help="records of the test questions (default: --records)"),
    sizes: str = typer.Option("100,500,full", help="training-set sizes in questions; 'full' is all"),
    out: Path = typer.Option(
        ..., "--out", "-o", help="folder for adapters, runs, sweep.json and sweep.png (resumable)"
    ),
    epochs: int = typer.Option(3),
    learning_rate: float = typer.Option(2e-4, "--lr"),
    rank: int = typer.Option(16),
    batch_size: int = typer.Option(4),
    max_length: int = typer.Option(768),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help=CHECKPOINTING_HELP),
    max_new_tokens: int = typer.Option(64),
    seed: int = typer.Option(0),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Dataset-size sweep: fine-tune both stages on the first N training questions for each size, evaluate, plot F1 and METEOR."""
    from clinqa.records.train import size_sweep

    try:
        size_list = [None if x.strip() == "full" else int(x) for x in sizes.split(",") if x.strip()]
    except ValueError:
        raise ClinqaError(f"--sizes {sizes!r}: use comma-separated integers and 'full', e.g. 100,500,full") from None
    if not size_list or any(x is not None and x < 1 for x in size_list):
        raise ClinqaError(f"--sizes {sizes!r}: give at least one positive size")
    recs, train_q = _records_and_questions(train, records)
    trecs, test_q = _records_and_questions(test, test_records or records)
    _writable_out(out)
    cfg = _stages_config(
        "separate",
        epochs,
        learning_rate,
        rank,
        batch_size,
        max_length,
        seed,
        gradient_checkpointing=gradient_checkpointing,
    )
    base = load_predictor(model)
    from clinqa.runs import lock_path

    with lock_path(out, folder=True), progress_bar("records sweep") as update:
        rows = size_sweep(
            base,
            recs,
            train_q,
            trecs,
            test_q,
            size_list,
            out,
            cfg,
            progress=_stage_progress(update),
            max_new_tokens=max_new_tokens,
        )
    table = Table("training questions", "stage-1 F1", "METEOR", "ROUGE-L", "exact match", "abstention")
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        table.add_row(
            str(r["n_questions"]),
            fmt(r["stage1_f1"]),
            fmt(r["stage2"].get("meteor")),
            fmt(r["stage2"].get("rouge_l")),
            fmt(r["stage2"].get("exact_match")),
            fmt(r["stage2"].get("abstention_rate")),
        )
    console.print(table)
    console.print(f"curves in [bold]{safe(out)}/sweep.json[/bold] and {safe(out)}/sweep.png")


@app.command("serve")
def serve_cmd(
    model: Optional[str] = typer.Option(
        None, help="model spec (default, +lora:, +rag:, openai:URL#MODEL for vLLM, ...)"
    ),
    records: list[str] = typer.Option(
        [], "--records", help="records folder/file or https://server/fhir/Patient/ID (repeatable)"
    ),
    host: Optional[str] = typer.Option(None, help="bind address (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="port (default 8470)"),
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML/JSON settings file (else $CLINQA_CONFIG); CLINQA_* env vars also apply"
    ),
    keys_db: Optional[Path] = typer.Option(None, "--keys-db"),
    audit_db: Optional[Path] = typer.Option(None, "--audit-db"),
    adapters: Optional[Path] = typer.Option(
        None,
        "--adapters",
        help="fine-tuned stages from `records finetune`: MODEL is "
        "their base; stage 1 is the llm selector with the stage-1 adapter and its threshold",
    ),
    model_concurrency: Optional[int] = typer.Option(
        None,
        "--model-concurrency",
        help="model calls at once with an openai: backend (default 8); a local model answers one at a time",
    ),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """The private HTTP service and web page: patient-scoped API keys, audit log, record QA and MCQ answering."""
    from clinqa.serve.app import serve
    from clinqa.serve.config import ServeConfig

    overrides = {
        k: v
        for k, v in {
            "model": model,
            "records": list(records) or None,
            "host": host,
            "port": port,
            "keys_db": keys_db,
            "audit_db": audit_db,
            "adapters": adapters,
            "model_concurrency": model_concurrency,
        }.items()
        if v is not None
    }
    serve(ServeConfig.load(config, **overrides))


def _keystore(path: Path, create: bool = False):
    from clinqa.serve.auth import KeyStore

    return KeyStore(path, create=create)


KEYS_DB = typer.Option(
    Path(os.environ.get("CLINQA_KEYS_DB", "clinqa-keys.db")), "--db", help="key store file (env CLINQA_KEYS_DB)"
)


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="who or what uses the key, e.g. 'ward-7 tablet'"),
    patients: str = typer.Option("", help="comma-separated patient ids, or * for all"),
    operations: str = typer.Option("read,ask", help="comma-separated: read, ask, admin"),
    days: Optional[int] = typer.Option(None, help="expires after this many days"),
    db: Path = KEYS_DB,
) -> None:
    """Create a key; the plain key is printed once and never stored."""
    import datetime as dt

    if days is not None and days < 1:
        raise ClinqaError(
            f"--days {days}: a key must live at least 1 day (leave --days out for a key that never expires)"
        )
    rec, plain = _keystore(db, create=True).create(
        name,
        [p for p in patients.split(",") if p],
        [o for o in operations.split(",") if o],
        expires=dt.timedelta(days=days) if days is not None else None,
    )
    console.print(f"key id {safe(rec.key_id)} · scopes: {safe(rec.scope_text)}")
    console.print(plain, highlight=False, markup=False)


@keys_app.command("list")
def keys_list(db: Path = KEYS_DB) -> None:
    """List keys (ids, names, scopes, status; never secrets)."""
    table = Table()
    for col in ("key id", "name", "scopes", "created", "expires", "status"):
        table.add_column(col)
    for k in _keystore(db).list():
        table.add_row(
            *(
                safe(v)
                for v in (k.key_id, k.name, k.scope_text, str(k.created)[:19], str(k.expires or "")[:19], k.status())
            )
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(...), db: Path = KEYS_DB) -> None:
    """Revoke a key at once."""
    rec = _keystore(db).revoke(key_id)
    console.print(f"revoked {safe(rec.key_id)} ({safe(rec.name)})")


@audit_app.command("verify")
def audit_verify(
    db: Path = typer.Option(
        Path(os.environ.get("CLINQA_AUDIT_DB", "clinqa-audit.db")), "--db", help="audit log file (env CLINQA_AUDIT_DB)"
    ),
    anchor: Optional[Path] = typer.Option(
        None,
        "--anchor",
        help="anchor file the service wrote (default: DB.anchor beside "
        "the log, if there): every anchored entry must still be there, unchanged",
    ),
) -> None:
    """Recompute the audit log's hash chain (opened read-only); exit 1 if it was tampered with."""
    from clinqa.serve.audit import default_anchor_path, read_anchors, verify_file

    if anchor is None and default_anchor_path(db).is_file():
        anchor = default_anchor_path(db)
    anchors = read_anchors(anchor) if anchor is not None else None
    result = verify_file(db, anchors)
    if result.ok:
        checked = (
            f"; {len(anchors)} anchors from {safe(anchor)} match" if anchors is not None else "; no anchor file checked"
        )
        console.print(f"[green]ok[/green]: {result.n} entries, chain intact{checked}")
    else:
        err.print(f"[bold red]TAMPERED[/bold red]: {safe(result.message)} (first bad entry {result.first_bad_seq})")
        raise typer.Exit(1)


INTERRUPTED = "interrupted: finished batches are saved; re-run the same command to resume"


def main() -> None:
    """Console entry point: user errors print one line, no traceback. Ctrl-C (SIGINT) and SIGTERM unwind
    normally (run folders release their locks) and print one line; typer would turn Ctrl-C into a
    silent exit 130, so the signal is noted here."""
    import signal

    signals: list[int] = []

    def stop(signum, frame):
        signals.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        app()
    except ClinqaError as exc:
        err.print(f"[bold red]error:[/bold red] {safe(exc)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print(INTERRUPTED, markup=False, highlight=False)
        sys.exit(130)
    except SystemExit:
        if signals:
            err.print(INTERRUPTED, markup=False, highlight=False)
            sys.exit(130 if signals[0] == signal.SIGINT else 143)
        raise


if __name__ == "__main__":
    main()
