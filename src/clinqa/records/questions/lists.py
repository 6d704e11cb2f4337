"""List questions: the active medications, the active problems, the recorded allergies."""

from __future__ import annotations

from clinqa.records.questions.facts import _dated, _is_active_condition
from clinqa.records.questions.maker import QuestionMaker
from clinqa.records.questions.vocabulary import _BAD_VERIFICATION
from clinqa.records.render import concept_text, medication_label, resource_date, status_code


def lists(g: QuestionMaker) -> None:
    made = 0
    for kind in g.shuffled(["medications", "conditions", "allergies"]):
        if made >= g.per_type:
            break
        made += bool(_LISTS[kind](g))


def _list_medications(g: QuestionMaker) -> bool:
    meds = _dated(g.record, "MedicationRequest", g.now)
    if not meds:
        return False
    active = [
        (k, r)
        for k, r, _ in meds
        if r.get("status") == "active" and r.get("intent", "order") in ("order", "plan", "original-order")
    ]
    names = list(dict.fromkeys(medication_label(r, g.record, codes=False) for _, r in active))
    answer = "; ".join(names) if names else "none (no active medication in the record)"
    return g.ask("list_medications", "list", {}, answer=answer, value=names, relevant=[k for k, _ in active])


def _list_conditions(g: QuestionMaker) -> bool:
    conds = _dated(g.record, "Condition", g.now)
    if not conds:
        return False
    active = [(k, r) for k, r, _ in conds if _is_active_condition(r, g.now)]
    names = list(dict.fromkeys(concept_text(r.get("code")) for _, r in active))
    answer = "; ".join(names) if names else "none (no active condition in the record)"
    return g.ask("list_conditions", "list", {}, answer=answer, value=names, relevant=[k for k, _ in active])


def _list_allergies(g: QuestionMaker) -> bool:
    found = []
    for k, r in g.record.resources.items():
        if r.get("resourceType") != "AllergyIntolerance":
            continue
        day = resource_date(r)
        if day is not None and day > g.now:
            continue
        if status_code(r.get("verificationStatus")) in _BAD_VERIFICATION or status_code(r.get("clinicalStatus")) in (
            "inactive",
            "resolved",
        ):
            continue
        found.append((k, r))
    if not found:
        return False  # no recorded allergies is not the same as "no known allergies"
    names = list(dict.fromkeys(concept_text(r.get("code")) for _, r in found))
    return g.ask("list_allergies", "list", {}, answer="; ".join(names), value=names, relevant=[k for k, _ in found])


_LISTS = {"medications": _list_medications, "conditions": _list_conditions, "allergies": _list_allergies}
