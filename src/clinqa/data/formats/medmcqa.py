"""MedMCQA JSON lines: id, question, opa..opd, cop (0-based 0-3 as in the Hugging Face release, or a
letter a-d), subject_name, topic_name, exp; a few subjects map to specialties (MEDMCQA_SPECIALTIES)."""

from __future__ import annotations

from typing import Any

from clinqa.data.formats.common import Raw, RowError, question, record, require, text
from clinqa.data.schema import Question

# MedMCQA subject_name -> specialty, only where the subject clearly is one; others get none.
MEDMCQA_SPECIALTIES: dict[str, str] = {
    "Pediatrics": "pediatrics",
    "Gynaecology & Obstetrics": "obstetrics_gynecology",
    "Psychiatry": "psychiatry",
    "Skin": "dermatology",
    "Surgery": "surgery",
    "Microbiology": "infectious_diseases",
}
_MEDMCQA_OPTIONS = ("opa", "opb", "opc", "opd")


def _medmcqa_answer(cop: Any) -> str:
    if isinstance(cop, int) and not isinstance(cop, bool) and 0 <= cop <= 3:
        return "ABCD"[cop]
    if isinstance(cop, str) and cop.strip().upper() in ("A", "B", "C", "D"):
        return cop.strip().upper()
    raise RowError("cop", f"must be a 0-based index 0-3 (as in the Hugging Face release) or a letter a-d, got {cop!r}")


def from_medmcqa(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """MedMCQA: opa..opd are options A-D; cop is 0-based (0-3) or a letter; source medmcqa:{subject_name}."""
    rec = record(raw)
    options = {letter: text(require(rec, col)) for letter, col in zip("ABCD", _MEDMCQA_OPTIONS)}
    for letter, col in zip("ABCD", _MEDMCQA_OPTIONS):
        if isinstance(options[letter], str) and not options[letter].strip():
            raise RowError(col, f"option {letter} is empty")
    answer = _medmcqa_answer(require(rec, "cop"))
    subject = str(rec.get("subject_name") or "").strip()
    meta = {k: rec[k] for k in ("subject_name", "topic_name", "exp", "choice_type") if rec.get(k) is not None}
    fields = {
        "id": str(rec["id"]) if rec.get("id") is not None else f"medmcqa-{raw.line}",
        "question": require(rec, "question"),
        "options": options,
        "answer": answer,
        "specialties": [MEDMCQA_SPECIALTIES[subject]] if subject in MEDMCQA_SPECIALTIES else [],
        "source": f"medmcqa:{subject}" if subject else "medmcqa",
        "meta": meta,
    }
    names = {
        "answer": "cop",
        "specialties": "subject_name",
        **{f"options.{l}": c for l, c in zip("ABCD", _MEDMCQA_OPTIONS)},
    }
    return question(fields, names)
