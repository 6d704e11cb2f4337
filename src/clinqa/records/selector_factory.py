"""The one place a stage-1 selector is built from settings: `clinqa records ask/eval` and the HTTP service
(``selector_mode``/``selector_top_k``, and ``adapters`` in `clinqa.serve.runner.load_models`) all call
`make_selector`, so equal settings give equal selectors (same class, same `describe()`).

    make_selector("bm25", top_k=8)                          # RetrievalSelector("bm25", top_k=8)
    make_selector("embedding", top_k=8)                     # RetrievalSelector("embedding", top_k=8)
    make_selector("llm", predictor=model, threshold=0.4)    # LLMSelector(model, threshold=0.4)
    make_selector("full")                                   # FullRecordBaseline()
    make_selector("finetuned", base="default", adapters="runs/ft")
    # LLMSelector(load_predictor("default+lora:runs/ft/<stage 1>"), threshold=<the tuned one of stages.json>)

This module sits beside `clinqa.records.selectors` rather than in it because the fine-tuned kind reads
`records finetune`'s stages.json (`clinqa.records.train.read_stages`), and train imports the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from clinqa.errors import ClinqaError
from clinqa.models.base import Predictor
from clinqa.records.selectors import FullRecordBaseline, LLMSelector, RetrievalSelector, Selector

SELECTOR_KINDS = ("bm25", "embedding", "llm", "full", "finetuned")
DEFAULT_TOP_K = 8  # lines a retrieval selector keeps (the CLI's and the service's default)
DEFAULT_THRESHOLD = 0.5  # P(yes) threshold of an llm selector when none is given


def make_selector(
    kind: str,
    *,
    predictor: Predictor | None = None,
    top_k: int | None = DEFAULT_TOP_K,
    threshold: float | None = None,
    min_lines: int = 0,
    adapters: str | Path | None = None,
    base: str | None = None,
    load: Callable[[str], Predictor] | None = None,
) -> Selector:
    """The stage-1 selector of `kind` (one of SELECTOR_KINDS):

    - "bm25" / "embedding": `RetrievalSelector(kind, top_k=top_k)`;
    - "llm": `LLMSelector(predictor, threshold)` (threshold 0.5 when None);
    - "full": `FullRecordBaseline()`;
    - "finetuned": the stage 1 of a `clinqa records finetune` folder `adapters` on the model spec `base`:
      `LLMSelector` on ``base+lora:<stage-1 adapter>``, loaded with `load` (default
      `clinqa.adapt.load_predictor`), with the tuned threshold of its stages.json unless `threshold`
      is given.

    `top_k` is the retrieval selectors' setting, `threshold` and `min_lines` (the fewest lines an LLM
    selector keeps, `LLMSelector`) the LLM selectors'; the other kinds ignore them. A bad kind or
    setting is a one-line ClinqaError."""
    if kind not in SELECTOR_KINDS:
        raise ClinqaError(f"unknown selector {kind!r}: use {', '.join(SELECTOR_KINDS[:-1])} or {SELECTOR_KINDS[-1]}")
    if adapters is not None and kind != "finetuned":
        raise ClinqaError(f"adapters are the fine-tuned stage 1: use the selector 'finetuned', not {kind!r}")
    if kind == "finetuned":
        try:
            return _finetuned(adapters, base, threshold, load, min_lines)
        except ValueError as exc:
            raise ClinqaError(f"selector {kind!r}: {exc}") from exc
    try:
        if kind in ("bm25", "embedding"):
            return RetrievalSelector(kind, top_k=top_k)
        if kind == "full":
            return FullRecordBaseline()
        if predictor is None:
            raise ClinqaError("the llm selector needs a model (predictor) to score the record lines")
        return LLMSelector(
            predictor, threshold=DEFAULT_THRESHOLD if threshold is None else threshold, min_lines=min_lines
        )
    except ValueError as exc:  # the selectors' own checks (threshold range, top_k) as one line
        raise ClinqaError(f"selector {kind!r}: {exc}") from exc


def _finetuned(
    adapters: str | Path | None,
    base: str | None,
    threshold: float | None,
    load: Callable[[str], Predictor] | None,
    min_lines: int = 0,
) -> LLMSelector:
    if adapters is None or not base:
        raise ClinqaError(
            "the finetuned selector needs a `records finetune` folder (adapters; --adapters DIR) and its base model"
        )
    from clinqa.records.train import read_stages

    stages = read_stages(adapters)
    if threshold is None:
        if "threshold" not in stages:
            raise ClinqaError(f"{adapters}: stages.json has no tuned 'threshold': give one")
        threshold = stages["threshold"]
    try:
        threshold = float(threshold)
    except (TypeError, ValueError) as exc:
        raise ClinqaError(f"{adapters}: stages.json's threshold {threshold!r} is not a number") from exc
    if not 0.0 <= threshold <= 1.0:
        raise ClinqaError(f"{adapters}: the stage-1 threshold must be in [0, 1], got {threshold}")
    if load is None:
        from clinqa.adapt import load_predictor as load  # looked up now, so a patched loader is honoured
    if min_lines < 0:  # before loading the model
        raise ValueError(f"min_lines must be between 0 and max_lines, got {min_lines}")
    return LLMSelector(load(f"{base}+lora:{stages['stage1']}"), threshold=threshold, min_lines=min_lines)


__all__ = ["DEFAULT_THRESHOLD", "DEFAULT_TOP_K", "SELECTOR_KINDS", "make_selector"]
