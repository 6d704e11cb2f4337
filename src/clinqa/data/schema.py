"""The one question type every loader produces and every scorer consumes."""

from __future__ import annotations

import string
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LETTERS = string.ascii_uppercase


def letters(n: int) -> list[str]:
    """The first n option letters: A, B, C, ..."""
    if not 0 < n <= len(LETTERS):
        raise ValueError(f"a question needs between 1 and {len(LETTERS)} options, got {n}")
    return list(LETTERS[:n])


class Question(BaseModel):
    """A multiple-choice clinical question.

    `options` is ordered and keyed by consecutive letters from A; `answer` is one of those letters.
    `meta` is free: contexts (PubMedQA), rationale, harmful_options, the original row, ...
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    question: str
    options: dict[str, str]
    answer: str
    specialties: list[str] = Field(default_factory=list)
    source: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("question")
    @classmethod
    def _question_not_empty(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("question text is empty")
        return v

    @field_validator("options")
    @classmethod
    def _options_are_lettered(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) < 2:
            raise ValueError(f"a question needs at least 2 options, got {len(v)}")
        expected = letters(len(v))
        if list(v) != expected:
            raise ValueError(f"option keys must be {', '.join(expected)} in order, got {', '.join(v)}")
        seen: dict[str, str] = {}
        for k, text in v.items():
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"option {k} is empty")
            norm = " ".join(text.split()).casefold()
            if norm in seen:  # identical options make a tie the scorer would break towards A
                raise ValueError(f"options {seen[norm]} and {k} have the same text {text.strip()[:60]!r}")
            seen[norm] = k
        return v

    @model_validator(mode="after")
    def _answer_is_an_option(self) -> Question:
        if self.answer not in self.options:
            raise ValueError(f"answer {self.answer!r} is not one of the options {', '.join(self.options)}")
        return self

    @property
    def option_texts(self) -> list[str]:
        return list(self.options.values())

    @property
    def answer_index(self) -> int:
        return list(self.options).index(self.answer)
