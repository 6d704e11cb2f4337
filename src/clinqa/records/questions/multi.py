"""Questions that need two resources: the medication started for a diagnosis, and a lab value when a
drug was started or the first one after it."""

from __future__ import annotations

from collections import Counter
from datetime import date
from typing import Any

from clinqa.records.questions.facts import _dated, _qty_text, clean_name, drug_name
from clinqa.records.questions.maker import QuestionMaker
from clinqa.records.questions.vocabulary import LAB_FOR_DRUG
from clinqa.records.render import concept_text, medication_label


def multi(g: QuestionMaker) -> None:
    cands: list[tuple[str, Any]] = []
    conds = _dated(g.record, "Condition", g.now)
    meds = _dated(g.record, "MedicationRequest", g.now)
    names = Counter(clean_name(concept_text(r.get("code"))) for _, r, _ in conds)
    for key, cond, onset in conds:
        treated = [
            (k, r, d)
            for k, r, d in meds
            if d >= onset
            and any(
                (ref.get("reference") or "") == f"Condition/{cond.get('id')}" for ref in r.get("reasonReference") or []
            )
        ]
        if not treated and cond.get("encounter"):
            treated = [
                (k, r, d)
                for k, r, d in meds
                if d >= onset and r.get("encounter") == cond.get("encounter") and not r.get("reasonReference")
            ]
        if treated:
            name = clean_name(concept_text(cond.get("code")))
            label = name if names[name] == 1 else f"{name} (diagnosed {onset.isoformat()})"
            cands.append(("after_dx", (key, label, onset, treated)))
    first_start: dict[str, tuple[str, dict, date]] = {}
    for item in meds:
        first_start.setdefault(drug_name(medication_label(item[1], g.record, codes=False)), item)
    for drug, item in first_start.items():
        for word, measurement in LAB_FOR_DRUG:
            if word in drug and measurement in g.series:
                cands.append(("lab_at", (drug, item, g.series[measurement])))
                cands.append(("lab_after", (drug, item, g.series[measurement])))
                break
    made = 0
    for kind, payload in g.shuffled(cands):
        if made >= g.per_type:
            break
        made += _MULTI[kind](g, payload)


def _multi_after_dx(g: QuestionMaker, payload) -> bool:
    cond_key, label, onset, treated = payload
    displays = list(dict.fromkeys(medication_label(r, g.record, codes=False) for _, r, _ in treated))
    starts = "; ".join(f"{medication_label(r, g.record, codes=False)} (started {d.isoformat()})" for _, r, d in treated)
    return g.ask("multi_med_after_dx", "multi", {"condition": label}, answer=starts, value=displays,
                 relevant=[cond_key, *[k for k, _, _ in treated]], diagnosis_date=onset.isoformat())  # fmt: skip


def _multi_lab_at(g: QuestionMaker, payload) -> bool:
    drug, (med_key, med, start), s = payload
    before = [p for p in s.points if p.day <= start and (start - p.day).days <= 365]
    if not before or sum(1 for p in s.points if p.day == before[-1].day) != 1:
        return False
    m = before[-1]
    return g.ask("multi_lab_at_start", "multi", {"name": s.name, "drug": drug}, answer=f"{_qty_text(m)} (on {m.day.isoformat()})",
                 value=m.value, relevant=[med_key, m.rid], unit=s.unit, measurement=s.name,
                 drug_start=start.isoformat(), tolerance=0.0)  # fmt: skip


def _multi_lab_after(g: QuestionMaker, payload) -> bool:
    drug, (med_key, med, start), s = payload
    after = [p for p in s.points if p.day > start and (p.day - start).days <= 400]
    if not after or sum(1 for p in s.points if p.day == after[0].day) != 1:
        return False
    m = after[0]
    return g.ask("multi_lab_after_start", "multi", {"name": s.name, "drug": drug}, answer=f"{_qty_text(m)} (on {m.day.isoformat()})",
                 value=m.value, relevant=[med_key, m.rid], unit=s.unit, measurement=s.name,
                 drug_start=start.isoformat(), tolerance=0.0)  # fmt: skip


_MULTI = {"after_dx": _multi_after_dx, "lab_at": _multi_lab_at, "lab_after": _multi_lab_after}
