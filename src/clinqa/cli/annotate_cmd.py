"""`clinqa annotate`: specialty labels for questions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from clinqa.cli.app import app
from clinqa.cli.common import (
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    _at_least,
    _writable_out,
    console,
    err,
    load_predictor,
    progress_bar,
)
from clinqa.errors import ClinqaError
from clinqa.textsafe import safe


@app.command("annotate")
def annotate_cmd(
    data: str = typer.Argument(..., help="questions to label with specialties"),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="annotation run folder (run.json + samples.jsonl; --calibration's in OUT/calibration), resumed when run "
        "again; an annotation file of an older clinqa given here is migrated (kept as NAME.v1.jsonl)",
    ),
    model: str = typer.Option("default", "--model", help="the annotating model (spec)"),
    prompts: int = typer.Option(5, "--prompts", help="differently worded prompts that each vote"),
    min_votes: int = typer.Option(3, "--min-votes", help="votes the majority label needs to be kept"),
    calibrate: bool = typer.Option(True, help="contextual calibration against a content-free question"),
    train: Optional[str] = typer.Option(
        None,
        "--train",
        help="labelled questions: annotate with the MiniLM classifier trained on them instead of prompting a model (bundled = bundled:all, all fifteen specialties)",
    ),
    none_from: Optional[str] = typer.Option(
        None,
        "--none-from",
        help="hand-labelled questions, some with an empty specialties list: fit the none gate on them (with --train) "
        "and leave the questions it judges outside the fifteen specialties unlabelled "
        "(e.g. benchmarks/data/medmcqa_specialty_val.jsonl)",
    ),
    none_threshold: float = typer.Option(0.5, "--none-threshold", help="P(none) at which the gate leaves a question"),
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
    from clinqa.specialties.annotate import annotate_to_run, conformal_from_probs, tradeoff_table
    from clinqa.specialties.annotate_store import CALIBRATION_DIR, check_annotation_out, legacy_calibration_file
    from clinqa.specialties.label import conformal_sets, gold_labels, labelled_questions, minilm_to_run

    _at_least("--limit", limit)
    _at_least("--prompts", prompts)
    if none_from and not train:
        raise ClinqaError("--none-from fits the none gate of the MiniLM annotator: give --train too")
    if not 0 < none_threshold < 1:
        raise ClinqaError(f"--none-threshold must be between 0 and 1 (exclusive), got {none_threshold}")
    check_annotation_out(out)
    if labelled:
        _writable_out(labelled, folder=False)
    note = lambda message: err.print(f"note: {safe(message)}", highlight=False, soft_wrap=True)  # noqa: E731
    cal_out, cal_legacy = out / CALIBRATION_DIR, legacy_calibration_file(out)
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
        gate_from = None
        if none_from:
            loaded = load_questions(none_from, skip_invalid=True)  # the gate reads question texts only
            none_qs = loaded.questions
            if loaded.skipped:
                note(f"--none-from {none_from}: {len(loaded.skipped)} rows with invalid options left out")
            gate_from = (none_from, none_qs)
            shared = {x.id for x in none_qs} & {x.id for x in questions}
            if shared:
                err.print(
                    f"[yellow]warning:[/yellow] {len(shared)} questions of {safe(data)} are also in --none-from "
                    f"{safe(none_from)}: the gate has seen them"
                )
        gate_args = {"none_from": gate_from, "none_threshold": none_threshold}
        with console.status("MiniLM annotator: embedding and fitting"):
            annotator = EmbeddingAnnotator()  # fitted only if something is still to annotate
            anns = minilm_to_run(out, questions, train_qs, train, annotator=annotator, notify=note, **gate_args)
            cal_anns = (
                minilm_to_run(cal_out, cal_qs, train_qs, train, annotator=annotator, **gate_args) if cal_qs else []
            )
        if gate_from:
            left = sum(a.label is None for a in anns)
            console.print(
                f"none gate (fitted on {safe(none_from)}, P(none) >= {none_threshold}): {left} of {len(anns)} "
                "questions left without a specialty"
            )
        n_votes = 1
    else:
        predictor = load_predictor(model)
        with progress_bar(f"annotate · {prompts} prompts") as update:
            anns = annotate_to_run(
                predictor,
                questions,
                out,
                n_prompts=prompts,
                min_votes=min_votes,
                calibrate=calibrate,
                progress=update,
                notify=note,
            )
        cal_anns = []
        if cal_qs:
            with progress_bar("annotate calibration set") as update:
                cal_anns = annotate_to_run(
                    predictor,
                    cal_qs,
                    cal_out,
                    n_prompts=prompts,
                    min_votes=min_votes,
                    calibrate=calibrate,
                    progress=update,
                    legacy_file=cal_legacy,
                    notify=note,
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
    console.print(
        f"annotations in the run folder [bold]{safe(out)}[/bold]"
        + (f" (calibration set: {safe(cal_out)})" if cal_qs else "")
    )
    if labelled:
        out_qs = labelled_questions(questions, anns, sets)
        write_questions(labelled, out_qs)
        n_lab = sum(bool(q.specialties) for q in out_qs)
        console.print(
            f"labelled questions in [bold]{safe(labelled)}[/bold] ({n_lab} of {len(out_qs)} with a specialty, from "
            f"{'conformal sets' if sets is not None else 'the majority vote'}); use it as DATA in eval, finetune "
            "and experiment cross-specialty"
        )
