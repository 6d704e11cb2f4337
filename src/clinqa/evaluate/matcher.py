"""Map a generated answer to an option: S-MedQA's answer matching for `--method generate`.

S-MedQA generates an answer and maps it to an option with a classifier rather than reading
first-token probabilities. Three matchers, chosen with `clinqa eval --matcher`:

- regex (default, the behaviour before matchers): `extract_answer`, explicit letter patterns then the
  option texts verbatim; anything else is unparseable.
- minilm: rules first (refusal / none-of-these, a hedge between letters, a letter that contradicts
  the option text it quotes, the regex), then the answer's cosine similarity to each option text with
  the bundled all-MiniLM-L6-v2 (`clinqa.specialties.embed`); the best option is taken only when its
  similarity is at least `min_similarity` and beats the runner-up by `min_margin`.
- loglik: the same rules, then the answering model's own mean log-likelihood per token of each
  option text after its generated answer ("... Therefore, the answer is"); the best option is taken
  only when it beats the runner-up by `min_loglik_margin` nats per token.

Every answer gets a `rule` saying which step decided it ("refusal", "hedge", "conflict", "pattern",
"text", "conclusion", "lists-options", "minilm", "loglik", "unsure", "unparseable"); a None prediction is counted as
unparseable by the runs, never defaulted to an option. The thresholds are fixed before measuring;
benchmarks/matcher_accuracy.py measures each matcher on the bundled labelled set
(data/bundled/matcher_answers.jsonl).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clinqa.errors import ClinqaError
from clinqa.evaluate.extract import _norm, extract_answer

MATCHERS = ("regex", "minilm", "loglik")
REFUSAL = re.compile(
    r"(?i)\b(none of (the|these|them)\b|no(ne)? (of the )?(options?|choices?|answers?) (is|are) (correct|right|appropriate)"
    r"|i (can ?not|can't|cannot|am unable to|'m unable to|won't|am not able to) (answer|help|provide|give|determine|choose)"
    r"|as an ai\b|consult (a|your) (doctor|physician|clinician|healthcare))"
)
LETTER_HEDGE = r"\b(?:either\s+)?\(?([{L}])\)?\s*(?:or|and/or|/)\s*\(?([{L}])\)?(?![A-Za-z])"
CONCLUSION = re.compile(
    r"(?i)\b(answer is|best (choice|option|answer|treatment|next step)( here)? (is|would be)|i would (choose|go with|pick|give|start)"
    r"|correct (choice|option|answer) is|most (likely|appropriate)( \w+)? (is|would be)|so it is|therefore)"
)
LEAD = "\nTherefore, the answer is"


@dataclass(frozen=True)
class MatcherConfig:
    """A matcher and its thresholds (fixed a priori, not tuned on the labelled set)."""

    name: str = "regex"
    min_similarity: float = 0.35  # minilm: cosine similarity of the best option
    min_margin: float = 0.05  # minilm: best minus runner-up similarity
    min_loglik_margin: float = 0.1  # loglik: best minus runner-up mean log-probability per token (nats)

    def __post_init__(self):
        if self.name not in MATCHERS:
            raise ClinqaError(f"unknown matcher {self.name!r}: use one of {', '.join(MATCHERS)}")


@dataclass
class Match:
    pred: str | None
    rule: str
    scores: dict[str, float] = field(default_factory=dict)  # per option: similarity or mean log-prob

    def to_extras(self, matcher: str) -> dict[str, Any]:
        return {"matcher": matcher, "parse": self.rule, **({"match_scores": self.scores} if self.scores else {})}


def _text_hits(text: str, options: Mapping[str, str]) -> list[str]:
    t = _norm(text)
    return [k for k, v in options.items() if _norm(v) and re.search(rf"\b{re.escape(_norm(v))}\b", t)]


def match_rules(text: str, options: Mapping[str, str]) -> Match | None:
    """The rule-based steps of the minilm and loglik matchers; None when a model must decide."""
    letters = "".join(options)
    if not text or not text.strip():
        return Match(None, "unparseable")
    if REFUSAL.search(text):
        return Match(None, "refusal")
    hedge = [(a.upper(), b.upper()) for a, b in re.findall(LETTER_HEDGE.format(L=letters), text)]
    if any(a != b for a, b in hedge):
        return Match(None, "hedge")
    label_lines = re.findall(rf"(?m)^\s*\(?[{letters}][.)]\s", text)
    if len(options) > 2 and len(label_lines) >= len(options) - 1:  # a copy of the option list
        return Match(None, "lists-options")
    bare = re.fullmatch(rf"\W*\(?([{letters}])\)?\W*", text.strip(), flags=re.I)
    if bare:  # a lone letter in either case: "c)", "(b)"
        return Match(bare.group(1).upper(), "pattern")
    hits = _text_hits(text, options)
    pred, how = extract_answer(text, dict(options))
    if how == "pattern":
        # the letter quoted with another option's text ("The answer is B: Right coronary artery", C's text)
        for k in hits:
            other = re.escape(options[k])
            if k != pred and (re.search(rf"(?i)\(?\b{pred}\b\)?\s*[.:)\-]?\s*{other}", text)
                              or re.search(rf"(?i){other}\s*\(\s*{pred}\s*\)", text)):  # fmt: skip
                return Match(None, "conflict")
        return Match(pred, "pattern")
    if how == "text":
        return Match(pred, "text")
    if len(hits) > 1:  # several option texts: the one after the last concluding phrase, if only one is there
        cues = list(CONCLUSION.finditer(text))
        if cues:
            tail = _text_hits(text[cues[-1].end() :], options)
            if len(tail) == 1:
                return Match(tail[0], "conclusion")
    if how == "ambiguous" and not hits:  # several letters, no option text to tell them apart
        return Match(None, "ambiguous")
    return None


def _decide(scores: np.ndarray, letters: Sequence[str], rule: str, floor: float | None, margin: float) -> Match:
    order = np.argsort(-scores)
    best = float(scores[order[0]])
    second = float(scores[order[1]]) if len(order) > 1 else -np.inf
    table = {k: float(s) for k, s in zip(letters, scores)}
    if (floor is not None and best < floor) or best - second < margin:
        return Match(None, "unsure", table)
    return Match(letters[int(order[0])], rule, table)


def match_answers(texts: Sequence[str], options: Sequence[Mapping[str, str]], config: MatcherConfig | str = "regex", *,
                  predictor: Any = None, prompts: Sequence[str] | None = None, embedder: Any = None) -> list[Match]:  # fmt: skip
    """Match each generated text to one of its options. `predictor` and `prompts` (the prompts the
    answers were generated for) are needed by the loglik matcher; `embedder` overrides MiniLM."""
    config = MatcherConfig(config) if isinstance(config, str) else config
    if len(texts) != len(options):
        raise ClinqaError(f"{len(texts)} answers but {len(options)} option sets")
    if config.name == "regex":
        return [Match(*extract_answer(t, dict(o))) for t, o in zip(texts, options)]
    out: list[Match | None] = [match_rules(t, o) for t, o in zip(texts, options)]
    todo = [i for i, m in enumerate(out) if m is None]
    if todo and config.name == "minilm":
        from clinqa.models.embed import embed_texts

        answers = embed_texts([texts[i] for i in todo], model=embedder)
        opts = embed_texts([v for i in todo for v in options[i].values()], model=embedder)
        start = 0
        for row, i in enumerate(todo):
            n = len(options[i])
            sims = opts[start : start + n] @ answers[row]
            start += n
            out[i] = _decide(
                sims.astype(np.float64), list(options[i]), "minilm", config.min_similarity, config.min_margin
            )
    elif todo:  # loglik
        if predictor is None or prompts is None:
            raise ClinqaError("the loglik matcher needs the answering model and its prompts")
        from clinqa.models.base import FormatsChat, GenerationConfig

        def context(i: int) -> str:
            chat = isinstance(predictor, FormatsChat)
            shown = predictor.format_prompt(prompts[i], GenerationConfig()) if chat else prompts[i] + "\n"
            return shown + texts[i].strip() + LEAD

        scored = predictor.score_continuations([(context(i), [" " + v for v in options[i].values()]) for i in todo])
        for i, conts in zip(todo, scored):
            per_token = np.array([c.logprob / max(c.n_tokens, 1) for c in conts], dtype=np.float64)
            out[i] = _decide(per_token, list(options[i]), "loglik", None, config.min_loglik_margin)
    return [m if m is not None else Match(None, "unparseable") for m in out]


__all__ = ["LEAD", "MATCHERS", "Match", "MatcherConfig", "match_answers", "match_rules"]
