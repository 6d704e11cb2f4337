"""One scored question under one shuffle: a line of samples.jsonl.

It carries enough to recompute every metric offline (per-option scores and probabilities,
the permutation, the groups), so reports never need the model again.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question_id: str
    shuffle: int = 0
    # permutation[i] = index in the original options of the option shown at position i
    permutation: list[int]
    options: dict[str, str]  # as shown to the model, letter -> text
    gold: str  # letter of the correct option as shown
    pred: str | None  # letter chosen; None when a generated answer could not be parsed
    correct: bool
    method: str
    scores: dict[str, float] = Field(default_factory=dict)  # raw per-option scores (logprob, ...)
    probs: dict[str, float] = Field(default_factory=dict)  # normalised over the options; empty if unknown
    specialties: list[str] = Field(default_factory=list)
    source: str = ""
    extras: dict[str, Any] = Field(default_factory=dict)  # method-specific: generated text, parse status, ...
    latency_s: float = 0.0
    truncated: bool = False  # the prompt did not fit the model's context window and was cut (see models.truncation)

    @property
    def key(self) -> tuple[str, int]:
        return (self.question_id, self.shuffle)

    @property
    def confidence(self) -> float | None:
        """Probability the model gave to its own prediction, if it has one."""
        if self.pred is None or not self.probs:
            return None
        return self.probs.get(self.pred)
