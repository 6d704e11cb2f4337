"""Metrics for two-stage record QA: stage 1 (which resources were selected) and stage 2 (the answer).

Stage 1: precision, recall and F1 of the selected resource ids against a question's `relevant_ids`,
micro-averaged over questions, and broken down per resource type and per question type
(`stage1_metrics`).

Stage 2, per answer (`answer_metrics`) and summarised over a run (`summarize`):
- METEOR (nltk, with WordNet from Debian's wordnet-base through `clinqa.records.wordnet`; offline)
  and ROUGE-L F1 (rouge-score, Porter stemming) against the reference answer. Citations like
  ``[Observation/abc]`` are removed from the answer first: the reference has none.
- exact match, where the reference has a checkable value (`exact_match`): numbers within 1% or 0.05
  absolute (or the question's own tolerance if larger), with a unit check when the answer states a
  unit; dates on the same day; lists as sets (case-insensitive); yes/no; trend labels; abstention
  for unanswerable questions. Free-text references give None (not applicable).
- citation precision: the share of cited ids (this record's and other ones') that are in
  `relevant_ids`; answers with no citation do not count.
- abstention rate on unanswerable questions (the answer says it is not in the record) and
  false-abstention rate on answerable ones.
"""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from typing import Any

from clinqa.records.fhir import parse_date

NOT_IN_RECORD_ANSWER = "Not in the record."

REL_TOLERANCE = 0.01
ABS_TOLERANCE = 0.05

# ------------------------------------------------------------------------------------- text helpers

_BRACKET = re.compile(r"\[([^\[\]\n]{1,400})\]")
_HANDLE = re.compile(r"\b([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})")
_ABSTAIN = re.compile(
    r"\bnot (?:\w+ ){0,2}(?:in|on|within|from) (?:the |this )?(?:patient'?s? )?(?:medical |health |provided |available )?"
    r"(?:record|records|chart|entries|data)\b"
    r"|\bno (?:relevant |such )?(?:information|data|entry|entries|record) (?:is |was )?(?:available|found|provided|recorded|about|on|for|in)\b"
    r"|\bcannot (?:be )?(?:determined|answered|found|tell)\b"
    r"|\bunable to (?:determine|answer|find)\b",
    re.I,
)


@functools.lru_cache(maxsize=512)
def is_resource_type(name: str) -> bool:
    """True for FHIR resource type names (Observation, Condition, ...), so '[Mass/volume]' is no citation."""
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    try:
        return issubclass(get_fhir_model_class(name), Resource)
    except (ValueError, KeyError, AttributeError):
        return False


def parse_citations(text: str) -> list[str]:
    """``Type/id`` handles cited in square brackets, in order of first appearance, without repeats.

    ``[Observation/a]``, ``[Observation/a, Condition/b]`` and ``[Observation/a; Condition/b]`` all count."""
    out: dict[str, None] = {}
    for inside in _BRACKET.findall(text or ""):
        for rtype, rid in _HANDLE.findall(inside):
            if not is_resource_type(rtype):
                continue
            out.setdefault(f"{rtype}/{rid.rstrip('.')}", None)
    return list(out)


def strip_citations(text: str) -> str:
    """The answer without bracketed citations (for text-overlap metrics)."""
    cleaned = _BRACKET.sub(lambda m: " " if _HANDLE.search(m.group(1)) else m.group(0), text or "")
    return re.sub(r"\s+([.,;:])", r"\1", re.sub(r"[ \t]+", " ", cleaned)).strip()


