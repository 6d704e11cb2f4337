"""Specialty annotation with a language model: several prompts vote, constrained to the taxonomy.

How a question is labelled
--------------------------
* Each of ``PROMPTS`` (five differently worded templates) is filled with the question stem. The 15
  specialty display names (``" Cardiology"``, ``" Obstetrics & gynecology"``, ...) are then SCORED as
  continuations of that prompt with ``Predictor.score_continuations`` -- one group per
  (question, prompt), so a backend computes the shared prompt prefix once. Nothing is generated and
  no free text is parsed: the answer is always one of the 15 taxonomy labels.
* A label's score is its **per-token** length-normalised log-likelihood, ``logprob / n_tokens``
  (``norm="token"``, the default; ``norm="char"`` divides by the continuation's characters instead,
  lm-eval's ``acc_norm``), so names such as "Obstetrics & gynecology" are not penalised just for
  being several tokens long. (On the bundled set the raw sum, uncalibrated, happened to do about as
  well as the default -- 0.62 vs 0.60 accuracy -- so this is a principled choice, not a measured win.)
* Contextual calibration (Zhao et al. 2021, "Calibrate before use"), on by default: the same labels
  are scored once per prompt with the content-free question ``"N/A"`` and that score is subtracted
  from every question's label scores, removing the prompt's prior preference for some label names.
  On the 204 bundled clinical questions with the embedded SmolLM2-135M model it raised the
  majority-label accuracy (label among the gold specialties, every question covered) from 0.34 to
  0.60 with per-token normalisation; uncalibrated, most questions went to "Obstetrics & gynecology".
  With per-character normalisation it hurt (0.50 -> 0.41), so per-token + calibration is the default.
* Per prompt, a softmax over the 15 (calibrated) scores gives label probabilities and the argmax is
  that prompt's vote. ``Annotation.probs`` is the mean of the per-prompt softmaxes (taxonomy order);
  the majority label wins, ties broken by the mean probability; it becomes ``Annotation.label`` only
  when it has at least ``min_votes`` votes, otherwise the question is left unlabelled (``None``).

``tradeoff_table`` shows what the vote threshold buys: coverage against accuracy. ``conformal_from_probs``
turns the mean probabilities (or ``EmbeddingAnnotator`` probabilities) into split-conformal label
sets with an empirical coverage check. ``annotate_to_run`` is the resumable form of ``annotate``: it
writes a run folder of the one run store (``clinqa.specialties.annotate_store``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from clinqa.errors import ClinqaError
from clinqa.models.base import Predictor
from clinqa.specialties import conformal
from clinqa.specialties.annotate_store import (  # noqa: F401  (read_annotations, write_annotations: part of this module's API)
    FILE_FORMAT,
    FORMAT_VERSION,
    annotate_into,
    read_annotations,
    write_annotations,
)
from clinqa.specialties.taxonomy import SPECIALTIES, resolve_specialty
from clinqa.specialties.votes import SPECIALTY_IDS, Annotation, _majority  # noqa: F401  (part of this module's API)

__all__ = [
    "CONTENT_FREE",
    "DEFAULT_CALIBRATE",
    "NORMS",
    "PROMPTS",
    "SPECIALTY_IDS",
    "Annotation",
    "annotate",
    "annotate_to_file",
    "annotate_to_run",
    "annotations_from_scores",
    "conformal_from_probs",
    "content_free_scores",
    "label_continuations",
    "read_annotations",
    "score_labels",
    "tradeoff_table",
    "write_annotations",
]


# Each template has one {q}; the label is scored right after it (a leading space is added to the label).
# Chosen from nine candidates by their accuracy on the bundled questions with the embedded model
# (dropped: "Q: Which medical specialty does this question belong to? A:", "... a specialist in",
# "Topic:", "Subject area:"), so numbers measured on that same set are slightly optimistic.
PROMPTS: tuple[str, ...] = (
    "Question: {q}\nThis question is mainly about the medical specialty of",
    "A patient case: {q}\nWhich department should handle this case? Department:",
    "The following is a medical exam question.\n{q}\nThe clinical specialty this question tests is",
    "Specialties: " + ", ".join(s.name for s in SPECIALTIES) + ".\nQuestion: {q}\nSpecialty:",
    "Case: {q}\nThis patient should be referred to the department of",
)

CONTENT_FREE = "N/A"  # the content-free question of contextual calibration (Zhao et al. 2021)
NORMS = ("token", "char")
DEFAULT_CALIBRATE = True  # bundled set, embedded model, norm="token": accuracy 0.60 calibrated vs 0.34 not


# --------------------------------------------------------------------------------------------------
# Checks


def _check_n_prompts(n_prompts: Any) -> int:
    if (
        isinstance(n_prompts, bool)
        or not isinstance(n_prompts, (int, np.integer))
        or not 1 <= n_prompts <= len(PROMPTS)
    ):
        raise ClinqaError(
            f"n_prompts must be an integer from 1 to {len(PROMPTS)} (there are {len(PROMPTS)} prompts), got {n_prompts!r}"
        )
    return int(n_prompts)


def _check_min_votes(min_votes: Any, n_prompts: int) -> int:
    if isinstance(min_votes, bool) or not isinstance(min_votes, (int, np.integer)) or min_votes < 1:
        raise ClinqaError(f"min_votes must be a positive integer, got {min_votes!r}")
    if min_votes > n_prompts:
        raise ClinqaError(
            f"min_votes={min_votes} can never be reached with n_prompts={n_prompts}: "
            f"use min_votes <= n_prompts (e.g. a majority, {n_prompts // 2 + 1})"
        )
    return int(min_votes)


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ClinqaError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return norm


def _id_and_text(item: Any, i: int) -> tuple[str, str]:
    """A Question (or anything with .id and .question), an (id, text) pair or a bare string (id = its index)."""
    if isinstance(item, str):
        qid, text = str(i), item
    elif isinstance(item, tuple) and len(item) == 2:
        qid, text = item
    elif hasattr(item, "question") and hasattr(item, "id"):
        qid, text = item.id, item.question
    else:
        raise ClinqaError(
            f"question {i}: expected a Question, an (id, text) pair or a string, got {type(item).__name__}"
        )
    if not isinstance(text, str) or not text.strip():
        raise ClinqaError(f"question {qid!r} (item {i}) has empty text: there is nothing to annotate; drop or fix it")
    if qid is None or not str(qid).strip():
        raise ClinqaError(f"question item {i} has no id")
    return str(qid), text


# --------------------------------------------------------------------------------------------------
# Scoring


def label_continuations() -> list[str]:
    """The continuations scored after each prompt: every specialty's display name, with a leading space."""
    return [" " + s.name for s in SPECIALTIES]


