"""What the record holds and what it lacks: existence questions ("has the patient ever ...", yes from
the record, no for probes it does not contain, about half each) and unanswerable questions (a lab
or a condition the record does not contain: the answer is "not in the record")."""

from __future__ import annotations

from datetime import date
from typing import Any

from clinqa.records.questions.facts import _codes, _dated, clean_name, drug_name
from clinqa.records.questions.maker import QuestionMaker
from clinqa.records.questions.model import NOT_IN_RECORD
from clinqa.records.questions.vocabulary import (
    _ADMIN_PROCEDURES,
    CONDITION_PROBES,
    LAB_PROBES,
    MEDICATION_PROBES,
    VACCINE_GROUPS,
)
from clinqa.records.render import concept_text, medication_label


def exists(g: QuestionMaker) -> None:
    cands: list[tuple[str, Any]] = []
    conds = _dated(g.record, "Condition", g.now)
    by_cond: dict[str, list[tuple[str, dict, date]]] = {}
    for item in conds:
        by_cond.setdefault(clean_name(concept_text(item[1].get("code"))), []).append(item)
    cands += [("cond_yes", (n, items)) for n, items in by_cond.items() if n]
    meds = _dated(g.record, "MedicationRequest", g.now)
    by_med: dict[str, list[tuple[str, dict, date]]] = {}
    for item in meds:
        by_med.setdefault(drug_name(medication_label(item[1], g.record, codes=False)), []).append(item)
    cands += [("med_yes", (n, items)) for n, items in by_med.items() if n]
    procs = _dated(g.record, "Procedure", g.now)
    by_proc: dict[str, list[tuple[str, dict, date]]] = {}
    for item in procs:
        if (
            item[1].get("status") in ("completed", None)
            and not {c for _, c in _codes(item[1].get("code"))} & _ADMIN_PROCEDURES
        ):
            by_proc.setdefault(clean_name(concept_text(item[1].get("code"))), []).append(item)
    cands += [("proc_yes", (n, items)) for n, items in by_proc.items() if n]
    vax = _dated(g.record, "Immunization", g.now)
    by_vax: dict[str, list[tuple[str, dict, date]]] = {}
    for item in vax:
        if item[1].get("status") == "completed":
            group = next(
                (VACCINE_GROUPS[c] for _, c in _codes(item[1].get("vaccineCode")) if c in VACCINE_GROUPS), None
            )
            if group:
                by_vax.setdefault(group, []).append(item)
    cands += [("vax_yes", (n, items)) for n, items in by_vax.items()]
    absent_conds = _absent_conditions(g)
    absent_meds = [
        m
        for m in MEDICATION_PROBES
        if not any(m in medication_label(r, g.record, codes=False).lower() for _, r, _ in meds)
    ]
    # a yes/no balance: about half the questions are "no"
    no_cands = [("cond_no", n) for n in absent_conds] + [("med_no", m) for m in absent_meds]
    yes, no = g.shuffled(cands), g.shuffled(no_cands)
    made_yes = made_no = 0
    want_no = g.per_type // 2 + (g.per_type % 2 if g.rng.random() < 0.5 else 0)
    want_yes = g.per_type - want_no
    for kind, payload in yes:
        if made_yes >= want_yes:
            break
        made_yes += _exists_yes(g, kind, payload)
    for kind, payload in no:
        if made_no >= g.per_type - made_yes:
            break
        made_no += _exists_no(g, kind, payload)


def _exists_yes(g: QuestionMaker, kind: str, payload: Any) -> bool:
    name, items = payload
    first_key, first, first_day = items[0]
    template = {"cond_yes": "exists_condition", "med_yes": "exists_medication", "proc_yes": "exists_procedure",
                "vax_yes": "exists_vaccine"}[kind]  # fmt: skip
    what = (
        concept_text(first.get("code") or first.get("vaccineCode"))
        if kind != "med_yes"
        else medication_label(first, g.record, codes=False)
    )
    dates = ", ".join(dict.fromkeys(d.isoformat() for _, _, d in items))
    return g.ask(template, "exists", {"name": name}, answer=f"Yes: {what} ({dates})", value=True,
                 relevant=[k for k, _, _ in items], probe=name)  # fmt: skip


def _exists_no(g: QuestionMaker, kind: str, name: str) -> bool:
    template = "exists_condition" if kind == "cond_no" else "exists_medication"
    return g.ask(template, "exists", {"name": name}, answer="No", value=False, relevant=[], probe=name)


def _absent_conditions(g: QuestionMaker) -> list[str]:
    conds = [r for r in g.record.resources.values() if r.get("resourceType") == "Condition"]
    codes = {c for r in conds for _, c in _codes(r.get("code"))}
    texts = " | ".join(concept_text(r.get("code")).lower() for r in conds)
    return [
        name for name, snomed, words in CONDITION_PROBES if not (codes & snomed) and not any(w in texts for w in words)
    ]


def _absent_labs(g: QuestionMaker) -> list[str]:
    obs = [r for r in g.record.resources.values() if r.get("resourceType") == "Observation"]
    codes, texts = set(), []
    for r in obs:
        for node in [r, *[c for c in r.get("component") or [] if isinstance(c, dict)]]:
            codes |= {c for _, c in _codes(node.get("code"))}
            texts.append(concept_text(node.get("code")).lower())
    joined = " | ".join(texts)
    return [name for name, loinc, words in LAB_PROBES if not (codes & loinc) and not any(w in joined for w in words)]


def unanswerable(g: QuestionMaker) -> None:
    encounter_days = [d for _, _, d in _dated(g.record, "Encounter", g.now)] or [g.now]
    cands = [("lab", n) for n in _absent_labs(g)] + [("cond", n) for n in _absent_conditions(g)]
    made = 0
    for kind, name in g.shuffled(cands):
        if made >= g.per_type:
            break
        if kind == "lab":
            made += g.ask("unanswerable_lab", "unanswerable", {"name": name, "date": g.rng.choice(encounter_days).isoformat()},
                          answer=NOT_IN_RECORD, value=None, relevant=[], probe=name)  # fmt: skip
        else:
            made += g.ask("unanswerable_condition", "unanswerable", {"name": name}, answer=NOT_IN_RECORD, value=None,
                          relevant=[], probe=name)  # fmt: skip
