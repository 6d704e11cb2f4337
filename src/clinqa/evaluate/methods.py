"""Scoring methods: one function each, all taking a batch of shown questions and returning Samples.

- letter:   next-token log-probabilities of " A", " B", ... after the MMLU prompt (one forward pass).
- option:   log-likelihood of each option's text after the cloze prompt, sum (lm-eval acc) and
            per-character normalised (acc_norm); the question prefix is computed once per question.
- generate: free generation with the chat template, then answer extraction; unparseable is counted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from clinqa.data.schema import Question
from clinqa.evaluate import prompts, shuffle
from clinqa.evaluate.sample import Sample
from clinqa.models.base import GenerationConfig, Predictor, annotations_of
from clinqa.models.truncation import truncated_flags, watch_truncation

METHODS = ("letter", "option", "generate")


@dataclass(frozen=True)
class Item:
    """A question under one shuffle, as shown to the model."""

    question: Question
    shuffle: int
    permutation: list[int]
    options: dict[str, str]
    gold: str
    to_original: dict[str, str]


def make_items(questions: Sequence[Question], shuffles: int, seed: int) -> list[Item]:
    items = []
    for q in questions:
        for k, perm in enumerate(shuffle.permutations(q.id, shuffles, len(q.options), seed)):
            shown, gold, to_original = shuffle.apply(q, perm)
            items.append(Item(q, k, perm, shown, gold, to_original))
    return items


def _softmax(x: Sequence[float]) -> list[float]:
    a = np.asarray(x, dtype=np.float64)
    if not np.isfinite(a).any():
        return [1.0 / len(a)] * len(a)
    e = np.exp(a - np.max(a[np.isfinite(a)]))
    e[~np.isfinite(a)] = 0.0
    return (e / e.sum()).tolist()


def annotations(predictor: Predictor, prompt: str) -> dict:
    """Extras a wrapping predictor wants recorded for a prompt (retrieved passage ids, steering
    vector chosen, reasoning steps, ...): its `annotations(prompt)` when it is `Annotates`, else {}."""
    return annotations_of(predictor, prompt)


def _sample(
    item: Item,
    method: str,
    pred: str | None,
    scores: dict,
    probs: dict,
    extras: dict,
    latency: float,
    truncated: bool = False,
) -> Sample:
    q = item.question
    harmful = q.meta.get("harmful_options")
    if harmful:
        back = {o: s for s, o in item.to_original.items()}
        extras = {**extras, "harmful_options": [back[h] for h in harmful if h in back]}
    if q.meta.get("statement") and isinstance(q.meta.get("reassuring"), bool):
        # a true/false statement: whether it is a comforting claim (false reassurance is counted on these)
        extras = {**extras, "reassuring": q.meta["reassuring"]}
    return Sample(
        question_id=q.id,
        shuffle=item.shuffle,
        permutation=item.permutation,
        options=item.options,
        gold=item.gold,
        pred=pred,
        correct=pred == item.gold,
        method=method,
        scores=scores,
        probs=probs,
        specialties=list(q.specialties),
        source=q.source,
        extras=extras,
        latency_s=latency,
        truncated=truncated,
    )


def score_letter(predictor: Predictor, items: Sequence[Item], **_) -> list[Sample]:
    t0 = time.perf_counter()
    out: list[Sample] = []
    # group by option count: the candidate set must be the same within one call
    by_n: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_n.setdefault(len(it.options), []).append(i)
    results: dict[int, Sample] = {}
    for _n, idx in by_n.items():
        letters = list(items[idx[0]].options)
        texts = [prompts.letter_prompt(items[i].question, items[i].options) for i in idx]
        with watch_truncation() as notes:
            lp = predictor.next_token_logprobs(texts, [f" {l}" for l in letters])
        cut = truncated_flags(notes, texts)
        per = (time.perf_counter() - t0) / max(len(items), 1)
        for row, i in enumerate(idx):
            scores = dict(zip(letters, map(float, lp[row])))
            pred = max(scores, key=scores.get) if any(math.isfinite(v) for v in scores.values()) else None
            results[i] = _sample(
                items[i],
                "letter",
                pred,
                scores,
                dict(zip(letters, _softmax(lp[row]))),
                annotations(predictor, texts[row]),
                per,
                cut[row],
            )
    out = [results[i] for i in range(len(items))]
    return out


def score_option(predictor: Predictor, items: Sequence[Item], **_) -> list[Sample]:
    t0 = time.perf_counter()
    groups = [(prompts.cloze_prompt(it.question), [" " + v for v in it.options.values()]) for it in items]
    with watch_truncation() as notes:
        scored = predictor.score_continuations(groups)
    cut = truncated_flags(notes, [ctx for ctx, _ in groups])
    per = (time.perf_counter() - t0) / max(len(items), 1)
    out = []
    for it, (ctx, _), conts, was_cut in zip(items, groups, scored, cut):
        letters = list(it.options)
        sums = [c.logprob for c in conts]
        # lm-eval's acc_norm divides by the character length of the choice text (without the space)
        norms = [c.logprob / max(len(v), 1) for c, v in zip(conts, it.options.values())]
        pred_norm = letters[int(np.argmax(norms))]
        pred_sum = letters[int(np.argmax(sums))]
        extras = {
            "logprob_sum": dict(zip(letters, sums)),
            "n_tokens": dict(zip(letters, [c.n_tokens for c in conts])),
            "pred_sum": pred_sum,
            "correct_sum": pred_sum == it.gold,
            # the sum rule's own probabilities (softmax of the unnormalised sums): its confidence
            "probs_sum": dict(zip(letters, _softmax(sums))),
            **annotations(predictor, ctx),
        }
        # probs come from the rule that made the prediction: a softmax over the same length-normalised
        # scores, so argmax(probs) == pred and confidence, ECE and Brier describe that rule
        out.append(
            _sample(
                it,
                "option",
                pred_norm,
                dict(zip(letters, norms)),
                dict(zip(letters, _softmax(norms))),
                extras,
                per,
                was_cut,
            )
        )
    return out


def score_generate(
    predictor: Predictor,
    items: Sequence[Item],
    *,
    max_new_tokens: int = 128,
    seed: int = 0,
    matcher: str = "regex",
    **_,
) -> list[Sample]:
    """Generate, then map each answer to an option with `matcher` (clinqa.evaluate.matcher); the sample's
    extras say which rule decided ("parse") and, past regex, which matcher; None stays unparseable."""
    from clinqa.evaluate.matcher import match_answers

    t0 = time.perf_counter()
    prompt_texts = [prompts.generate_prompt(it.question, it.options) for it in items]
    with watch_truncation() as notes:
        texts = predictor.generate(prompt_texts, GenerationConfig(max_new_tokens=max_new_tokens, seed=seed))
    cut = truncated_flags(notes, prompt_texts)
    matches = match_answers(texts, [it.options for it in items], matcher, predictor=predictor, prompts=prompt_texts)
    per = (time.perf_counter() - t0) / max(len(items), 1)
    out = []
    for it, prompt, text, m, was_cut in zip(items, prompt_texts, texts, matches, cut):
        how = {"parse": m.rule} if matcher == "regex" else m.to_extras(matcher)
        out.append(
            _sample(
                it,
                "generate",
                m.pred,
                {},
                {},
                {"generated": text, **how, **annotations(predictor, prompt)},
                per,
                was_cut,
            )
        )
    return out


SCORERS: dict[str, Callable[..., list[Sample]]] = {
    "letter": score_letter,
    "option": score_option,
    "generate": score_generate,
}
