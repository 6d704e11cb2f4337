"""evaluate(): data -> predictor -> scoring -> run folder. The one entry point every command uses."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate.methods import METHODS, SCORERS, make_items
from clinqa.evaluate.runs import EvalConfig, Run, run_items
from clinqa.evaluate.sample import Sample
from clinqa.models.base import Predictor


def load_data(config: EvalConfig) -> tuple[list[Question], int]:
    """The questions a config names, and how many rows were skipped as invalid."""
    from clinqa.data.loaders import load_questions

    res = load_questions(
        config.data,
        format=config.data_format,
        skip_invalid=config.skip_invalid,
        limit=config.limit,
        specialties=list(config.specialties) or None,
    )
    if not res.questions:
        raise ClinqaError(
            f"no questions to evaluate in {config.data}" + (" after filtering" if config.specialties else "")
        )
    return res.questions, len(res.skipped)


def evaluate(
    predictor: Predictor,
    questions: Sequence[Question],
    config: EvalConfig,
    out: str | Path,
    *,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    skipped: int = 0,
) -> Run:
    """Score every question under every shuffle into the run folder `out`, resuming if it exists."""
    if config.method not in METHODS:
        raise ClinqaError(f"unknown method {config.method!r}: use one of {', '.join(METHODS)}")
    if config.shuffles < 1:
        raise ClinqaError("--shuffles must be at least 1")
    if batch_size < 1:
        raise ClinqaError(f"--batch-size must be at least 1, got {batch_size}")
    if not questions:
        raise ClinqaError(f"no questions to evaluate in {config.data}")
    items = make_items(questions, config.shuffles, config.seed)
    scorer = SCORERS[config.method]

    def score(batch):
        return scorer(
            predictor,
            batch,
            max_new_tokens=config.max_new_tokens,
            seed=config.seed,
            **({"matcher": config.extra["matcher"]} if config.extra.get("matcher") else {}),
        )

    with Run.open(out, config, questions=questions) as run:  # holds the folder's lock until finished
        samples: list[Sample] = run_items(
            run,
            items,
            key=lambda it: (it.question.id, it.shuffle),
            score_batch=score,
            batch_size=batch_size,
            progress=progress,
        )
        run.finish(
            questions=len(questions),
            samples=len(samples),
            skipped_invalid=skipped,
            unparseable=sum(s.pred is None for s in samples),
            model_info=getattr(predictor, "info", None).__dict__
            if getattr(predictor, "info", None) is not None
            else {},
        )
    return run
