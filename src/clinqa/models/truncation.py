"""Which prompts a model had to cut to fit its context window, so a run can say so.

A local model left-truncates a prompt longer than its window (as lm-eval does): the question's start
is silently gone, yet the answer is scored as if the model had read it. ``note_truncated`` is called
by the model for each input it cut; a caller that wants to know wraps its calls in
``watch_truncation()`` and maps the notes back onto its own prompts with ``truncated_flags``.
Without a watcher noting costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

_NOTES: ContextVar[list[tuple[int, str]] | None] = ContextVar("clinqa_truncated", default=None)


@contextmanager
def watch_truncation() -> Iterator[list[tuple[int, str]]]:
    """Collect (input index, input text) of every prompt truncated inside the block (this thread)."""
    notes: list[tuple[int, str]] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def note_truncated(index: int, text: str) -> None:
    """A model's report that input ``index`` of the current call (``text``) did not fit its window."""
    notes = _NOTES.get()
    if notes is not None:
        notes.append((index, text))


def truncated_flags(notes: Sequence[tuple[int, str]], prompts: Sequence[str]) -> list[bool]:
    """For each of the caller's prompts, whether it was truncated. Wrappers (prompting, retrieval) add
    text around a prompt, so a prompt counts when it is inside a truncated text; a note that contains
    no prompt (a wrapper rewrote it) falls back to its index."""
    flags = [False] * len(prompts)
    for index, text in notes:
        hits = [i for i, p in enumerate(prompts) if p and p in text]
        if not hits and 0 <= index < len(prompts):
            hits = [index]
        for i in hits:
            flags[i] = True
    return flags
