"""The FHIR resources of a synthetic patient: one method per resource kind (Observation, vital signs,
a lab panel with its DiagnosticReport, Condition, Procedure, Immunization, AllergyIntolerance, the
MedicationRequests at the end), each added to the patient's entries with a seeded id."""

from __future__ import annotations

import random
import uuid
from datetime import date, timedelta
from typing import Any

from clinqa.records.render import resource_datetime
from clinqa.records.synth.codes import (
    ACUTE,
    BP_PANEL,
    CONDITIONS,
    CVX,
    DIASTOLIC,
    DRUGS,
    INTERPRETATION,
    LOINC,
    OBS_CATEGORY,
    PANELS,
    PROCEDURES,
    PUFF,
    REACTIONS,
    RXNORM,
    SMOKING,
    SMOKING_VALUES,
    SNOMED,
    SYSTOLIC,
    TESTS,
    VACCINES,
)
from clinqa.records.synth.common import _cc, _Prescription, _qty, _round, _Visit


class ResourceBuilder:
    """Mixin of `_Patient`: makes and adds resources. Needs rng, now, entries, patient, practitioner,
    conditions, rx, last_panel, and the physiology methods it measures."""

    rng: random.Random
    now: date
    entries: list[dict]
    patient: dict
    practitioner: dict
    conditions: dict[str, dict]
    rx: list[_Prescription]
    last_panel: dict[str, date]

    # -- resources -----------------------------------------------------------------------------
    def uid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def add(self, resource: dict) -> dict:
        self.entries.append(resource)
        return resource

    @staticmethod
    def ref(resource: dict) -> dict:
        return {"reference": f"urn:uuid:{resource['id']}"}

    @staticmethod
    def when(day: date, minute: int = 0) -> str:
        return f"{day.isoformat()}T{minute // 60:02d}:{minute % 60:02d}:00+00:00"

    # -- building blocks -----------------------------------------------------------------------
    def observation(self, visit: _Visit, key: str, value: float, *, minute_offset: int = 0) -> dict:
        t = TESTS[key]
        value = _round(value, t.decimals)
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": self.uid(),
            "status": "final",
            "category": [
                {
                    "coding": [
                        {"system": OBS_CATEGORY, "code": t.category, "display": t.category.replace("-", " ").title()}
                    ]
                }
            ],
            "code": _cc(LOINC, t.code, t.display),
            "subject": self.ref(self.patient),
            "encounter": self.ref(visit.resource),
            "effectiveDateTime": self.when(visit.day, visit.minute),
            "issued": self.when(visit.day, min(visit.minute + minute_offset, 23 * 60 + 59)),
            "valueQuantity": _qty(value, t.unit),
        }
        low, high = t.low, t.high
        if key == "hemoglobin":
            low, high = (12.0, 15.5) if self.gender == "female" else (13.5, 17.5)
        if low is not None or high is not None:
            rr: dict[str, Any] = {}
            if low is not None:
                rr["low"] = _qty(low, t.unit)
            if high is not None:
                rr["high"] = _qty(high, t.unit)
            obs["referenceRange"] = [rr]
            flag = "H" if high is not None and value > high else "L" if low is not None and value < low else None
            if flag:
                obs["interpretation"] = [_cc(INTERPRETATION, flag, "High" if flag == "H" else "Low")]
        return self.add(obs)

    def vitals(self, visit: _Visit, *, height: bool, acute: bool = False) -> None:
        sbp, dbp = self.blood_pressure(visit.day)
        self.add({
            "resourceType": "Observation",
            "id": self.uid(),
            "status": "final",
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs", "display": "Vital Signs"}]}],
            "code": _cc(LOINC, *BP_PANEL),
            "subject": self.ref(self.patient),
            "encounter": self.ref(visit.resource),
            "effectiveDateTime": self.when(visit.day, visit.minute),
            "issued": self.when(visit.day, visit.minute),
            "component": [
                {"code": _cc(LOINC, *SYSTOLIC), "valueQuantity": _qty(int(round(sbp)), "mm[Hg]")},
                {"code": _cc(LOINC, *DIASTOLIC), "valueQuantity": _qty(int(round(dbp)), "mm[Hg]")},
            ],
        })  # fmt: skip
        self.observation(visit, "heart_rate", self.heart_rate(visit.day))
        weight = self.weight(visit.day)
        if height:
            self.observation(visit, "height", self.height + self.rng.gauss(0, 0.3))
        self.observation(visit, "weight", weight)
        bmi = _round(weight / (self.height / 100) ** 2, 1)
        self.observation(visit, "bmi", bmi)
        if bmi >= 30 and "obesity" not in self.conditions:
            self.condition(visit, "obesity", category="problem-list-item")
        if acute:
            febrile = any(a in ("strep", "sinusitis", "bronchitis", "uti") for a in visit.about)
            self.observation(
                visit, "temperature", self.rng.uniform(37.8, 38.9) if febrile else self.rng.uniform(36.4, 37.2)
            )
            self.observation(visit, "resp_rate", self.rng.uniform(14, 20))
            if "bronchitis" in visit.about:
                self.observation(visit, "spo2", self.rng.uniform(94, 98))

    def panel(self, visit: _Visit, name: str) -> None:
        (code, display), tests = PANELS[name]
        results = []
        creat = self.creatinine(visit.day)
        values = {
            "hemoglobin": lambda: self.hemoglobin(visit.day),
            "wbc": lambda: (
                self.wbc0 + self.rng.gauss(0, 0.6) + (3.5 if any(a in ("strep", "uti") for a in visit.about) else 0)
            ),
            "platelets": lambda: self.plt0 + self.rng.gauss(0, 18),
            "glucose": lambda: 28.7 * self.a1c(visit.day) - 46.7 + self.rng.gauss(0, 9),
            "creatinine": lambda: creat,
            "egfr": lambda: self.egfr(_round(creat, 2), visit.day),
            "potassium": lambda: (
                self.k0
                + self.rng.gauss(0, 0.15)
                + (0.2 if {"lisinopril", "losartan"} & set(self.active_drugs(visit.day)) else 0)
                + (0.25 if self._since("ckd3", visit.day) is not None and self._since("ckd3", visit.day) >= 0 else 0)
                - (0.25 if "hctz" in self.active_drugs(visit.day) else 0)
            ),
            "sodium": lambda: self.na0 + self.rng.gauss(0, 1.2),
        }
        if name == "lipid":
            ldl = _round(self.ldl(visit.day), 0)
            hdl = _round(self.hdl0 + self.rng.gauss(0, 3), 0)
            tg = _round(self.tg0 + (40 if "diabetes" in self.conditions else 0) + self.rng.gauss(0, 14), 0)
            values = {
                "ldl": lambda: ldl,
                "hdl": lambda: hdl,
                "triglycerides": lambda: tg,
                "cholesterol": lambda: ldl + hdl + tg / 5,
            }
        for key in tests:
            results.append(self.observation(visit, key, values[key](), minute_offset=90))
        self.add({
            "resourceType": "DiagnosticReport",
            "id": self.uid(),
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB", "display": "Laboratory"}]}],
            "code": _cc(LOINC, code, display),
            "subject": self.ref(self.patient),
            "encounter": self.ref(visit.resource),
            "effectiveDateTime": self.when(visit.day, visit.minute),
            "issued": self.when(visit.day, min(visit.minute + 90, 23 * 60 + 59)),
            "result": [{**self.ref(o), "display": o["code"]["text"]} for o in results],
        })  # fmt: skip
        self.last_panel[name] = visit.day

    def condition(
        self, visit: _Visit | None, key: str, *, onset: date | None = None, category: str = "encounter-diagnosis"
    ) -> dict:
        code, display = CONDITIONS.get(key) or ACUTE[key][:2]
        day = onset or visit.day  # type: ignore[union-attr]
        res: dict[str, Any] = {
            "resourceType": "Condition",
            "id": self.uid(),
            "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
            "verificationStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"),
            "category": [_cc("http://terminology.hl7.org/CodeSystem/condition-category", category,
                             "Problem List Item" if category == "problem-list-item" else "Encounter Diagnosis")],
            "code": _cc(SNOMED, code, display),
            "subject": self.ref(self.patient),
            "onsetDateTime": self.when(day, visit.minute if visit else 0),
            "recordedDate": self.when(visit.day if visit else day, visit.minute if visit else 0),
        }  # fmt: skip
        if visit is not None:
            res["encounter"] = self.ref(visit.resource)
        self.conditions[key] = res
        return self.add(res)

    def resolve_condition(self, key: str, day: date) -> None:
        res = self.conditions[key]
        res["clinicalStatus"] = _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "resolved", "Resolved")
        res["abatementDateTime"] = self.when(day)

    def prescribe(
        self, drug: str, day: date, condition: str | None, visit: _Visit | None, *, days: int | None = None
    ) -> _Prescription:
        p = _Prescription(drug, day, condition, visit=visit)
        if days is not None:
            p.end = day + timedelta(days=days)
        self.rx.append(p)
        return p

    def stop(self, drug: str, day: date) -> None:
        for p in self.rx:
            if p.drug == drug and p.end is None:
                p.end, p.status = day, "stopped"

    def procedure(self, visit: _Visit, key: str, *, reason: str | None = None, minutes: int = 15) -> dict:
        code, display = PROCEDURES[key]
        res: dict[str, Any] = {
            "resourceType": "Procedure",
            "id": self.uid(),
            "status": "completed",
            "code": _cc(SNOMED, code, display),
            "subject": self.ref(self.patient),
            "encounter": self.ref(visit.resource),
            "performedPeriod": {"start": self.when(visit.day, visit.minute), "end": self.when(visit.day, min(visit.minute + minutes, 23 * 60 + 59))},
        }  # fmt: skip
        if reason and reason in self.conditions:
            res["reasonReference"] = [
                {**self.ref(self.conditions[reason]), "display": self.conditions[reason]["code"]["text"]}
            ]
        return self.add(res)

    def immunize(self, day: date, key: str, visit: _Visit | None) -> None:
        code, display = VACCINES[key]
        res: dict[str, Any] = {
            "resourceType": "Immunization",
            "id": self.uid(),
            "status": "completed",
            "vaccineCode": _cc(CVX, code, display),
            "patient": self.ref(self.patient),
            "occurrenceDateTime": self.when(day, visit.minute if visit else 600),
            "primarySource": True,
        }
        if visit is not None:
            res["encounter"] = self.ref(visit.resource)
        self.add(res)

    def allergy(
        self, day: date, allergen: tuple, reaction: str, *, kind: str = "allergy", criticality: str = "low"
    ) -> dict:
        code, display, system, category, _ = allergen
        rcode, rdisplay = REACTIONS[reaction]
        severity = "severe" if reaction == "anaphylaxis" else self.rng.choice(["mild", "moderate"])
        return self.add({
            "resourceType": "AllergyIntolerance",
            "id": self.uid(),
            "clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active", "Active"),
            "verificationStatus": _cc("http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "confirmed", "Confirmed"),
            "type": kind,
            "category": [category],
            "criticality": "high" if reaction == "anaphylaxis" else criticality,
            "code": _cc(system, code, display),
            "patient": self.ref(self.patient),
            "recordedDate": self.when(day, 600),
            "reaction": [{"manifestation": [_cc(SNOMED, rcode, rdisplay)], "severity": severity}],
        })  # fmt: skip

    def _smoking(self, v: _Visit) -> None:
        code, display = SMOKING_VALUES[self.smoking]
        self.add({
            "resourceType": "Observation",
            "id": self.uid(),
            "status": "final",
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": "social-history", "display": "Social History"}]}],
            "code": _cc(LOINC, *SMOKING),
            "subject": self.ref(self.patient),
            "encounter": self.ref(v.resource),
            "effectiveDateTime": self.when(v.day, v.minute),
            "issued": self.when(v.day, v.minute),
            "valueCodeableConcept": _cc(SNOMED, code, display),
        })  # fmt: skip

    def _emit_prescriptions(self) -> None:
        for p in sorted(self.rx, key=lambda p: p.start):
            drug = DRUGS[p.drug]
            status = p.status
            if p.end is not None and status == "active":
                status = "completed" if p.end <= self.now else "active"
            reason = p.reason
            if reason is None and p.condition and p.condition in self.conditions:
                reason = self.conditions[p.condition]
            repeat: dict[str, Any] = {
                "frequency": drug.frequency,
                "period": drug.period,
                "periodUnit": drug.period_unit,
            }
            if p.end is not None:
                repeat["boundsPeriod"] = {"start": p.start.isoformat(), "end": p.end.isoformat()}
            dosage: dict[str, Any] = {
                "sequence": 1,
                "text": drug.text,
                "timing": {"repeat": repeat},
                "asNeededBoolean": drug.as_needed,
                "route": _cc(SNOMED, "447694001", "Respiratory tract route (qualifier value)") if drug.dose_unit == PUFF
                else _cc(SNOMED, "26643006", "Oral route (qualifier value)"),
                "doseAndRate": [{
                    "type": _cc("http://terminology.hl7.org/CodeSystem/dose-rate-type", "ordered", "Ordered"),
                    "doseQuantity": _qty(drug.dose, *drug.dose_unit),
                }],
            }  # fmt: skip
            res: dict[str, Any] = {
                "resourceType": "MedicationRequest",
                "id": self.uid(),
                "status": status,
                "intent": "order",
                "medicationCodeableConcept": _cc(RXNORM, drug.code, drug.display),
                "subject": self.ref(self.patient),
                "authoredOn": self.when(p.start, p.visit.minute if p.visit else 600),
                "requester": self.ref(self.practitioner),
                "dosageInstruction": [dosage],
            }
            if p.visit is not None:
                res["encounter"] = self.ref(p.visit.resource)
            if reason is not None:
                res["reasonReference"] = [{**self.ref(reason), "display": reason["code"]["text"]}]
            p.resource = self.add(res)
        # chronological order within the bundle, like an EHR export (the Patient and directory first)
        head, rest = self.entries[:3], self.entries[3:]
        rest.sort(key=lambda res: resource_datetime(res) or "")
        self.entries = head + rest
