"""Fine-tuning the two record stages with LoRA, the sequential-training forgetting experiment, and the
training-set-size sweep.

    from clinqa.records.train import finetune_stages, StagesConfig
    stages = finetune_stages("default", train_records, train_questions, "adapters/records")
    # then: clinqa records eval default qa_test.jsonl --records test_patients --adapters adapters/records

Decisions:
- Stage 1 learns " yes"/" no" after the very prompt `LLMSelector` scores (`stage1_examples`: every
  relevant line plus sampled negatives, half of them of the positives' resource types); stage 2
  learns the cited reference answer after the chat-formatted stage-2 prompt (`stage2_examples`: the
  relevant lines among distractors). Both are `TextExample`s for `clinqa.adapt.lora.finetune`, so
  checkpoints, resume and metadata are the LoRA trainer's.
- Modes: "separate" (default: one adapter per stage, the paper's recommendation), "sequential"
  (stage 2 continues training the stage-1 adapter, the set-up in which the paper saw stage 1
  forgotten) and "multitask" (one adapter on both example sets, shuffled together). "sequential" also
  trains the reverse order (stage 1 continues a stage-2 adapter trained first), so `forgetting`
  measures both directions: stage-1 F1 before vs after stage 2, and stage-2 METEOR (and ROUGE-L) before
  vs after stage 1, on the gold relevant lines so that stage 2 is measured alone.
- The stage-1 threshold is tuned for micro F1 on held-out questions (`StagesConfig.tune_fraction` of
  the training questions, whose examples are never trained on): a classifier trained on 1:3
  positives to negatives is miscalibrated for a record where 1 line in 200 is relevant.
  They are written first, to `tune-questions.jsonl` in the output folder: tuning another selector
  on the same held-out questions (`records eval --tune`) compares like with like.
- `stages.json` in the output folder names the adapters and the threshold of the last run and
  `stages-MODE.json` those of each mode; `records eval --adapters` reads either. Several modes trained
  into one folder share the stage-1 adapter ("separate" and "sequential" train the same one).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from clinqa.adapt.lora import AdapterResult, LoraTrainConfig, TextExample, finetune, split_train_val
from clinqa.errors import ClinqaError
from clinqa.jsonl import read_appended
from clinqa.records.fhir import PatientRecord
from clinqa.records.metrics import stage1_metrics
from clinqa.records.pipeline import (
    ANSWER_SYSTEM,
    LLMSelector,
    _by_patient,
    _describe,
    _LineCache,
    _resource_type,
    _run_selector,
    evaluate_records,
    selection_examples,
    stage1_examples,
    stage2_examples,
    tune_threshold,
    tuning_key,
)
from clinqa.records.questions import RecordQuestion, read_questions, write_questions
from clinqa.records.selectors import matching_tuning
from clinqa.runs import append_lines, digest

MODES = ("separate", "sequential", "multitask")
STAGES_FILE = "stages.json"
TUNE_FILE = "tune-questions.jsonl"  # the held-out questions that tune the stage-1 threshold
RETUNED_FILE = "tuning-after-retuned.json"  # the threshold tuned again after stage 2 (`forgetting`)

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class StagesConfig:
    """How the two stages are trained.

    mode: "separate" | "sequential" | "multitask" (see the module docstring).
    lora: the LoRA settings of both stages (defaults below suit SmolLM2-135M on a CPU: rank 16, 3
        epochs; `max_length` must hold a stage-2 prompt with its lines).
    negatives, distractors: stage-1 negatives per positive, stage-2 distractor lines per question.
    tune_fraction, max_tune: share of the training questions (at most `max_tune`) held out to tune the
        stage-1 threshold (0: keep 0.5). Tuning scores every line of those questions' records, so a
        few questions cost as much as training; they give enough (positive, negative) pairs.
    seed: example sampling and the held-out choice (the LoRA seed is `lora.seed`)."""

    mode: str = "separate"
    lora: LoraTrainConfig = field(
        default_factory=lambda: LoraTrainConfig(rank=16, alpha=16, epochs=3, patience=1, batch_size=4, max_length=768)
    )
    negatives: int = 3
    distractors: int = 3
    tune_fraction: float = 0.1
    max_tune: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ClinqaError(f"StagesConfig.mode = {self.mode!r}: use one of {', '.join(MODES)}")
        if not 0 <= self.tune_fraction < 1:
            raise ClinqaError(f"StagesConfig.tune_fraction = {self.tune_fraction!r}: must be in [0, 1)")
        if self.negatives < 1 or self.distractors < 0:
            raise ClinqaError("StagesConfig: negatives must be >= 1 and distractors >= 0")


def stage_examples(records: Mapping[str, PatientRecord] | Sequence[PatientRecord], questions: Sequence[RecordQuestion],
                   stage: int, *, negatives: int = 3, distractors: int = 3, seed: int = 0) -> list[TextExample]:  # fmt: skip
    """The training examples of one stage as `TextExample`s (stage 1 plain prompts, stage 2 chat)."""
    if stage == 1:
        return [
            TextExample(
                id=f"{e['question_id']}|{e['resource_id']}", prompt=e["prompt"], target=e["target"], label="stage1"
            )
            for e in stage1_examples(records, questions, negatives=negatives, seed=seed)
        ]
    if stage == 2:
        return [
            TextExample(
                id=e["question_id"],
                prompt=e["prompt"],
                target=e["target"],
                system=ANSWER_SYSTEM,
                chat=True,
                label="stage2",
            )
            for e in stage2_examples(records, questions, distractors=distractors, seed=seed)
        ]
    raise ClinqaError(f"stage must be 1 or 2, got {stage}")


def _spec(base: Any) -> str:
    return str(base) if isinstance(base, (str, Path)) else base.info.spec


def with_adapter(base: Any, adapter: str | Path) -> Any:
    """`base` (a model spec, or a loaded LocalModel) with the adapter folder applied."""
    if isinstance(base, (str, Path)):
        from clinqa.adapt import load_predictor

        return load_predictor(f"{base}+lora:{adapter}")
    return base.load_adapter(adapter)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def finetune_stages(base: Any, records: Mapping[str, PatientRecord] | Sequence[PatientRecord],
                    questions: Sequence[RecordQuestion], out: str | Path, config: StagesConfig | None = None, *,
                    progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Train the stage adapters into `out` (resumable: finished adapters are reused, a killed one resumes)
    and tune the stage-1 threshold; returns and writes `out/stages.json`:
    {"mode", "base", "stage1": adapter folder, "stage2": adapter folder, "threshold", "tuning", ...}."""
    config = config or StagesConfig()
    out = Path(out)
    if not questions:
        raise ClinqaError("no training questions")
    by_patient = _by_patient(records)
    missing = sorted({q.patient_id for q in questions} - set(by_patient))
    if missing:
        raise ClinqaError(
            f"no record for patient(s) {', '.join(missing[:3])}: pass the records the training questions were made from"
        )
    train_q, tune_q = split_train_val(questions, config.tune_fraction, config.seed, max_val=config.max_tune)
    if tune_q:
        write_questions(out / TUNE_FILE, tune_q)
    ex1 = stage_examples(by_patient, train_q, 1, negatives=config.negatives, seed=config.seed)
    ex2 = stage_examples(by_patient, train_q, 2, distractors=config.distractors, seed=config.seed)

    def train(name: str, examples: list[TextExample], **kw) -> AdapterResult:
        def report(step: int, total: int, loss: float | None) -> None:
            if progress:
                progress(name, step, total)

        return finetune(base, examples, config.lora, out / name, progress=report, **kw)

    t0 = time.perf_counter()
    results: dict[str, AdapterResult] = {}
    if config.mode == "multitask":
        results["stage1"] = results["stage2"] = train("multitask", ex1 + ex2)
    else:
        results["stage1"] = train("stage1", ex1)
        if config.mode == "sequential":
            results["stage2"] = train("stage2-after-stage1", ex2, init_adapter=results["stage1"].path)
            # the reverse order: stage 2 first (from the base model), then stage 1 continues it
            results["reverse_stage2"] = train("stage2", ex2)
            results["reverse_stage1"] = train("stage1-after-stage2", ex1, init_adapter=results["reverse_stage2"].path)
        else:
            results["stage2"] = train("stage2", ex2)

    tuning: dict[str, Any] = {"threshold": 0.5, "questions": 0}
    if tune_q:
        key = [[q.id for q in tune_q], str(results["stage1"].path)]
        previous = [st["tuning"] for st in _all_stages(out) if st.get("tuning", {}).get("key") == key]
        if previous:  # the same stage-1 adapter was tuned on the same questions (an earlier run, or another mode)
            tuning = previous[0]
        else:
            selector = LLMSelector(with_adapter(base, results["stage1"].path))
            tuning = {
                **tune_threshold(selector, selection_examples(by_patient, tune_q)),
                "questions": len(tune_q),
                "key": key,
            }
    stages = {
        "format": 1, "mode": config.mode, "base": _spec(base),
        "stage1": str(results["stage1"].path), "stage2": str(results["stage2"].path),
        "threshold": tuning["threshold"], "tuning": tuning,
        "n_questions": len(train_q), "n_tune_questions": len(tune_q),
        "n_examples": {"stage1": len(ex1), "stage2": len(ex2)},
        "train_seconds": {k: r.metadata.get("train_seconds") for k, r in results.items()},
        "config": {**asdict(config), "lora": config.lora.to_dict()},
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    if "reverse_stage1" in results:
        stages["reverse"] = {
            "stage2": str(results["reverse_stage2"].path),
            "stage1_after_stage2": str(results["reverse_stage1"].path),
        }
    _write_json(out / f"stages-{config.mode}.json", stages)
    _write_json(out / STAGES_FILE, stages)
    return stages


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object written by this module, or {} when there is none or it is not readable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _all_stages(out: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted(out.glob("stages*.json"))] if out.is_dir() else []


def read_stages(path: str | Path) -> dict[str, Any]:
    """The `stages.json` of a folder written by `finetune_stages` (the folder or the file itself)."""
    path = Path(path)
    f = path / STAGES_FILE if path.is_dir() else path
    if not f.is_file():
        raise ClinqaError(f"{path} has no {STAGES_FILE}: train the stages with `clinqa records finetune` first")
    try:
        stages = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ClinqaError(f"{f} is not valid JSON: {exc}") from exc
    for key in ("stage1", "stage2"):  # the adapters live beside stages.json: find them wherever the folder moved
        if key not in stages:
            raise ClinqaError(f"{f}: no {key!r} adapter named")
        stages[key] = str(f.parent / Path(stages[key]).name)
    for key, folder in (stages.get("reverse") or {}).items():
        stages["reverse"][key] = str(f.parent / Path(folder).name)
    return stages


def stage_models(stages: Mapping[str, Any], base: Any = None) -> tuple[Any, Any]:
    """(stage-1 model, stage-2 model) of trained stages on `base` (a spec or a LocalModel; default: the
    spec they were trained on)."""
    base = base if base is not None else stages["base"]
    return with_adapter(base, stages["stage1"]), with_adapter(base, stages["stage2"])


# ----------------------------------------------------------------------------------- stage 1 alone


def evaluate_selection(selector: Any, records: Mapping[str, PatientRecord] | Sequence[PatientRecord],
                       questions: Sequence[RecordQuestion], *, out: str | Path | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Stage-1 precision/recall/F1 of `selector` without generating answers (the forgetting experiment
    needs only this). With `out` (a JSONL file) each question's selection is appended as it is made and
    a re-run skips the questions already there, made by the same selector (model, adapter, threshold)
    with the same relevant lines; anything else is selected again.

    A selector that exposes its scores (`run_scored`: the LLM selector) also gets a measure with no
    threshold: each question's average precision of its P(yes) ranking of every record line
    (`per_question[id]["ap"]`, `mean_ap` over the questions with relevant lines), which tells a model
    that lost the ranking from one whose probabilities merely moved past the tuned threshold."""
    by_patient = _by_patient(records)
    lines = _LineCache(by_patient)
    path = Path(out) if out else None
    settings = _row_settings(_describe(selector), getattr(selector, "predictor", None))
    rows = _resumed_rows(path, settings, "selection")
    scored = getattr(selector, "run_scored", None)
    scored = scored if callable(scored) else None
    todo = [
        q
        for q in questions
        if q.id not in rows
        or rows[q.id]["relevant_ids"] != list(q.relevant_ids)
        or (scored is not None and "ap" not in rows[q.id])  # rows written before the ranking was measured
    ]
    done = len(questions) - len(todo)
    if progress:
        progress(done, len(questions))
    for q in todo:
        record = by_patient[q.patient_id]
        scores = None
        if scored is not None:
            picked, tokens, scores = scored(q.question, lines[q.patient_id])
        else:
            picked, tokens = _run_selector(selector, q.question, lines[q.patient_id])
        ids = [s.id for s in picked]
        row = {
            "question_id": q.id,
            "qtype": q.qtype,
            "selected": ids,
            "relevant_ids": list(q.relevant_ids),
            "tokens": tokens,
            "types": {rid: _resource_type(record, rid) for rid in set(ids) | set(q.relevant_ids)},
        }
        if scores is not None:
            row["ap"] = _average_precision(lines[q.patient_id], scores, q.relevant_ids)
        rows[q.id] = row
        _append_row(path, row, settings[0])
        done += 1
        if progress:
            progress(done, len(questions))
    picked_rows = [rows[q.id] for q in questions]
    metrics = stage1_metrics(
        [r["selected"] for r in picked_rows],
        [r["relevant_ids"] for r in picked_rows],
        qtypes=[r["qtype"] for r in picked_rows],
        types=[r["types"] for r in picked_rows],
    )
    # per-question F1 (None where a question has no relevant lines), for paired before/after tests
    metrics["per_question"] = {
        r["question_id"]: {
            "f1": stage1_metrics([r["selected"]], [r["relevant_ids"]])["micro"]["f1"] if r["relevant_ids"] else None,
            "ap": r.get("ap"),
        }
        for r in picked_rows
    }
    aps = [r["ap"] for r in picked_rows if r.get("ap") is not None]
    metrics["mean_ap"] = sum(aps) / len(aps) if aps else None
    metrics["n_ap"] = len(aps)
    return metrics


def _average_precision(
    lines: Sequence[tuple[str, str]], scores: Sequence[float], relevant: Sequence[str]
) -> float | None:
    """Average precision of ranking a record's lines by `scores` against the relevant ones (scikit-learn's,
    ties in the score counted as one step); None when none of the record's lines is relevant."""
    from sklearn.metrics import average_precision_score

    rel = set(relevant)
    flags = [rid in rel for rid, _ in lines]
    return float(average_precision_score(flags, list(scores))) if any(flags) else None


def evaluate_answering(predictor: Any, records: Mapping[str, PatientRecord] | Sequence[PatientRecord],
                       questions: Sequence[RecordQuestion], *, out: str | Path | None = None, max_new_tokens: int = 64,
                       with_meteor: bool = True, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Stage 2 alone: each question answered from its gold relevant lines (an oracle stage 1), scored by
    METEOR (None without WordNet or with `with_meteor=False`) and ROUGE-L against the reference. With
    `out` (a JSONL file) each answer is appended as it is made and a re-run skips those there, made by
    the same model (adapter included) with the same settings and reference; anything else is answered
    again. Returns {"n", "meteor", "rouge_l", "per_question": {id: {"meteor", "rouge_l", "answer"}}}."""
    from clinqa.records.metrics import meteor as meteor_score
    from clinqa.records.metrics import rouge_l
    from clinqa.records.pipeline import answer

    wordnet = None
    if with_meteor:
        from clinqa.records.wordnet import ensure_wordnet

        wordnet = ensure_wordnet()
    by_patient = _by_patient(records)
    lines = _LineCache(by_patient)
    path = Path(out) if out else None
    described = {"model": predictor.info.spec, "max_new_tokens": max_new_tokens, "meteor": with_meteor}
    settings = _row_settings(described, predictor)
    rows = _resumed_rows(path, settings, "answer")
    todo = [q for q in questions if q.id not in rows or rows[q.id].get("reference") != q.answer]
    for i, q in enumerate(todo):
        gold = [(rid, text) for rid, text in lines[q.patient_id] if rid in set(q.relevant_ids)]
        text = answer(predictor, q.question, gold, max_new_tokens=max_new_tokens)
        row = {"question_id": q.id, "reference": q.answer, "answer": text, "rouge_l": rouge_l(q.answer, text),
               "meteor": meteor_score(q.answer, text, wordnet=wordnet) if with_meteor else None}  # fmt: skip
        rows[q.id] = row
        _append_row(path, row, settings[0])
        if progress:
            progress(len(questions) - len(todo) + i + 1, len(questions))
    per = {q.id: rows[q.id] for q in questions}
    mean = lambda k: (
        (sum(r[k] for r in per.values()) / len(per)) if per and all(r[k] is not None for r in per.values()) else None
    )  # noqa: E731
    return {"n": len(per), "meteor": mean("meteor"), "rouge_l": mean("rouge_l"), "per_question": per}


def _adapter_identity(predictor: Any) -> dict[str, str]:
    """{"adapter": hash of its weights} for a model with a LoRA adapter, else {}: its spec names the
    adapter's folder, so without this the rows of an adapter retrained in that folder would be taken
    for the old one's."""
    from clinqa.adapt.lora_adapter import weights_hash

    path = getattr(predictor, "adapter_path", None)
    if path is None or not (Path(path) / "adapter_model.safetensors").is_file():
        return {}
    return {"adapter": weights_hash(path)}


def _row_settings(described: dict[str, Any], predictor: Any) -> tuple[str, ...]:
    """The digests of `described` (settings with the model's spec under "model") that a row file
    accepts, the first the one new rows get: with the adapter's weights hash for a LoRA view, and the
    same with the base model's spec, which an adapter view's spec was before it named its adapter (the
    hash tells the adapter), so rows written then resume."""
    identity = _adapter_identity(predictor)
    now = digest({**described, **identity})
    if not identity:
        return (now,)
    return now, digest({**described, **identity, "model": predictor.with_adapter(None).info.spec})


def _resumed_rows(path: Path | None, settings: tuple[str, ...], what: str) -> dict[str, dict[str, Any]]:
    """The rows of a resumable JSONL file (`evaluate_selection`, `evaluate_answering`) made with one of
    these `settings` (`_row_settings`), by question id (the last one wins); a line torn by a kill is cut off."""
    if not path or not path.exists():
        return {}
    rows = read_appended(path, json.loads, corrupt=f"corrupt {what} line; delete the file and re-run")
    return {
        r["question_id"]: {k: v for k, v in r.items() if k != "settings"} for r in rows if r.get("settings") in settings
    }


def _append_row(path: Path | None, row: dict[str, Any], settings: str) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        append_lines(path, [json.dumps({**row, "settings": settings})])


def _paired(before: Mapping[str, Any], after: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """after - before per question (a drop is negative), mean with a bootstrap interval and p (evaluate.metrics)."""
    from clinqa.evaluate.metrics import bootstrap_mean_test

    ids = [q for q in before if q in after and before[q][key] is not None and after[q][key] is not None]
    if not ids:
        return None
    mean, lo, hi, p = bootstrap_mean_test([after[q][key] - before[q][key] for q in ids])
    return {"n": len(ids), "diff": mean, "ci_low": lo, "ci_high": hi, "p": p}


def _after_retuned(base: Any, stages: Mapping[str, Any], stages_dir: Path, tune_records: Any, records: Any,
                   questions: Sequence[RecordQuestion], progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:  # fmt: skip
    """`evaluate_selection` of the adapter after stage-2 training at a threshold tuned for it as the
    stage-1 threshold was (`tune_threshold` on the held-out training questions), with its "tuning";
    kept in RETUNED_FILE and reused for the same questions, selector and adapter weights."""
    selector = LLMSelector(with_adapter(base, stages["stage2"]))
    tune_q = read_questions(stages_dir / TUNE_FILE)
    examples = selection_examples(tune_records, tune_q)
    key = {**tuning_key(selector, examples), **_adapter_identity(selector.predictor)}
    earlier = _read_json(stages_dir / RETUNED_FILE)  # kept before a view's spec named its adapter: the base's
    as_before = {**key, "selector": {**key["selector"], "model": selector.predictor.with_adapter(None).info.spec}}
    previous = matching_tuning(earlier, key) or matching_tuning(earlier, as_before)
    if previous:
        tuning, selector.threshold = previous, previous["threshold"]
    else:
        tuning = {**tune_threshold(selector, examples), "questions": len(tune_q), **key}
        _write_json(stages_dir / RETUNED_FILE, tuning)
    result = evaluate_selection(selector, records, questions, out=stages_dir / "selection-after-retuned.jsonl",
                                progress=(lambda d, t: progress("after, re-tuned", d, t)) if progress else None)  # fmt: skip
    return {**result, "tuning": tuning}


def forgetting(base: Any, records: Mapping[str, PatientRecord] | Sequence[PatientRecord], questions: Sequence[RecordQuestion],
               stages_dir: str | Path, *, tune_records: Mapping[str, PatientRecord] | Sequence[PatientRecord] | None = None,
               progress: Callable[[str, int, int], None] | None = None, max_new_tokens: int = 64,
               with_meteor: bool = True) -> dict[str, Any]:  # fmt: skip
    """Both directions of forgetting in a "sequential" stages folder, on `questions`; written to
    `stages_dir/forgetting.json`.

    Forward: stage-1 F1 of the stage-1 adapter before and after stage-2 training continued it, both at
    the tuned threshold (`before`, `after`, `f1_drop` = before - after of the micro F1), and the
    paired per-question F1 change (`f1_change`: after - before over the questions with relevant lines,
    a bootstrap interval and p); the same for the average precision of each question's line ranking
    (`ap_change`; `mean_ap` before and after), which needs no threshold. With `tune_records` (the
    records of the training questions) the threshold is also tuned again for the adapter after stage 2,
    on the same held-out training questions (`tune-questions.jsonl`) and in the same way as before
    (`after_retuned`, with its `tuning`; `f1_change_retuned` against before): what a user who re-tunes
    gets back.
    Reverse (`reverse`, when the folder has the reverse adapters; re-run `records finetune --sequential`
    on an older folder to train them): stage-2 METEOR and ROUGE-L of the stage-2 adapter before and after
    stage-1 training continued it, each question answered from its gold lines, with the paired
    per-question change (after - before), a bootstrap interval and p."""
    stages_dir = Path(stages_dir)
    stages = read_stages(stages_dir)
    if stages["mode"] != "sequential":
        raise ClinqaError(
            f"{stages_dir} was trained in mode {stages['mode']!r}; the forgetting experiment needs --mode sequential"
        )
    out: dict[str, Any] = {"threshold": stages["threshold"], "n_questions": len(questions)}
    for name, adapter in (("before", stages["stage1"]), ("after", stages["stage2"])):
        selector = LLMSelector(with_adapter(base, adapter), threshold=stages["threshold"])
        out[name] = evaluate_selection(
            selector,
            records,
            questions,
            out=stages_dir / f"selection-{name}.jsonl",
            progress=(lambda d, t, n=name: progress(n, d, t)) if progress else None,
        )
    out["f1_drop"] = out["before"]["micro"]["f1"] - out["after"]["micro"]["f1"]
    out["f1_change"] = _paired(out["before"]["per_question"], out["after"]["per_question"], "f1")
    # the ranking with no threshold: a drop here is lost knowledge, not only probabilities moved past
    # the threshold tuned before stage 2
    out["ap_change"] = _paired(out["before"]["per_question"], out["after"]["per_question"], "ap")
    if tune_records is not None and (stages_dir / TUNE_FILE).is_file():
        out["after_retuned"] = _after_retuned(base, stages, stages_dir, tune_records, records, questions, progress)
        out["f1_change_retuned"] = _paired(out["before"]["per_question"], out["after_retuned"]["per_question"], "f1")
    reverse = stages.get("reverse")
    if reverse:
        rev: dict[str, Any] = {}
        for name, adapter in (("before", reverse["stage2"]), ("after", reverse["stage1_after_stage2"])):
            rev[name] = evaluate_answering(with_adapter(base, adapter), records, questions, out=stages_dir / f"answers-{name}.jsonl",
                                           max_new_tokens=max_new_tokens, with_meteor=with_meteor,
                                           progress=(lambda d, t, n=name: progress(f"stage 2 {n}", d, t)) if progress else None)  # fmt: skip
        for key in ("meteor", "rouge_l"):
            rev[f"{key}_change"] = _paired(rev["before"]["per_question"], rev["after"]["per_question"], key)
        out["reverse"] = rev
    _write_json(stages_dir / "forgetting.json", out)
    return out


# ----------------------------------------------------------------------------------- size sweep


def size_sweep(base: Any, train_records, train_questions: Sequence[RecordQuestion], test_records,
               test_questions: Sequence[RecordQuestion], sizes: Sequence[int | None], out: str | Path,
               config: StagesConfig | None = None, *, progress: Progress | None = None,
               max_new_tokens: int = 64) -> list[dict[str, Any]]:  # fmt: skip
    """Train the stages on the first n training questions for each n in `sizes` (None: all) and evaluate
    each pair of adapters on the test questions; returns (and writes to out/sweep.json, with a plot
    out/sweep.png) one row per size: stage-1 F1, METEOR, ROUGE-L, exact match, abstention. Every
    training and evaluation is resumable, so a killed sweep continues where it stopped."""
    out = Path(out)
    rows = []
    for size in sizes:
        n = len(train_questions) if size is None else min(int(size), len(train_questions))
        folder = out / f"n{n}"
        stages = finetune_stages(
            base, train_records, list(train_questions)[:n], folder / "adapters", config, progress=progress
        )
        stage1, stage2 = stage_models(stages, base)
        selector = LLMSelector(stage1, threshold=stages["threshold"])
        summary = evaluate_records(
            stage2,
            test_records,
            test_questions,
            selector=selector,
            out=folder / "run",
            max_new_tokens=max_new_tokens,
            progress=(lambda d, t, n=n: progress(f"eval n={n}", d, t)) if progress else None,
        )
        s2m = {k: v for k, v in summary["stage2"].items() if k != "by_qtype"}
        rows.append(
            {
                "n_questions": n,
                "n_examples": stages["n_examples"],
                "threshold": stages["threshold"],
                "stage1_f1": summary["stage1"]["micro"]["f1"],
                "stage2": s2m,
                "train_seconds": stages["train_seconds"],
            }
        )
        _write_json(out / "sweep.json", {"sizes": [r["n_questions"] for r in rows], "rows": rows})
    _plot_sweep(rows, out / "sweep.png")
    return rows


def _plot_sweep(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["n_questions"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, [r["stage1_f1"] for r in rows], "o-", label="stage-1 F1")
    for key, label in (("meteor", "stage-2 METEOR"), ("rouge_l", "stage-2 ROUGE-L")):
        ys = [r["stage2"].get(key) for r in rows]
        if all(y is not None for y in ys):
            ax.plot(xs, ys, "s--", label=label)
    ax.set_xlabel("training questions")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["MODES", "STAGES_FILE", "TUNE_FILE", "StagesConfig", "evaluate_answering", "evaluate_selection", "finetune_stages", "forgetting", "read_stages",
           "size_sweep", "stage_examples", "stage_models", "with_adapter"]  # fmt: skip
