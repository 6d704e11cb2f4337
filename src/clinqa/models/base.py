"""The Predictor protocol: the few operations every later feature needs from a model, and the
optional capabilities some predictors add.

Every backend (local transformers, OpenAI-compatible server) and every modifier (LoRA, steering,
retrieval) implements Predictor, so evaluation, annotation, records and the service never care which.
Anything more is an optional capability, one small runtime-checkable protocol each (CAPABILITIES):
code asks `isinstance(predictor, Encodes)` instead of probing for an attribute, and a wrapper says
which of its base's capabilities it passes on (`forward_capabilities`), so a reader sees what it supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

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


# -- optional capabilities -----------------------------------------------------------------------------
@runtime_checkable
class Annotates(Protocol):
    """Extras to record with a sample for a prompt: retrieved passage ids, steering vector, prompt name."""

    def annotations(self, prompt: str) -> dict: ...


@runtime_checkable
class Encodes(Protocol):
    """Token ids of a text under the model's tokenizer (token budgets)."""

    def encode(self, text: str) -> list[int]: ...


@runtime_checkable
class HasTokenizer(Protocol):
    """The Hugging Face tokenizer itself (batch token counts)."""

    tokenizer: Any


@runtime_checkable
class FormatsChat(Protocol):
    """The exact text the model sees for a chat prompt (its chat template applied)."""

    def format_prompt(self, prompt: str, config: GenerationConfig) -> str: ...


@runtime_checkable
class HasContextLimit(Protocol):
    """The longest input, in tokens, the model is given (longer inputs are cut from the left)."""

    max_length: int


@runtime_checkable
class SharesPrefix(Protocol):
    """next_token_logprobs of prefix + suffix for many suffixes, the prefix computed once."""

    def next_token_logprobs_shared(
        self, prefix: str, suffixes: Sequence[str], candidates: Sequence[str]
    ) -> np.ndarray: ...


@runtime_checkable
class ReadsTokenLogprobs(Protocol):
    """Per text, the log-probability of every token given the ones before it, with character offsets."""

    def token_logprobs(self, texts: Sequence[str]) -> list[dict]: ...


@runtime_checkable
class ReportsCost(Protocol):
    """Extra parameters and training/build seconds an adaptation added (`compare`)."""

    def cost(self) -> dict: ...


@runtime_checkable
class ReportsLogprobs(Protocol):
    """Whether scoring (next_token_logprobs, score_continuations) works: False on a chat-only server.
    A predictor without it is taken to score."""

    logprobs_available: bool


@runtime_checkable
class LoadsAdapters(Protocol):
    """A view of the same weights with a LoRA adapter switched on."""

    def load_adapter(self, path: Any, name: str | None = None) -> Predictor: ...


CAPABILITIES: tuple[type, ...] = (
    Annotates,
    Encodes,
    HasTokenizer,
    FormatsChat,
    HasContextLimit,
    SharesPrefix,
    ReadsTokenLogprobs,
    ReportsCost,
    ReportsLogprobs,
    LoadsAdapters,
)


def capabilities(predictor: Any) -> list[str]:
    """Names of the optional capabilities a predictor has, in CAPABILITIES order."""
    return [c.__name__ for c in CAPABILITIES if isinstance(predictor, c)]


def forward_capabilities(wrapper: Any, base: Any, forwarded: Iterable[type]) -> None:
    """Give `wrapper` each capability in `forwarded` that `base` has, as the base's own members (bound
    methods; attributes as they are now, e.g. the tokenizer object). A wrapper lists in `forwarded`
    only what stays true through it; anything it changes it implements itself, anything else is absent."""
    for cap in forwarded:
        if isinstance(base, cap):
            for name in _members(cap):
                setattr(wrapper, name, getattr(base, name))


def _members(cap: type) -> list[str]:
    return [n for n in (*cap.__dict__.get("__annotations__", {}), *vars(cap)) if not n.startswith("_")]


def tokenizer_of(predictor: Any) -> Any:
    """The predictor's tokenizer, or that of the model a modifier wraps (its ``base`` or ``predictor``);
    None when there is none."""
    for obj in (predictor, getattr(predictor, "base", None), getattr(predictor, "predictor", None)):
        if isinstance(obj, HasTokenizer) and callable(obj.tokenizer):
            return obj.tokenizer
    return None


def annotations_of(predictor: Any, prompt: str) -> dict:
    """The predictor's annotations for a prompt ({} when it has none)."""
    return dict(predictor.annotations(prompt)) if isinstance(predictor, Annotates) else {}


def logprobs_available(predictor: Any) -> bool:
    """False only for a predictor that says it cannot score (a chat-only server)."""
    return bool(predictor.logprobs_available) if isinstance(predictor, ReportsLogprobs) else True


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
