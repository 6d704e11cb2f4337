"""MedQA JSONL: question, options {letter: text} (4 or 5), answer_idx (letter), optional answer text,
meta_info."""

from __future__ import annotations

from clinqa.data.formats.common import Raw, RowError, letter_options, question, record, require
from clinqa.data.schema import Question


def from_medqa(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """MedQA: answer_idx is the letter; `answer` (text), when present, must agree with it.

    id is f"medqa-{line}" unless the record has an id; all other keys (meta_info, ...) go to meta.
    """
    rec = record(raw)
    options = letter_options(rec)
    letter = require(rec, "answer_idx")
    if letter not in options:
        raise RowError("answer_idx", f"{letter!r} is not one of the options {', '.join(options)}")
    if rec.get("answer") is not None and str(rec["answer"]).strip() != str(options[letter]).strip():
        raise RowError("answer", f"{rec['answer']!r} does not match option {letter} ({options[letter]!r})")
    meta = {k: v for k, v in rec.items() if k not in ("id", "question", "options", "answer_idx", "answer")}
    qid = str(rec["id"]) if rec.get("id") is not None else f"medqa-{raw.line}"
    fields = {
        "id": qid,
        "question": require(rec, "question"),
        "options": options,
        "answer": letter,
        "source": "medqa",
        "meta": meta,
    }
    return question(fields, {"answer": "answer_idx"})