def is_abstention(text: str) -> bool:
    """True when the answer says the record does not hold the answer ("Not in the record.", "This is not
    documented in the patient's record", "cannot be determined ...")."""
    return bool(_ABSTAIN.search(text or ""))


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+(?:[.'/-]\w+)*|[^\w\s]", (text or "").lower())


# ------------------------------------------------------------------------------------- stage 1


def prf(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """Precision, recall, F1 (0 where undefined) with the counts."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "tp": tp, "fp": fp, "fn": fn}


def stage1_metrics(
    selected: Sequence[Iterable[str]],
    relevant: Sequence[Iterable[str]],
    *,
    qtypes: Sequence[str] | None = None,
    types: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """Micro precision/recall/F1 of `selected` ids against `relevant` ids (one entry per question),
    and the same per resource type (`types`: id -> resource type, one mapping for all questions or one
    per question; unknown ids count as "?") and per question type (`qtypes`). `macro_f1` averages the
    per-question F1 over questions that have relevant ids."""
    if len(selected) != len(relevant):
        raise ValueError(f"{len(selected)} selections for {len(relevant)} questions")
    if qtypes is not None and len(qtypes) != len(selected):
        raise ValueError(f"{len(qtypes)} question types for {len(selected)} questions")
    per_question_types = types is not None and not isinstance(types, Mapping)
    if per_question_types and len(types) != len(selected):  # type: ignore[arg-type]
        raise ValueError("types must be one mapping, or one per question")
    total = [0, 0, 0]
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    by_qtype: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    f1s = []
    for i, (sel, rel) in enumerate(zip(selected, relevant)):
        s, r = set(sel), set(rel)
        tmap = (types[i] if per_question_types else types) or {}  # type: ignore[index]
        counts = (len(s & r), len(s - r), len(r - s))
        for k in range(3):
            total[k] += counts[k]
        if qtypes is not None:
            for k in range(3):
                by_qtype[qtypes[i]][k] += counts[k]
        for rid in s | r:
            slot = by_type[tmap.get(rid, "?")]
            slot[0 if rid in s and rid in r else 1 if rid in s else 2] += 1
        if r:
            f1s.append(prf(*counts)["f1"])
    return {
        "micro": prf(*total),
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "by_resource_type": {t: prf(*c) for t, c in sorted(by_type.items())},
        "by_qtype": {q: prf(*c) for q, c in sorted(by_qtype.items())},
        "n_questions": len(selected),
        "mean_selected": sum(len(set(s)) for s in selected) / len(selected) if selected else 0.0,
    }


# ------------------------------------------------------------------------------------- text overlap


def meteor(reference: str, candidate: str, *, wordnet=None) -> float:
    """METEOR (nltk.translate.meteor_score) of `candidate` against one reference; citations removed,
    lower-cased word tokens. WordNet comes from `ensure_wordnet()` (ClinqaError if not installed)."""
    from nltk.translate.meteor_score import meteor_score

    from clinqa.records.wordnet import ensure_wordnet

    wn = wordnet if wordnet is not None else ensure_wordnet()
    ref, hyp = _tokens(reference), _tokens(strip_citations(candidate))
    if not ref or not hyp:
        return 0.0
    return float(meteor_score([ref], hyp, wordnet=wn))


_ROUGE = None


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1 (rouge-score, Porter stemmer) of `candidate` (citations removed) against `reference`."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_ROUGE.score(reference or "", strip_citations(candidate))["rougeL"].fmeasure)


# ------------------------------------------------------------------------------------- exact match

_MONTHS = {m: i for i, m in enumerate(
    ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november",
     "december"], start=1)}  # fmt: skip
_MONTHS.update({m[:3]: i for m, i in list(_MONTHS.items())})
_MONTHS["sept"] = 9
_MON = "|".join(sorted(_MONTHS, key=len, reverse=True))
_DATE_PATTERNS = [
    (re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})(?:T[\d:.]+(?:Z|[+-]\d\d:?\d\d)?)?\b"), ("y", "m", "d")),
    (re.compile(r"\b(\d{4})/(\d{1,2})/(\d{1,2})\b"), ("y", "m", "d")),
    (re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b"), ("m", "d", "y")),  # US order, as clinicians write it
    (re.compile(rf"\b({_MON})\.? (\d{{1,2}})(?:st|nd|rd|th)?,? (\d{{4}})\b", re.I), ("mon", "d", "y")),
    (re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)? ({_MON})\.?,? (\d{{4}})\b", re.I), ("d", "mon", "y")),
]
_NUMBER = re.compile(r"(?<![\w.])(?<![A-Za-z]-)[-+]?\d+(?:\.\d+)?(?![\d])")
_UNIT_ALIASES = {
    "mm[hg]": "mmhg", "mmhg": "mmhg", "mm hg": "mmhg", "/min": "/min", "bpm": "/min", "beats/min": "/min",
    "breaths/min": "/min", "{beats}/min": "/min", "{breaths}/min": "/min", "per minute": "/min", "cel": "c", "°c": "c",
    "degc": "c", "c": "c", "[degf]": "f", "°f": "f", "f": "f", "kg/m2": "kg/m2", "kg/m^2": "kg/m2", "kg/m²": "kg/m2",
    "percent": "%", "%": "%", "[lb_av]": "lb", "lb": "lb", "lbs": "lb", "[in_i]": "in", "in": "in",
}  # fmt: skip
_UNIT_WORDS = {"mg", "g", "kg", "cm", "m", "mm", "l", "ml", "dl", "mmol", "mol", "meq", "iu", "u", "lb", "in", "mmhg",
               "c", "f", "%", "/min", "kg/m2", "ng", "pg", "ug", "mcg", "miu", "uiu", "fl", "cells", "score"}  # fmt: skip
_TRENDS = {
    "increasing": ("increasing", "increase", "increased", "rising", "rise", "upward", "trending up", "going up", "higher"),
    "decreasing": ("decreasing", "decrease", "decreased", "falling", "declining", "downward", "trending down",
                   "going down", "lower"),
    "stable": ("stable", "unchanged", "steady", "flat", "no significant change", "consistent"),
}  # fmt: skip


def _norm_unit(unit: str) -> str:
    u = unit.strip().lower().rstrip(".,;")
    if u in _UNIT_ALIASES:
        return _UNIT_ALIASES[u]
    u = re.sub(r"[\[\]{}_\s]", "", u).replace("^", "")
    return _UNIT_ALIASES.get(u, u)


def _unit_like(token: str) -> bool:
    n = _norm_unit(token)
    return bool(n) and (n in _UNIT_WORDS or "/" in n or "%" in n or "°" in token)


def find_dates(text: str) -> list[date]:
    """Calendar dates written in `text` (ISO, YYYY/MM/DD, MM/DD/YYYY, "March 4, 2021", "4 March 2021")."""
    out = []
    for pattern, order in _DATE_PATTERNS:
        for m in pattern.finditer(text or ""):
            parts = dict(zip(order, m.groups()))
            month = _MONTHS.get(parts["mon"].lower().rstrip(".")) if "mon" in parts else int(parts["m"])
            try:
                out.append(date(int(parts["y"]), int(month), int(parts["d"])))  # type: ignore[arg-type]
            except (ValueError, TypeError):
                continue
    return out


def _without_dates(text: str) -> str:
    for pattern, _ in _DATE_PATTERNS:
        text = pattern.sub(" ", text)
    return text


def find_numbers(text: str, *, unit: str | None = None) -> list[tuple[float, str | None]]:
    """(number, unit written right after it or None) for each number in `text`, citations and dates
    removed first, and the reference `unit` (e.g. "mL/min/{1.73_m2}") blanked so its digits do not count.
    A digit glued to a word ("A1c", "PHQ-9") is not a number."""
    text = _without_dates(strip_citations(text or ""))
    if unit:
        text = re.sub(re.escape(unit), " UNITREF ", text, flags=re.I)
    out = []
    for m in _NUMBER.finditer(text):
        after = text[m.end() : m.end() + 24]
        um = re.match(r"\s?(UNITREF|[^\s,;()]+)", after)
        token = um.group(1) if um else ""
        written = unit if token == "UNITREF" else (token if token and _unit_like(token) else None)
        out.append((float(m.group(0)), written))
    return out


def numbers_close(a: float, b: float, tolerance: float = 0.0) -> bool:
    """|a - b| within 1% of b, 0.05 absolute, or `tolerance`, whichever is largest."""
    return abs(a - b) <= max(REL_TOLERANCE * abs(b), ABS_TOLERANCE, tolerance or 0.0) + 1e-9


def _unit_ok(written: str | None, reference_unit: str | None) -> bool:
    if not written or not reference_unit:
        return True
    return _norm_unit(written) == _norm_unit(reference_unit)


def _list_items(text: str) -> list[str]:
    body = strip_citations(text)
    parts = [p for p in re.split(r"[;\n]+", body) if p.strip()]
    if len(parts) <= 1:
        parts = [p for p in re.split(r",|\band\b", body) if p.strip()]
    return [n for n in (_norm_item(p) for p in parts) if n]


def _norm_item(text: str) -> str:
    t = text.split(":")[-1] if ":" in text and not re.search(r"\d:\d", text) else text
    t = re.sub(r"\([^()]*\)", " ", t)
    t = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s+", "", t)
    t = re.sub(r"\s+", " ", t).strip().strip(".,;:!?\"'").strip()
    return t.lower()


def _is_none_answer(text: str) -> bool:
    return bool(
        re.search(r"\bnone\b|\bno (?:active|current|known|recorded)\b|\bnot (?:taking|on) any\b", text or "", re.I)
    )


def answer_kind(question: Any) -> str | None:
    """How `exact_match` checks a question's answer: "abstain", "yesno", "number", "number_list", "list",
    "date", "trend", or None (free text: no exact match)."""
    qtype = getattr(question, "qtype", None)
    value = getattr(question, "answer_value", None)
    if qtype == "unanswerable":
        return "abstain"
    if isinstance(value, bool):
        return "yesno"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value:
            return "number_list"
        return "list"
    if isinstance(value, str):
        if qtype == "trend" or value in _TRENDS:
            return "trend"
        if len(value) >= 10 and parse_date(value) is not None:
            return "date"
    return None


def _tolerance(question: Any) -> float:
    meta = getattr(question, "meta", None) or {}
    try:
        return float(meta.get("tolerance") or 0.0)
    except (TypeError, ValueError):
        return 0.0


def exact_match(question: Any, answer: str) -> bool | None:
    """Whether `answer` gives the reference value of `question` (a RecordQuestion, or anything with
    qtype, answer_value, unit, question, meta); None when the reference is free text."""
    kind = answer_kind(question)
    if kind is None:
        return None
    text = answer or ""
    if kind == "abstain":
        return is_abstention(text)
    if is_abstention(text):
        return False
    value = question.answer_value
    unit = getattr(question, "unit", None)
    if kind == "yesno":
        m = re.search(r"\b(yes|no)\b", text, re.I)
        return bool(m) and (m.group(1).lower() == "yes") == bool(value)
    if kind == "trend":
        hits = sorted((m.start(), label) for label, words in _TRENDS.items() for w in words
                      for m in [re.search(rf"\b{re.escape(w)}\b", text, re.I)] if m)  # fmt: skip
        return bool(hits) and hits[0][1] == value
    if kind == "date":
        ref = parse_date(value)
        return ref in find_dates(text)
    if kind == "number":
        found = find_numbers(text, unit=unit)
        in_question = {v for v, _ in find_numbers(getattr(question, "question", ""))}
        kept = [(v, u) for v, u in found if v not in in_question] or found  # numbers restated from the question
        if not kept:
            return False
        v, u = kept[0]
        return numbers_close(v, float(value), _tolerance(question)) and _unit_ok(u, unit)
    if kind == "number_list":
        found = find_numbers(text, unit=unit)
        in_question = {v for v, _ in find_numbers(getattr(question, "question", ""))}
        values = [v for v, _ in found if v not in in_question or any(numbers_close(v, r) for r in value)]
        if not values or any(not _unit_ok(u, unit) for _, u in found):
            return False
        tol = _tolerance(question)
        return all(any(numbers_close(c, r, tol) for c in values) for r in value) and all(
            any(numbers_close(c, r, tol) for r in value) for c in values
        )
    # list of strings, as sets, case-insensitive
    ref_items = {_norm_item(str(v)) for v in value}
    ref_items.discard("")
    if not ref_items:
        return _is_none_answer(text)
    return set(_list_items(text)) == ref_items


# ------------------------------------------------------------------------------------- per answer


def citation_counts(cited: Iterable[str], relevant: Iterable[str]) -> tuple[int, int]:
    """(cited ids that are relevant, cited ids) with repeats removed."""
    c = list(dict.fromkeys(cited))
    r = set(relevant)
    return sum(1 for x in c if x in r), len(c)


def citation_precision(cited: Iterable[str], relevant: Iterable[str]) -> float | None:
    """The share of cited ids that are in `relevant`; None when nothing is cited."""
    good, n = citation_counts(cited, relevant)
    return good / n if n else None


def answer_metrics(question: Any, answer: str, citations: Iterable[str] = (), invalid_citations: Iterable[str] = (),
                   *, with_meteor: bool = True, wordnet=None) -> dict[str, Any]:  # fmt: skip
    """Per-answer stage-2 metrics. `citations` are this record's ids (as in relevant_ids);
    `invalid_citations` were cited but belong to no resource of this record: they count against
    citation precision."""
    cited = list(dict.fromkeys(citations))
    invalid = list(dict.fromkeys(invalid_citations))
    good, _ = citation_counts(cited, question.relevant_ids)
    n_cited = len(cited) + len(invalid)
    return {
        "exact_match": exact_match(question, answer),
        "meteor": meteor(question.answer, answer, wordnet=wordnet) if with_meteor else None,
        "rouge_l": rouge_l(question.answer, answer),
        "abstained": is_abstention(answer),
        "answerable": question.qtype != "unanswerable",
        "cited": n_cited,
        "cited_relevant": good,
        "citation_precision": good / n_cited if n_cited else None,
        "invalid_citations": len(invalid),
    }


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def stage2_summary(rows: Sequence[Mapping[str, Any]], qtypes: Sequence[str] | None = None) -> dict[str, Any]:
    """Aggregate `answer_metrics` rows: mean METEOR, ROUGE-L, exact match (over questions where it
    applies), micro citation precision, abstention and false-abstention rates; per question type too."""

    def block(rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        em = [r["exact_match"] for r in rs if r.get("exact_match") is not None]
        cited = sum(r.get("cited", 0) for r in rs)
        unans = [r for r in rs if not r.get("answerable", True)]
        ans = [r for r in rs if r.get("answerable", True)]
        return {
            "n": len(rs),
            "exact_match": sum(map(bool, em)) / len(em) if em else None,
            "exact_match_n": len(em),
            "meteor": _mean(r.get("meteor") for r in rs),
            "rouge_l": _mean(r.get("rouge_l") for r in rs),
            "citation_precision": sum(r.get("cited_relevant", 0) for r in rs) / cited if cited else None,
            "cited_answer_rate": sum(1 for r in rs if r.get("cited", 0)) / len(rs) if rs else None,
            "invalid_citation_rate": sum(1 for r in rs if r.get("invalid_citations", 0)) / len(rs) if rs else None,
            "abstention_rate": sum(bool(r.get("abstained")) for r in unans) / len(unans) if unans else None,
            "false_abstention_rate": sum(bool(r.get("abstained")) for r in ans) / len(ans) if ans else None,
        }

    out = block(rows)
    if qtypes is not None:
        groups: dict[str, list] = defaultdict(list)
        for r, q in zip(rows, qtypes):
            groups[q].append(r)
        out["by_qtype"] = {q: block(rs) for q, rs in sorted(groups.items())}
    return out


__all__ = [
    "ABS_TOLERANCE", "NOT_IN_RECORD_ANSWER", "REL_TOLERANCE", "answer_kind", "answer_metrics", "citation_counts",
    "citation_precision", "exact_match", "find_dates", "find_numbers", "is_abstention", "meteor", "numbers_close",
    "parse_citations", "prf", "rouge_l", "stage1_metrics", "stage2_summary", "strip_citations",
]  # fmt: skip
