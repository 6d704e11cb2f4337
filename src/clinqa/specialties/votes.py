"""One question's specialty votes: the value type both annotators (scoring and generation) return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from clinqa.data.taxonomy import SPECIALTIES
from clinqa.errors import ClinqaError

SPECIALTY_IDS: tuple[str, ...] = tuple(s.id for s in SPECIALTIES)


@dataclass
class Annotation:
    """The prompts' verdict on one question.

    votes: specialty id -> number of prompts whose top label it was (only specialties with votes,
      most votes first); the counts sum to the number of prompts.
    label: the majority specialty if it has at least ``min_votes`` votes, else None (abstain).
    probs: mean over prompts of the softmax over the 15 labels, in taxonomy order (``SPECIALTY_IDS``).
    per_prompt: each prompt's top label, in prompt order.
    p_none: P(the question belongs to no specialty) from the none gate (``none_gate``), where one was
      used; a question the gate left out has label None.
    """

    question_id: str
    votes: dict[str, int]
    label: str | None
    probs: list[float]
    per_prompt: list[str] = field(default_factory=list)
    p_none: float | None = None

    @property
    def n_prompts(self) -> int:
        return len(self.per_prompt) if self.per_prompt else sum(self.votes.values())

    @property
    def top_label(self) -> str:
        """The majority label whatever its vote count; ties broken by the mean probability."""
        return _majority(self.votes, self.probs)

    @property
    def top_votes(self) -> int:
        return self.votes.get(self.top_label, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "question_id": self.question_id,
            "label": self.label,
            "votes": dict(self.votes),
            "probs": [float(p) for p in self.probs],
            "per_prompt": list(self.per_prompt),
            **({} if self.p_none is None else {"p_none": float(self.p_none)}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Annotation:
        try:
            return cls(
                question_id=str(data["question_id"]),
                votes={str(k): int(v) for k, v in data["votes"].items()},
                label=data.get("label"),
                probs=[float(p) for p in data["probs"]],
                per_prompt=[str(p) for p in data.get("per_prompt", [])],
                p_none=None if data.get("p_none") is None else float(data["p_none"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ClinqaError(
                f"not a specialty annotation record ({e!r}): expected question_id, label, votes, probs"
            ) from None


def _majority(votes: dict[str, int], probs: Sequence[float]) -> str:
    if not votes:
        raise ClinqaError("an annotation without votes has no top label")

    def key(sid: str) -> tuple[int, float, int]:
        k = SPECIALTY_IDS.index(sid) if sid in SPECIALTY_IDS else len(SPECIALTY_IDS)
        p = float(probs[k]) if k < len(probs) else 0.0
        return (votes[sid], p, -k)

    return max(votes, key=key)
