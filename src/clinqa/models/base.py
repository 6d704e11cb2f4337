"""The Predictor protocol: the few operations every later feature needs from a model.

Every backend (local transformers, OpenAI-compatible server) and every modifier (LoRA, steering,
retrieval) implements it, so evaluation, annotation, records and the service never care which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of one continuation given a context (lm-eval's (logprob, is_greedy) plus lengths)."""

    logprob: float
    n_tokens: int
    n_chars: int
    greedy: bool = False


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    chat: bool = True  # wrap the prompt in the model's chat template
    system: str | None = None
    stop: tuple[str, ...] = ()


@dataclass
class ModelInfo:
    spec: str
    backend: str
    name: str
    n_layers: int | None = None
    hidden_size: int | None = None
    n_params: int | None = None
    context_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Predictor(Protocol):
    info: ModelInfo

    def score_continuations(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[ContinuationScore]]:
        """For each (context, continuations) group, the log-likelihood of every continuation.

        Continuations of one group share the context, which a backend may compute once.
        """

    def next_token_logprobs(self, contexts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """[len(contexts), len(candidates)] log-probabilities (over the full vocabulary) of each
        single-token candidate as the next token."""

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
        """Generated text for each prompt (chat-templated unless config.chat is False)."""

    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[np.ndarray]:
        """Per text, an array [len(layers), n_tokens, hidden] of residual-stream states.

        Layer 0 is the embeddings, layer i the output of block i (Hugging Face's convention).
        """


def loglikelihood(predictor: Predictor, requests: Sequence[tuple[str, str]]) -> list[ContinuationScore]:
    """Score (context, continuation) pairs, grouping equal contexts so their prefix is shared."""
    order: dict[str, list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        order.setdefault(ctx, []).append(i)
    groups = [(ctx, [requests[i][1] for i in idx]) for ctx, idx in order.items()]
    scored = predictor.score_continuations(groups)
    out: list[ContinuationScore | None] = [None] * len(requests)
    for (_ctx, idx), scores in zip(order.items(), scored):
        for i, s in zip(idx, scores):
            out[i] = s
    return out  # type: ignore[return-value]
