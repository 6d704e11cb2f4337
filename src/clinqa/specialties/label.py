"""From annotations to a labelled question file, so unlabelled benchmarks feed the specialty commands.

MedQA and most benchmarks carry no specialty. ``clinqa annotate DATA --labelled OUT.jsonl`` writes
DATA back in clinqa's native JSONL with ``specialties`` filled in, and every per-specialty command
(``eval --specialty``, ``finetune --specialty``, ``experiment cross-specialty``) then runs on it.

A question's labels are its conformal set when a labelled calibration set was given (several labels
for cross-disciplinary questions, at a chosen error rate), otherwise its majority label when that
reached the vote threshold, otherwise none (the question is kept, unlabelled). What decided the
labels is kept in ``meta["specialty_annotation"]``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.specialties import conformal
from clinqa.specialties.annotate import SPECIALTY_IDS, Annotation
from clinqa.specialties.taxonomy import resolve_specialty

__all__ = [
    "ALL_SPECIALTIES_SPEC",
    "annotator_training_spec",
    "bundled_annotator",
    "conformal_sets",
    "embedding_annotations",
    "gold_labels",
    "labelled_questions",
    "minilm_config",
    "minilm_to_run",
]

# The bundled questions of all fifteen taxonomy specialties (the 204 clinical ones + the taxonomy set).
ALL_SPECIALTIES_SPEC = "bundled:all"


def annotator_training_spec(spec: str) -> str:
    """What the MiniLM annotator trains on for ``--train SPEC``: plain ``bundled`` means all fifteen specialties.

    ``bundled`` elsewhere is the 204 questions of the six experiment specialties (what the demo
    evaluates); an annotator trained on those alone puts nearly every question into the six, so for
    training the annotator it widens to ``bundled:all``. ``bundled:clinical`` still picks the six.
    """
    return ALL_SPECIALTIES_SPEC if spec.strip() == "bundled" else spec


def bundled_annotator(**kwargs: Any):
    """An ``EmbeddingAnnotator`` (kwargs passed on) fitted on the bundled questions of all fifteen specialties."""
    from clinqa.data.loaders import load_questions
    from clinqa.specialties.embed import EmbeddingAnnotator

    return EmbeddingAnnotator(**kwargs).fit(load_questions(ALL_SPECIALTIES_SPEC).questions)


def gold_labels(questions: Sequence[Question], where: str) -> list[list[str]]:
    """Every question's specialty ids; a question without any is an error naming it and ``where``."""
    out = []
    for q in questions:
        if not q.specialties:
            raise ClinqaError(
                f"{where}: question {q.id!r} has no specialties; calibration needs gold labels on every question"
            )
        out.append([resolve_specialty(s) for s in q.specialties])
    return out


def embedding_annotations(
    probs: np.ndarray, questions: Sequence[Question], p_none: Any = None, threshold: float = 0.5
) -> list[Annotation]:
    """``EmbeddingAnnotator.predict_proba`` rows as Annotations (one 'vote': the most probable label).

    p_none: the none gate's P(no specialty) per question (``none_gate.NoneGate.p_none``); where it
    reaches `threshold` the annotation keeps its votes and probabilities but gets no label."""
    probs = np.asarray(probs, dtype=float)
    if p_none is not None and len(p_none) != len(questions):
        raise ClinqaError(f"got {len(p_none)} none-gate scores for {len(questions)} questions")
    if probs.shape != (len(questions), len(SPECIALTY_IDS)):
        raise ClinqaError(
            f"expected probabilities of shape ({len(questions)}, {len(SPECIALTY_IDS)}), got {probs.shape}"
        )
    out = []
    for i, (q, row) in enumerate(zip(questions, probs)):
        top = SPECIALTY_IDS[int(np.argmax(row))]
        pn = None if p_none is None else float(p_none[i])
        out.append(
            Annotation(
                question_id=q.id,
                votes={top: 1},
                label=None if pn is not None and pn >= threshold else top,
                probs=[float(p) for p in row],
                per_prompt=[top],
                p_none=pn,
            )
        )
    return out


def _questions_digest(questions: Sequence[Question]) -> str:
    """A digest of what a classifier learns from: each question's id, text, options and specialties."""
    from clinqa.runs import digest

    return digest([[q.id, q.question, q.options, list(q.specialties)] for q in questions])


