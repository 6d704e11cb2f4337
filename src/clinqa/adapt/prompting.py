"""The `+prompt:` modifier: a better prompt as a baseline for fine-tuning, steering and retrieval.

    default+prompt:expert          an expert-physician instruction before every prompt
    default+prompt:cot             ask for step-by-step reasoning (pays off with --method generate)
    default+prompt:fewshot@k=3     k solved example questions (bundled control-free clinical set) first
    default+prompt:path/to/file.txt  your own instruction text

It rewrites the context of every call and leaves continuations alone, so all scoring methods work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from clinqa.errors import ClinqaError
from clinqa.models.base import (
    Encodes,
    FormatsChat,
    GenerationConfig,
    HasContextLimit,
    HasTokenizer,
    ModelInfo,
    ReportsCost,
    annotations_of,
    forward_capabilities,
    logprobs_available,
)
from clinqa.models.request import rewritten
from clinqa.models.spec import Modifier

INSTRUCTIONS = {
    "expert": "The following are multiple choice questions about clinical medicine. Answer as an experienced physician would.\n\n",
    "cot": "Think step by step about the key clinical findings and what they imply, then give the answer.\n\n",
}


def fewshot_examples(k: int, seed: int = 0) -> list[tuple[str, str]]:
    """2k solved bundled clinical questions as (question text, cloze block): the first k are the
    examples, the rest stand in for any of them that is the very question being asked."""
    import random

    from clinqa.data.loaders import load_questions

    qs = load_questions("bundled").questions
    picked = random.Random(seed).sample(qs, min(2 * k, len(qs)))
    return [(q.question.strip(), f"Question: {q.question.strip()}\nAnswer: {q.options[q.answer]}\n\n") for q in picked]


def fewshot_block(k: int, seed: int = 0) -> str:
    """k solved bundled clinical questions in the cloze format."""
    return "".join(block for _, block in fewshot_examples(k, seed)[:k])


class PromptPredictor:
    """The base predictor with an instruction (or few-shot examples) before every context and prompt.

    Capabilities: Annotates (the base's annotations plus the prompt's name) and ReportsLogprobs (the
    base's answer) of its own; FORWARDED ones are the base's, when it has them. Nothing else passes
    through: a capability that would bypass the rewrite (shared-prefix scoring, token log-probabilities,
    adapters, steering hooks) is absent, so callers take their plain path through the rewrite.
    """

    FORWARDED = (Encodes, HasTokenizer, FormatsChat, HasContextLimit, ReportsCost)

    def __init__(self, base, prefix: str, name: str, examples: Sequence[tuple[str, str]] = (), k: int = 0):
        self.base = base
        self.prefix = prefix
        self.info = ModelInfo(
            **{
                **base.info.__dict__,
                "spec": f"{base.info.spec}+prompt:{name}",
                "extra": {**base.info.extra, "prompt": name},
            }
        )
        self._examples, self._k = list(examples), k  # few-shot: (question text, block); prefix holds the first k
        forward_capabilities(self, base, self.FORWARDED)

    def _rewrite(self, text: str) -> str:
        """The text with the prefix before it (a structured prompt stays structured)."""
        if not any(q in text for q, _ in self._examples[: self._k]):
            return rewritten(text, self.prefix + text)
        # the question asked is one of the examples: never show a question its own answer
        usable = [block for q, block in self._examples if q not in text]
        return rewritten(text, "".join(usable[: self._k]) + text)

    def score_continuations(self, groups):
        return self.base.score_continuations([(self._rewrite(c), conts) for c, conts in groups])

    def next_token_logprobs(self, contexts: Sequence[str], candidates: Sequence[str]):
        return self.base.next_token_logprobs([self._rewrite(c) for c in contexts], candidates)

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None):
        return self.base.generate([self._rewrite(p) for p in prompts], config)

    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]):
        return self.base.hidden_states([self._rewrite(t) for t in texts], layers)

    def annotations(self, prompt: str) -> dict:
        return {**annotations_of(self.base, prompt), "prompt": self.info.extra["prompt"]}

    @property
    def logprobs_available(self) -> bool:
        return logprobs_available(self.base)


def apply_modifier(predictor, modifier: Modifier) -> PromptPredictor:
    name = modifier.target
    if name in INSTRUCTIONS:
        return PromptPredictor(predictor, INSTRUCTIONS[name], name)
    if name == "fewshot":
        k = int(modifier.params.get("k", 3))
        if not 1 <= k <= 16:
            raise ClinqaError(f"prompt:fewshot@k={k}: k must be between 1 and 16")
        examples = fewshot_examples(k, int(modifier.params.get("seed", 0)))
        return PromptPredictor(predictor, "".join(b for _, b in examples[:k]), f"fewshot{k}", examples, k)
    path = Path(name)
    if path.is_file():
        return PromptPredictor(predictor, path.read_text().rstrip() + "\n\n", path.stem)
    raise ClinqaError(f"unknown prompt {name!r}: use expert, cot, fewshot@k=N, or a text file with your instruction")
