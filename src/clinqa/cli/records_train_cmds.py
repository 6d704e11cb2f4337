"""`clinqa records finetune` and `clinqa records sweep`: LoRA for the two record stages."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from clinqa.cli.app import records_app
from clinqa.cli.common import (
    CHECKPOINTING_HELP,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    _writable_out,
    console,
    load_predictor,
    progress_bar,
)
from clinqa.cli.records_cmds import _records_and_questions
from clinqa.errors import ClinqaError
from clinqa.textsafe import safe


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
            result = forgetting(base, trecs, tq, out, tune_records=recs, progress=_stage_progress(update))
        console.print(
            f"stage-1 micro F1 on {len(tq)} test questions: before stage 2 {result['before']['micro']['f1']:.3f}, "
            f"after {result['after']['micro']['f1']:.3f} (drop {result['f1_drop']:+.3f}); saved in {safe(out)}/forgetting.json"
        )
        if c := result.get("f1_change"):
            console.print(
                f"per-question stage-1 F1 change {c['diff']:+.3f} (95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}, "
                f"p={c['p']:.3f}, n={c['n']})"
            )
        if c := result.get("f1_change_retuned"):
            r = result["after_retuned"]
            console.print(
                f"after stage 2 with the threshold tuned again ({r['tuning']['threshold']:.3f}, same held-out questions): "
                f"micro F1 {r['micro']['f1']:.3f}; per-question F1 change against before {c['diff']:+.3f} "
                f"(95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}, p={c['p']:.3f}, n={c['n']})"
            )
        if c := result.get("ap_change"):
            console.print(
                f"average precision of the line ranking (no threshold): before {result['before']['mean_ap']:.3f}, "
                f"after {result['after']['mean_ap']:.3f} (change {c['diff']:+.3f}, 95% CI {c['ci_low']:+.3f} to "
                f"{c['ci_high']:+.3f}, p={c['p']:.3f}, n={c['n']})"
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