def minilm_config(
    annotator: Any,
    train: str,
    train_questions: Sequence[Question],
    none_from: tuple[str, Sequence[Question]] | None = None,
    none_threshold: float = 0.5,
) -> dict[str, Any]:
    """The settings that determine a MiniLM annotation: the classifier's parameters, its embedding
    model, the training spec and a digest of the training questions (id, text, options, specialties),
    and the none gate's examples and threshold where one is used."""
    from clinqa.specialties.annotate_store import FILE_FORMAT, FORMAT_VERSION

    config = {
        "annotator": "minilm",
        "format": FILE_FORMAT,
        "format_version": FORMAT_VERSION,
        "embedding_model": str(annotator.embedding_model),
        "include_options": bool(annotator.include_options),
        "params": {"C": annotator.C, "random_state": annotator.random_state, "max_iter": annotator.max_iter},
        "train": train,
        "n_train": len(train_questions),
        "train_questions": _questions_digest(train_questions),
    }
    if none_from is not None:  # only then: folders written without a gate keep their identity
        spec, qs = none_from
        config["none_gate"] = {
            "from": spec,
            "n": len(qs),
            "questions": _questions_digest(qs),
            "threshold": float(none_threshold),
        }
    return config


def minilm_to_run(
    out: Any,
    questions: Sequence[Question],
    train_questions: Sequence[Question],
    train: str,
    *,
    annotator: Any = None,
    notify: Any = None,
    none_from: tuple[str, Sequence[Question]] | None = None,
    none_threshold: float = 0.5,
) -> list[Annotation]:
    """MiniLM annotations of `questions` into the run folder `out` (``clinqa.specialties.annotate_store``),
    resuming by id; the annotator (an unfitted ``EmbeddingAnnotator`` by default) is fitted on
    `train_questions` (named `train` in the config) only if some question is still to annotate.

    none_from: (spec, hand-labelled questions) to fit the none gate on (``none_gate.fit_none_gate_on``,
    with `train_questions` as further in-taxonomy examples): a question whose P(none) reaches
    `none_threshold` gets no label."""
    from clinqa.specialties.annotate_store import annotate_into
    from clinqa.specialties.embed import EmbeddingAnnotator, embed_texts, question_text
    from clinqa.specialties.none_gate import fit_none_gate_on

    annotator = annotator if annotator is not None else EmbeddingAnnotator()
    by_id = {q.id: q for q in questions}
    gate: list = []

    def compute(batch: list[tuple[str, str]]) -> list[Annotation]:
        if annotator.coef_ is None:
            annotator.fit(train_questions)
        if none_from is not None and not gate:
            gate.append(
                fit_none_gate_on(
                    none_from[1],
                    train_questions,
                    threshold=none_threshold,
                    where=none_from[0],
                    model=annotator.model,
                    include_options=annotator.include_options,
                )
            )
        qs = [by_id[qid] for qid, _ in batch]
        if not gate:
            return embedding_annotations(annotator.predict_proba(qs), qs)
        emb = embed_texts([t for _, t in batch], batch_size=annotator.batch_size, model=annotator.model)
        return embedding_annotations(annotator.predict_proba_embeddings(emb), qs, gate[0].p_none(emb), none_threshold)

    items = [(q.id, question_text(q, include_options=annotator.include_options)) for q in questions]
    config = minilm_config(annotator, train, train_questions, none_from, none_threshold)
    return annotate_into(out, items, config, compute, batch_size=256, notify=notify)


def conformal_sets(
    cal_probs: Any, cal_gold: Sequence[Iterable[str]], probs: Any, alpha: float, mode: str = "any"
) -> tuple[list[list[str]], conformal.ConformalCalibration]:
    """Calibrate on one labelled set, return the label sets of another (most probable label first)."""
    cal = conformal.calibrate(np.asarray(cal_probs, dtype=float), list(cal_gold), alpha, mode=mode)
    return conformal.sets_to_labels(conformal.prediction_sets(np.asarray(probs, dtype=float), cal)), cal


def labelled_questions(
    questions: Sequence[Question], annotations: Sequence[Annotation], sets: Sequence[Sequence[str]] | None = None
) -> list[Question]:
    """``questions`` with ``specialties`` replaced by the conformal set (if given) or the kept majority
    label; none where the none gate left the question out."""
    by_id = {a.question_id: a for a in annotations}
    if sets is not None and len(sets) != len(questions):
        raise ClinqaError(f"got {len(sets)} label sets for {len(questions)} questions")
    out = []
    for i, q in enumerate(questions):
        a = by_id.get(q.id)
        if a is None:
            raise ClinqaError(f"question {q.id!r} has no annotation")
        gated = a.p_none is not None and a.label is None  # the none gate left it out: no set either
        labels = [] if gated else list(sets[i]) if sets is not None else ([a.label] if a.label else [])
        info = {
            "votes": dict(a.votes),
            "label": a.label,
            "labels_from": "none gate" if gated else "conformal set" if sets is not None else "majority vote",
        }
        if a.p_none is not None:
            info["p_none"] = a.p_none
        if q.specialties:
            info["original_specialties"] = list(q.specialties)
        out.append(q.model_copy(update={"specialties": labels, "meta": {**q.meta, "specialty_annotation": info}}))
    return out
