"""`clinqa analyze`, `finetune`, `experiment`, `steer` and `index`: adapting a model and measuring what it changed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clinqa.cli.app import analyze_app, app, experiment_app, index_app, steer_app
from clinqa.cli.common import (
    CHECKPOINTING_HELP,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    _at_least,
    _writable_out,
    console,
    load_predictor,
    progress_bar,
)
from clinqa.errors import ClinqaError
from clinqa.textsafe import plain, safe


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
    from clinqa.models.base import LoadsAdapters

    predictor = load_predictor(base)
    if not isinstance(predictor, LoadsAdapters):
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
    from clinqa.models.base import LoadsAdapters

    base = load_predictor(model)
    if not isinstance(base, LoadsAdapters):
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
