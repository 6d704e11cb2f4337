"""Specialty votes by generation, for models that give no log-probabilities (chat-only APIs).

Each of the first ``n_prompts`` templates of :data:`clinqa.specialties.annotate.PROMPTS` is asked as a
chat question constrained to the taxonomy ("reply with exactly one specialty from this list"), greedy.
The reply is parsed to a taxonomy label (:func:`parse_label`): the whole reply, or the one specialty
name or alias it mentions. A reply that names none, or several, is *unparsed*: it casts no vote,
``Annotation.per_prompt`` holds ``""`` for it and :func:`count_unparsed` counts them -- nothing
defaults to a label. ``probs`` are the vote fractions (one-hot per parsed reply, averaged over the
prompts, so they sum to the parsed share); ``label`` needs ``min_votes`` parsed votes as usual.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from clinqa.errors import ClinqaError
from clinqa.models.base import GenerationConfig, Predictor, logprobs_available
from clinqa.specialties.taxonomy import SPECIALTIES, resolve_specialty
from clinqa.specialties.votes import Annotation, _majority

log = logging.getLogger("clinqa.specialties")
UNPARSED = ""
INSTRUCTION = "\n\nReply with exactly one specialty from this list, and nothing else: {names}."
_NAMES = "; ".join(s.name for s in SPECIALTIES)
_IDS = tuple(s.id for s in SPECIALTIES)


def scores_labels(predictor: Any) -> bool:
    """Whether the predictor can score label continuations (False for a chat-only OpenAI-compatible server)."""
    return logprobs_available(predictor)


def label_prompt(template: str, question: str) -> str:
    return template.format(q=question.strip()).rstrip(" :") + "?" + INSTRUCTION.format(names=_NAMES)


def _mentions(text: str) -> set[str]:
    low = f" {text.lower()} "
    found = set()
    for s in SPECIALTIES:
        for term in (s.name, s.id.replace("_", " "), *(a.replace("_", " ") for a in s.aliases if len(a) > 3)):
            if re.search(r"(?<![a-z])" + re.escape(term.lower()) + r"(?![a-z])", low):
                found.add(s.id)
    return found


def parse_label(reply: str) -> str | None:
    """The taxonomy id a constrained reply names, or None when it names none or several."""
    text = " ".join(str(reply or "").split())
    text = re.sub(r"^(the )?(medical )?(specialty|department|answer)( is)?\s*[:\-]?\s*", "", text, flags=re.I)
    first = re.split(r"[.\n;(]", text, maxsplit=1)[0].strip().strip("*\"' ")
    for candidate in (first, text.strip(" .*\"'")):
        if candidate:
            try:
                return resolve_specialty(candidate)
            except ClinqaError:
                pass
    found = _mentions(first) or _mentions(text)
    return next(iter(found)) if len(found) == 1 else None


def annotate_by_generation(
    predictor: Predictor,
    items: Sequence[tuple[str, str]],
    templates: Sequence[str],
    *,
    min_votes: int,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """Annotations of (id, text) items by majority vote over generated, parsed labels (see the module docstring)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    out: list[Annotation] = []
    unparsed = 0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        prompts = [label_prompt(t, text) for _, text in batch for t in templates]
        replies = predictor.generate(prompts, config)
        if len(replies) != len(prompts):
            raise ClinqaError("the model returned a different number of replies than prompts")
        for i, (qid, _) in enumerate(batch):
            per = [parse_label(r) or UNPARSED for r in replies[i * len(templates) : (i + 1) * len(templates)]]
            unparsed += per.count(UNPARSED)
            counts: dict[str, int] = {}
            for sid in per:
                if sid:
                    counts[sid] = counts.get(sid, 0) + 1
            probs = [counts.get(sid, 0) / len(templates) for sid in _IDS]
            votes = dict(sorted(counts.items(), key=lambda kv: (-kv[1], _IDS.index(kv[0]))))
            label = None
            if votes:
                major = _majority(votes, probs)
                label = major if votes[major] >= min_votes else None
            out.append(Annotation(str(qid), votes, label, probs, per))
        if progress:
            progress(len(out), len(items))
    if unparsed:
        log.warning(
            "%d of %d generated specialty answers named no single specialty: they cast no vote",
            unparsed,
            len(items) * len(templates),
        )
    return out


def count_unparsed(annotations: Sequence[Any]) -> int:
    """Prompts whose generated answer named no single specialty (``per_prompt`` entry ``""``)."""
    return sum(1 for a in annotations for p in a.per_prompt if p == UNPARSED)
