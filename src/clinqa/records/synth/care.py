"""The clinical decisions of a synthetic patient's care: what is started for each chronic condition,
what a visit's measurements lead to (a diagnosis made early, a treatment step, a switch), acute
courses chosen around allergies, and vaccines by age."""

from __future__ import annotations

import random
from datetime import date, timedelta

from clinqa.records.synth.codes import BP_PANEL, LISINOPRIL_INGREDIENT, RXNORM, SYSTOLIC, TESTS, VACCINES
from clinqa.records.synth.common import _Prescription, _Visit, _years_between


class CareDecisions:
    """Mixin of `_Patient`: treatment and diagnosis decisions. Needs the patient's state (rng, age, gender,
    onset, conditions, rx, entries, ...) and the ResourceBuilder and Physiology methods."""

    rng: random.Random
    now: date
    start: date
    birth: date
    age: int
    gender: str
    statin: str
    onset: dict[str, date]
    conditions: dict[str, dict]
    rx: list[_Prescription]
    entries: list[dict]
    last_sbp: float | None
    last_hypertension_change: date | None
    lisinopril_cough: bool

    def _treat(self, key: str, day: date, visit: _Visit | None) -> None:
        start_hypertension = "amlodipine" if self.age > 55 else "lisinopril"
        plan = {
            "diabetes": ["metformin"],
            "hypertension": [start_hypertension],
            "hyperlipidemia": [self.statin],
            "hypothyroidism": ["levothyroxine"],
            "afib": ["warfarin", "digoxin"],
            "depression": ["sertraline"],
            "asthma": ["albuterol", "fluticasone"],
            "osteoarthritis": ["acetaminophen"],
        }.get(key, [])
        for drug in plan:
            self.prescribe(drug, day, key, visit)
        if key == "hypertension":
            self.last_hypertension_change = day
        if key == "anemia":
            self.prescribe("ferrous_sulfate", day, key, visit, days=self.rng.choice([120, 150, 180]))

    def _diagnose_from_measurements(self, v: _Visit) -> list[str]:
        """A planned condition whose physiology is already showing is diagnosed now, not at its planned date:
        the clinician sees the HbA1c of 6.8 and does not wait. The condition's trajectory is re-anchored here."""
        found = []
        female = self.gender == "female"
        checks = {
            "diabetes": (TESTS["hba1c"].code, lambda x: x >= 6.5),
            "hyperlipidemia": (TESTS["ldl"].code, lambda x: x >= 160),
            "ckd3": (TESTS["egfr"].code, lambda x: x < 60),
            "anemia": (TESTS["hemoglobin"].code, lambda x: x < (11.0 if female else 12.0)),
            "hypertension": (SYSTOLIC[0], lambda x: x >= 140 and (self.last_sbp or 0) >= 140),
        }
        for key, (code, abnormal) in checks.items():
            planned = self.onset.get(key)
            value = self._last_value(code, v)
            if planned is None or key in self.conditions or value is None or not v.day < planned or not abnormal(value):
                continue
            self.onset[key] = v.day
            if key == "diabetes":
                self.a1c_dx, self.a1c_target = value, min(self.a1c_target, value - 0.3)
            elif key == "hyperlipidemia":
                self.ldl_htn = value
            elif key == "ckd3":
                self.cr_ckd = self._last_value(TESTS["creatinine"].code, v) or self.cr_ckd
            elif key == "anemia":
                self.hgb_anemia = value
            self.condition(v, key)
            found.append(key)
        sbp = self._last_value(SYSTOLIC[0], v)
        if sbp is not None:
            self.last_sbp = sbp
        return found

    def _last_value(self, code: str, v: _Visit) -> float | None:
        for res in reversed(self.entries):
            if (
                res["resourceType"] != "Observation"
                or res.get("encounter", {}).get("reference") != f"urn:uuid:{v.resource['id']}"
            ):
                continue
            if res["code"]["coding"][0]["code"] == BP_PANEL[0] and code == SYSTOLIC[0]:
                return res["component"][0]["valueQuantity"]["value"]
            if res["code"]["coding"][0]["code"] == code:
                return res["valueQuantity"]["value"]
        return None

    def _adjust(self, v: _Visit) -> None:
        """Treatment changes a clinician would make on what this visit measured."""
        since = self._since("hypertension", v.day)
        active = self.active_drugs(v.day)
        if since is not None and since > 0 and v.kind in ("followup", "wellness"):
            # lisinopril cough: switch to losartan at the first follow-up on lisinopril
            if "lisinopril" in active and self.lisinopril_cough:
                self.stop("lisinopril", v.day)
                self.prescribe("losartan", v.day, "hypertension", v)
                self.allergy(v.day, (*LISINOPRIL_INGREDIENT, RXNORM, "medication", ()), "cough", kind="intolerance")
                self.lisinopril_cough = False
                self.last_hypertension_change = v.day
            sbp = self._last_value(SYSTOLIC[0], v)
            last = self.last_hypertension_change or v.day
            n = sum(1 for d in self.active_drugs(v.day) if d in ("lisinopril", "amlodipine", "hctz", "losartan"))
            if sbp is not None and sbp >= 140 and (v.day - last).days >= 80 and n < 3:
                ladder = (
                    ["lisinopril", "amlodipine", "hctz"] if self.age <= 55 else ["amlodipine", "lisinopril", "hctz"]
                )
                current = set(self.active_drugs(v.day)) | ({"lisinopril"} if "losartan" in active else set())
                nxt = next((d for d in ladder if d not in current), None)
                if nxt:
                    self.prescribe(nxt, v.day, "hypertension", v)
                    self.last_hypertension_change = v.day
        if "anemia" in self.conditions and "abatementDateTime" not in self.conditions["anemia"]:
            hgb = self._last_value(TESTS["hemoglobin"].code, v)
            normal = 12.0 if self.gender == "female" else 13.5
            if hgb is not None and hgb >= normal and (v.day - self.onset["anemia"]).days > 60:
                self.resolve_condition("anemia", v.day)

    def _treat_acute(self, v: _Visit, cond: dict, allergens: list[tuple]) -> None:
        r = self.rng
        key = v.about[0]
        penicillin_allergy = any(a[0] == "764146007" for a in allergens)
        drug, days = None, None
        if key == "strep":
            drug, days = ("azithromycin", 5) if penicillin_allergy else ("penicillin_v", 10)
        elif key == "uti":
            drug, days = "cephalexin", 7
        elif key == "sinusitis" and r.random() < 0.35:
            drug, days = ("azithromycin", 5) if penicillin_allergy else ("amox_clav", 10)
        elif key == "sprain":
            drug, days = r.choice(["ibuprofen", "naproxen"]), 14
        elif key in ("bronchitis", "pharyngitis") and r.random() < 0.5:
            drug, days = "acetaminophen", 10
        if drug:
            p = self.prescribe(drug, v.day, None, v, days=days)
            p.reason = cond

    def _wellness_vaccines(self, v: _Visit) -> None:
        r = self.rng
        age = _years_between(self.birth, v.day)
        self.immunize(v.day, "flu", v)
        given = {
            res["vaccineCode"]["coding"][0]["code"] for res in self.entries if res["resourceType"] == "Immunization"
        }
        if VACCINES["td"][0] not in given and r.random() < 0.2:
            self.immunize(v.day, "td", v)
        if age >= 65 and VACCINES["pcv13"][0] not in given:
            self.immunize(v.day, "pcv13", v)
        elif age >= 66 and VACCINES["ppsv23"][0] not in given:
            self.immunize(v.day, "ppsv23", v)
        if age >= 50 and VACCINES["zoster"][0] not in given and r.random() < 0.4:
            self.immunize(v.day, "zoster", v)
            second = v.day + timedelta(days=r.randint(60, 180))
            if second < self.now:
                self.immunize(second, "zoster", None)

    def _vaccines_outside_visits(self) -> None:
        r = self.rng
        first = date(2021, 3, 1) + timedelta(days=r.randint(0, 90))
        if self.start <= first and first + timedelta(days=28) < self.now and r.random() < 0.8:
            self.immunize(first, "covid", None)
            self.immunize(first + timedelta(days=21 + r.randint(0, 7)), "covid", None)