def _normalise(scores: Sequence, norm: str) -> np.ndarray:
    if norm == "token":
        return np.array([s.logprob / max(s.n_tokens, 1) for s in scores], dtype=np.float64)
    return np.array([s.logprob / max(s.n_chars, 1) for s in scores], dtype=np.float64)


def _score_texts(predictor: Predictor, texts: Sequence[str], n_prompts: int, norm: str) -> np.ndarray:
    conts = label_continuations()
    groups = [(PROMPTS[p].format(q=t.strip()), conts) for t in texts for p in range(n_prompts)]
    if not groups:
        return np.zeros((0, n_prompts, len(conts)), dtype=np.float64)
    scored = predictor.score_continuations(groups)
    if len(scored) != len(groups) or any(len(s) != len(conts) for s in scored):
        raise ClinqaError("the model returned a different number of scores than label continuations asked for")
    out = np.stack([_normalise(s, norm) for s in scored])
    return out.reshape(len(texts), n_prompts, len(conts))


def score_labels(
    predictor: Predictor,
    questions: Sequence[Any],
    *,
    n_prompts: int = len(PROMPTS),
    norm: str = "token",
    batch_size: int = 8,
) -> np.ndarray:
    """Length-normalised label log-likelihoods [n_questions, n_prompts, 15] (taxonomy order).

    One ``score_continuations`` call per batch of ``batch_size`` questions, holding one group per
    (question, prompt) whose continuations are ``label_continuations()``.
    """
    n_prompts = _check_n_prompts(n_prompts)
    _check_norm(norm)
    texts = [_id_and_text(q, i)[1] for i, q in enumerate(questions)]
    parts = [
        _score_texts(predictor, texts[s : s + batch_size], n_prompts, norm)
        for s in range(0, len(texts), max(1, batch_size))
    ]
    return np.concatenate(parts) if parts else np.zeros((0, n_prompts, len(SPECIALTY_IDS)))


