"""One scored question under one shuffle: a line of samples.jsonl.

It carries enough to recompute every metric offline (per-option scores and probabilities,
the permutation, the groups), so reports never need the model again.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


def _softmax(scores: dict[str, float]) -> dict[str, float]:
    finite = [v for v in scores.values() if math.isfinite(v)]
    if not finite:
        return {k: 1.0 / len(scores) for k in scores}
    top = max(finite)
    e = {k: math.exp(v - top) if math.isfinite(v) else 0.0 for k, v in scores.items()}
    total = sum(e.values())
    return {k: v / total for k, v in e.items()}


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

    @model_validator(mode="before")
    @classmethod
    def _consistent_option_probs(cls, data: Any) -> Any:
        """Option-method samples written before `probs_sum` existed held the sum rule's softmax in
        `probs` while `pred` came from the length-normalised rule. Read them the way new runs are
        written: `probs` = softmax of the normalised scores (the prediction's rule), and the old
        values under extras["probs_sum"]. Nothing else changes, so old run folders report consistently."""
        if not isinstance(data, dict) or data.get("method") != "option":
            return data
        extras = data.get("extras") or {}
        if "pred_sum" not in extras or "probs_sum" in extras or not data.get("scores"):
            return data
        return {
            **data,
            "probs": _softmax(data["scores"]),
            "extras": {**extras, "probs_sum": dict(data.get("probs") or {})},
        }

    @property
    def key(self) -> tuple[str, int]:
        return (self.question_id, self.shuffle)

    @property
    def confidence(self) -> float | None:
        """Probability the model gave to its own prediction, if it has one."""
        if self.pred is None or not self.probs:
            return None
        return self.probs.get(self.pred)
