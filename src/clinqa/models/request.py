"""A prompt that carries the question it was rendered from.

The scoring methods render a question as text (clinqa.evaluate.prompts); modifiers further down the
chain need the question itself: retrieval searches for its stem, per-category steering routes on
it, annotations name it. `Prompt` is the rendered text -- a `str`, byte for byte the text a plain
prompt had, so every backend tokenizes, sends, caches and fingerprints it unchanged -- with the
structure beside it as attributes (the way inspect_ai's solvers share a TaskState that holds the
sample's input and metadata beside the messages):

    stem         the question stem, as written (stripped); no context, no options, no scaffolding
    options      the lettered options written into the text, in the order shown ({} for the cloze
                 prompt, whose options are scored as continuations)
    kind         the scoring method the text was rendered for: letter, option or generate
    question_id  the question's id
    meta         the question's metadata (read only; the question's own dict, not a copy)

Equality and hashing are the text's. String operations (`+`, slicing, formatting) return a plain
`str`, so a wrapper that rewrites a prompt carries the structure over with `rewritten(prompt,
new_text)`. Text typed by a user (CLI, the service) arrives as a plain `str`; code that needs the
question then falls back to parsing the text (clinqa.adapt.router.question_from_text,
clinqa.adapt.rag.retrieval_query_from_text).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

KINDS = ("letter", "option", "generate")


class Prompt(str):
    """Prompt text plus the question it was built from (see the module docstring)."""

    stem: str
    options: Mapping[str, str]
    kind: str
    question_id: str | None
    meta: Mapping[str, Any]

    def __new__(
        cls,
        text: str,
        *,
        stem: str,
        kind: str,
        options: Mapping[str, str] | None = None,
        question_id: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Prompt:
        if kind not in KINDS:
            raise ValueError(f"unknown prompt kind {kind!r}: use one of {', '.join(KINDS)}")
        self = super().__new__(cls, text)
        self.stem = str(stem)
        self.kind = kind
        self.options = MappingProxyType(dict(options or {}))
        self.question_id = None if question_id is None else str(question_id)
        self.meta = MappingProxyType(meta if meta is not None else {})
        return self

    @property
    def text(self) -> str:
        """The text alone, as a plain str."""
        return str.__str__(self)

    def with_text(self, text: str) -> Prompt:
        """Another text (a rewrite of this prompt) with the same structure."""
        return Prompt(
            text,
            stem=self.stem,
            kind=self.kind,
            options=self.options,
            question_id=self.question_id,
            meta=self.meta,
        )

    def __reduce__(self):  # pickling (worker processes): the text plus the structure
        return (
            _rebuild,
            (self.text, self.stem, self.kind, dict(self.options), self.question_id, dict(self.meta)),
        )


def _rebuild(text, stem, kind, options, question_id, meta) -> Prompt:
    return Prompt(text, stem=stem, kind=kind, options=options, question_id=question_id, meta=meta)


def rewritten(prompt: str, text: str) -> str:
    """`text` (a rewrite of `prompt`) carrying prompt's structure when it has one, else plain text."""
    return prompt.with_text(text) if isinstance(prompt, Prompt) else text


__all__ = ["KINDS", "Prompt", "rewritten"]