def content_free_scores(predictor: Predictor, *, n_prompts: int = len(PROMPTS), norm: str = "token") -> np.ndarray:
    """[n_prompts, 15]: the label scores of each prompt filled with the content-free question ``"N/A"``."""
    return _score_texts(predictor, [CONTENT_FREE], _check_n_prompts(n_prompts), _check_norm(norm))[0]


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def annotations_from_scores(
    ids: Sequence[str], scores: np.ndarray, *, min_votes: int = 3, content_free: np.ndarray | None = None
) -> list[Annotation]:
    """Votes, labels and mean probabilities from label scores [n, n_prompts, 15] (see ``score_labels``).

    ``content_free`` [n_prompts, 15] (see ``content_free_scores``) is subtracted first when given.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[2] != len(SPECIALTY_IDS) or scores.shape[0] != len(ids):
        raise ClinqaError(f"scores must have shape ({len(ids)}, n_prompts, {len(SPECIALTY_IDS)}), got {scores.shape}")
    n_prompts = scores.shape[1]
    min_votes = _check_min_votes(min_votes, n_prompts)
    if content_free is not None:
        cf = np.asarray(content_free, dtype=np.float64)
        if cf.shape != scores.shape[1:]:
            raise ClinqaError(f"content_free must have shape {scores.shape[1:]}, got {cf.shape}")
        scores = scores - cf[None]
    probs = _softmax(scores)  # [n, P, 15]
    mean = probs.mean(axis=1)
    out: list[Annotation] = []
    for i, qid in enumerate(ids):
        top = [SPECIALTY_IDS[int(k)] for k in probs[i].argmax(axis=-1)]
        counts: dict[str, int] = {}
        for sid in top:
            counts[sid] = counts.get(sid, 0) + 1
        votes = dict(sorted(counts.items(), key=lambda kv: (-kv[1], -mean[i, SPECIALTY_IDS.index(kv[0])])))
        row = [float(p) for p in mean[i]]
        major = _majority(votes, row)
        out.append(Annotation(str(qid), votes, major if votes[major] >= min_votes else None, row, top))
    return out


# --------------------------------------------------------------------------------------------------
# Annotating


def _check_args(n_prompts: Any, min_votes: Any, norm: str, batch_size: Any) -> tuple[int, int]:
    n_prompts = _check_n_prompts(n_prompts)
    min_votes = _check_min_votes(min_votes, n_prompts)
    _check_norm(norm)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ClinqaError(f"batch_size must be a positive integer, got {batch_size!r}")
    return n_prompts, min_votes


def annotate(
    predictor: Predictor,
    questions: Sequence[Any],
    *,
    n_prompts: int = len(PROMPTS),
    min_votes: int = 3,
    calibrate: bool = DEFAULT_CALIBRATE,
    norm: str = "token",
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> list[Annotation]:
    """Label each question with a specialty by majority vote over the first ``n_prompts`` prompts.

    questions: ``Question``s (or (id, text) pairs, or strings identified by their index); only the
      stem is shown to the model. Empty or whitespace-only text is refused.
    min_votes: votes the majority label needs to become ``label`` (else the question is left None).
    calibrate: subtract each label's score under the content-free question "N/A" (contextual calibration).
    norm: "token" (default) or "char" length normalisation of label log-likelihoods.
    batch_size: questions per ``score_continuations`` call (each brings ``n_prompts`` groups).
    progress: called as ``progress(done, total)`` at the start and after every batch.
    """
    n_prompts, min_votes = _check_args(n_prompts, min_votes, norm, batch_size)
    items = [_id_and_text(q, i) for i, q in enumerate(questions)]
    total = len(items)
    if progress:
        progress(0, total)
    if not items:
        return []
    from clinqa.specialties.annotate_generate import annotate_by_generation, scores_labels

    if not scores_labels(predictor):  # a chat-only server: constrained generated answers vote instead
        return annotate_by_generation(
            predictor, items, PROMPTS[:n_prompts], min_votes=min_votes, batch_size=batch_size, progress=progress
        )
    cf = content_free_scores(predictor, n_prompts=n_prompts, norm=norm) if calibrate else None
    out: list[Annotation] = []
    for s in range(0, total, batch_size):
        batch = items[s : s + batch_size]
        scores = _score_texts(predictor, [t for _, t in batch], n_prompts, norm)
        out += annotations_from_scores([qid for qid, _ in batch], scores, min_votes=min_votes, content_free=cf)
        if progress:
            progress(len(out), total)
    return out


# --------------------------------------------------------------------------------------------------
# Run folders (clinqa.specialties.annotate_store)


def _config(predictor: Predictor, n_prompts: int, min_votes: int, calibrate: bool, norm: str) -> dict[str, Any]:
    """The settings of a vote annotation, as format 1 recorded them on every line of its file."""
    info = getattr(predictor, "info", None)
    model = getattr(info, "spec", None) or getattr(info, "name", None) or type(predictor).__name__
    adapter = (getattr(info, "extra", None) or {}).get("adapter") if info is not None else None
    prompts = hashlib.sha256(json.dumps([PROMPTS[:n_prompts], label_continuations()]).encode()).hexdigest()[:12]
    return {
        "format": FILE_FORMAT,
        "model": str(model),
        "adapter": adapter,
        "n_prompts": n_prompts,
        "min_votes": min_votes,
        "calibrate": bool(calibrate),
        "norm": norm,
        "prompts": prompts,
    }


def annotate_to_run(
    predictor: Predictor,
    questions: Sequence[Any],
    out: str | Path,
    *,
    n_prompts: int = len(PROMPTS),
    min_votes: int = 3,
    calibrate: bool = DEFAULT_CALIBRATE,
    norm: str = "token",
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    legacy_file: str | Path | None = None,
    notify: Callable[[str], None] | None = None,
) -> list[Annotation]:
    """``annotate`` into the run folder `out` (``OUT/run.json`` + ``OUT/samples.jsonl``), resuming by id.

    Each finished batch is appended (fsynced), so re-running the same call after a kill loses at most
    one batch and scores only the questions not yet in the folder; the folder is locked while written.
    The settings (model, adapter, prompts, min_votes, calibrate, norm) are the run's config and the
    questions' texts its data: other settings or a changed question text are refused, naming what
    differs. An annotation file of format 1 at `out` (or at `legacy_file` while `out` does not exist)
    is migrated (see ``clinqa.specialties.annotate_store``). Returns the annotations of ``questions``
    in their order.
    """
    n_prompts, min_votes = _check_args(n_prompts, min_votes, norm, batch_size)
    items = [_id_and_text(q, i) for i, q in enumerate(questions)]
    legacy = _config(predictor, n_prompts, min_votes, calibrate, norm)
    config = {"annotator": "llm-vote", **legacy, "format_version": FORMAT_VERSION}
    cf: list[np.ndarray | None] = []  # the content-free scores, computed once, only if something is scored

    def compute(batch: list[tuple[str, str]]) -> list[Annotation]:
        if not cf:
            cf.append(content_free_scores(predictor, n_prompts=n_prompts, norm=norm) if calibrate else None)
        scores = _score_texts(predictor, [t for _, t in batch], n_prompts, norm)
        return annotations_from_scores([qid for qid, _ in batch], scores, min_votes=min_votes, content_free=cf[0])

    return annotate_into(
        out,
        items,
        config,
        compute,
        legacy_config=legacy,
        legacy_file=legacy_file,
        batch_size=batch_size,
        progress=progress,
        notify=notify,
    )


annotate_to_file = annotate_to_run  # the name from when the output was one JSONL file


# --------------------------------------------------------------------------------------------------
# Evaluation


def _gold_by_id(questions: Iterable[Any] | None) -> dict[str, set[str]]:
    gold: dict[str, set[str]] = {}
    for q in questions or []:
        labels = getattr(q, "specialties", None) or []
        if labels:
            gold[str(q.id)] = {resolve_specialty(s) for s in labels}
    return gold


def tradeoff_table(
    annotations: Sequence[Annotation], questions: Sequence[Any] | None = None, *, n_prompts: int | None = None
) -> list[dict[str, Any]]:
    """The accuracy/coverage trade-off of the vote threshold, one row per threshold t = 1..n_prompts.

    coverage: share of annotated questions whose top (majority) label has at least t votes.
    accuracy: among covered questions with gold ``specialties`` (matched by id), the share whose top
    label is one of them (None when none is covered); accuracy_primary counts only the first gold label.
    n_prompts defaults to the largest number of prompts among the annotations.
    """
    annotations = list(annotations)
    if not annotations:
        raise ClinqaError("tradeoff_table needs at least one annotation")
    if n_prompts is None:
        n_prompts = max(a.n_prompts for a in annotations)
    gold = _gold_by_id(questions)
    primary = {
        str(q.id): resolve_specialty(q.specialties[0]) for q in questions or [] if getattr(q, "specialties", None)
    }
    rows = []
    n = len(annotations)
    for t in range(1, int(n_prompts) + 1):
        covered = [a for a in annotations if a.top_votes >= t]
        judged = [a for a in covered if a.question_id in gold]
        correct = sum(a.top_label in gold[a.question_id] for a in judged)
        correct_primary = sum(a.top_label == primary[a.question_id] for a in judged)
        rows.append(
            {
                "min_votes": t,
                "n": n,
                "covered": len(covered),
                "coverage": len(covered) / n,
                "n_gold": len(judged),
                "correct": correct,
                "accuracy": correct / len(judged) if judged else None,
                "accuracy_primary": correct_primary / len(judged) if judged else None,
            }
        )
    return rows


def conformal_from_probs(
    probs: Any,
    gold: Sequence[Iterable[int | str]],
    alpha: float,
    cal_fraction: float = 0.5,
    seed: int = 0,
    mode: str = "any",
) -> dict[str, Any]:
    """Split-conformal label sets: calibrate on a random ``cal_fraction`` of items, evaluate on the rest.

    probs: [n, 15] class probabilities in taxonomy order -- ``Annotation.probs`` (a list of
      Annotations is accepted as is) or ``EmbeddingAnnotator.predict_proba`` -- or [n, K] with gold as
      column indices. gold: per item, its gold labels (specialty ids/aliases or column indices).
    Returns the calibration (qhat, threshold), split sizes and the held-out metrics: ``coverage``
    (at least one gold label for mode "any", all of them for mode "all"), coverage_any, coverage_all,
    mean_set_size, precision, recall, plus ``target`` = 1 - alpha.
    """
    if isinstance(probs, (list, tuple)) and probs and isinstance(probs[0], Annotation):
        probs = [a.probs for a in probs]
    p = np.asarray(probs, dtype=np.float64)
    gold = list(gold)
    if p.ndim != 2 or len(p) != len(gold):
        raise ClinqaError(
            f"got probabilities of shape {p.shape} for {len(gold)} gold label sets: need one row per item"
        )
    cal_idx, test_idx = conformal.split(len(p), cal_fraction, seed)
    cal = conformal.calibrate(p[cal_idx], [gold[i] for i in cal_idx], alpha, mode=mode)
    sets = conformal.prediction_sets(p[test_idx], cal)
    metrics = conformal.evaluate_sets(sets, [gold[i] for i in test_idx])
    return {
        "alpha": float(alpha),
        "target": 1.0 - float(alpha),
        "mode": mode,
        "qhat": cal.qhat,
        "threshold": cal.threshold,
        "n_cal": len(cal_idx),
        "n_test": len(test_idx),
        "coverage": metrics.coverage_any if mode == "any" else metrics.coverage_all,
        **metrics.to_dict(),
    }
