"""One synthetic patient, assembled: demographics, the chosen conditions and their onsets, the visit
schedule, the history before the record's window, and each visit's encounter with what is measured,
found, done and prescribed at it. `_Patient(rng, now, years).build()` is the transaction Bundle."""

from __future__ import annotations

import random
from datetime import date, timedelta
from typing import Any

from clinqa.records.synth.care import CareDecisions
from clinqa.records.synth.codes import (
    ACUTE,
    ALLERGENS,
    CITIES,
    ENCOUNTER_TYPES,
    FAMILY,
    GIVEN,
    PRACTITIONERS,
    SNOMED,
    STREETS,
    TEST_TAG,
)
from clinqa.records.synth.common import _cc, _Prescription, _Visit, _years_between
from clinqa.records.synth.physiology import Physiology
from clinqa.records.synth.resources import ResourceBuilder


class _Patient(CareDecisions, ResourceBuilder, Physiology):
    def __init__(self, rng: random.Random, now: date, years: tuple[int, int]):
        self.rng = rng
        self.now = now
        self.entries: list[dict] = []
        self.conditions: dict[str, dict] = {}  # key -> Condition resource
        self.onset: dict[str, date] = {}  # chronic condition key -> onset date
        self.rx: list[_Prescription] = []
        self.last_panel: dict[str, date] = {}
        self.last_hypertension_change: date | None = None
        self.last_sbp: float | None = None

        r = rng
        self.gender = r.choice(["female", "male"])
        self.age = int(r.triangular(22, 88, 62))
        self.birth = now - timedelta(days=365 * self.age + r.randint(0, 364) + self.age // 4)
        span_years = r.randint(*years)
        self.start = now - timedelta(days=365 * span_years + r.randint(0, 150))
        self._draw_physiology()

    # -- the record ----------------------------------------------------------------------------
    def build(self) -> dict:
        self._demographics()
        self._choose_conditions()
        visits = self._schedule()
        self._pre_window_history()
        allergens = self._allergies(visits[0].day if visits else self.start)
        for v in visits:
            self._visit(v, allergens)
        self._vaccines_outside_visits()
        self._emit_prescriptions()
        entries = [{"fullUrl": f"urn:uuid:{res['id']}", "resource": res, "request": {"method": "POST", "url": res["resourceType"]}}
                   for res in self.entries]  # fmt: skip
        return {"resourceType": "Bundle", "type": "transaction", "meta": {"tag": [TEST_TAG]}, "entry": entries}

    def _demographics(self) -> None:
        r = self.rng
        given, family = r.choice(GIVEN[self.gender]), r.choice(FAMILY)
        city, state, postal = r.choice(CITIES)
        mrn = f"{r.randint(10_000_000, 99_999_999)}"
        self.patient = self.add({
            "resourceType": "Patient",
            "id": self.uid(),
            "meta": {"tag": [TEST_TAG]},
            "identifier": [{
                "type": _cc("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical record number"),
                "system": "https://clinqa.example.org/synthetic/mrn", "value": mrn,
            }],
            "name": [{"use": "official", "family": family, "given": [given]}],
            "telecom": [{"system": "phone", "value": f"555-{r.randint(100, 999)}-{r.randint(1000, 9999)}", "use": "home"}],
            "gender": self.gender,
            "birthDate": self.birth.isoformat(),
            "address": [{"line": [f"{r.randint(1, 999)} {r.choice(STREETS)}"], "city": city, "state": state,
                         "postalCode": postal, "country": "US"}],
            "maritalStatus": _cc("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", *r.choice(
                [("M", "Married"), ("S", "Never Married"), ("W", "Widowed"), ("D", "Divorced")])),
            "communication": [{"language": _cc("urn:ietf:bcp:47", "en-US", "English (United States)")}],
        })  # fmt: skip
        self.organization = self.add({
            "resourceType": "Organization",
            "id": self.uid(),
            "identifier": [{"system": "https://clinqa.example.org/synthetic/org", "value": f"ORG-{r.randint(100, 999)}"}],
            "active": True,
            "type": [_cc("http://terminology.hl7.org/CodeSystem/organization-type", "prov", "Healthcare Provider")],
            "name": f"{r.choice(['Riverside', 'Hillcrest', 'Lakeview', 'Northgate', 'Parkside'])} Family Medicine",
            "address": [{"city": city, "state": state, "postalCode": postal, "country": "US"}],
        })  # fmt: skip
        pgiven, pfamily, pgender = r.choice(PRACTITIONERS)
        self.practitioner = self.add({
            "resourceType": "Practitioner",
            "id": self.uid(),
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": f"99{r.randint(10_000_000, 99_999_999)}"}],
            "active": True,
            "name": [{"family": pfamily, "given": [pgiven], "prefix": ["Dr."]}],
            "gender": pgender,
        })  # fmt: skip

    def _choose_conditions(self) -> None:
        r, age, female = self.rng, self.age, self.gender == "female"
        p = {
            "hypertension": 0.12 + 0.007 * max(0, age - 30),
            "diabetes": 0.06 + 0.004 * max(0, age - 30) + (0.08 if self.bmi0 > 30 else 0),
            "hyperlipidemia": 0.10 + 0.005 * max(0, age - 30),
            "hypothyroidism": 0.12 if female else 0.04,
            "asthma": 0.08,
            "depression": 0.10,
            "osteoarthritis": 0.05 + 0.006 * max(0, age - 45),
            "anemia": 0.08 if female else 0.03,
            "afib": 0.0 if age < 60 else 0.04 + 0.004 * (age - 60),
        }
        chosen = [k for k, prob in p.items() if r.random() < prob]
        if "ckd3" not in chosen and age >= 50:
            risk = 0.03 + 0.05 * ("diabetes" in chosen) + 0.05 * ("hypertension" in chosen)
            if r.random() < risk:
                chosen.append("ckd3")
        window = (self.now - self.start).days
        for key in chosen:
            in_window = key in ("anemia", "afib") or r.random() < 0.55
            if in_window and window > 420:
                self.onset[key] = self.start + timedelta(days=r.randint(150, window - 200))
            else:
                earliest = max(self.birth + timedelta(days=365 * 18), self.start - timedelta(days=365 * 12))
                span = (self.start - earliest).days - 30
                self.onset[key] = earliest + timedelta(days=r.randint(0, max(span, 0)))
        if "diabetes" not in self.onset and r.random() < 0.15 and age >= 40:
            self.onset["prediabetes"] = self.start  # found at the first HbA1c

    def _schedule(self) -> list[_Visit]:
        r = self.rng
        end = self.now - timedelta(days=3)
        visits: list[_Visit] = []
        day = self.start + timedelta(days=r.randint(0, 40))
        while day <= end:
            visits.append(_Visit(day, "wellness"))
            day = day + timedelta(days=365 + r.randint(-25, 25))
        for key, onset in sorted(self.onset.items(), key=lambda kv: kv[1]):
            if key != "prediabetes" and self.start < onset <= end:
                visits.append(_Visit(onset, "diagnosis", about=[key], diagnoses=[key]))
        # follow-ups: (first-year interval, later interval) in days
        plan = {"diabetes": (90, 180), "hypertension": (90, 180), "ckd3": (180, 180), "hypothyroidism": (60, 180),
                "afib": (90, 180), "depression": (60, 120), "anemia": (90, 0), "hyperlipidemia": (75, 0)}  # fmt: skip
        follow: list[_Visit] = []
        for key, (first, later) in plan.items():
            onset = self.onset.get(key)
            if onset is None:
                continue
            day = max(onset, self.start) + timedelta(days=first if onset >= self.start else r.randint(30, 150))
            n = 0
            while day <= end:
                follow.append(_Visit(day, "followup", about=[key]))
                n += 1
                in_first_year = (day - onset).days < 365
                step = first if in_first_year else later
                if step == 0 or (key == "anemia" and n >= 3) or (key == "hyperlipidemia" and n >= 1):
                    break
                day = day + timedelta(days=step + r.randint(-12, 12))
        for v in sorted(follow, key=lambda v: v.day):
            near = next((w for w in visits if abs((w.day - v.day).days) <= 40 and w.kind != "acute"), None)
            if near is not None:
                for k in v.about:
                    if k not in near.about:
                        near.about.append(k)
            else:
                visits.append(v)
        n_acute = r.choice([0, 1, 1, 2, 2, 3, 4])
        window = (end - self.start).days
        for _ in range(n_acute):
            visits.append(
                _Visit(self.start + timedelta(days=r.randint(10, window)), "acute", about=[r.choice(list(ACUTE))])
            )
        if self.age >= 50 and r.random() < 0.35:
            visits.append(
                _Visit(self.start + timedelta(days=r.randint(20, window)), "procedure", about=["colonoscopy"])
            )
        visits.sort(key=lambda v: (v.day, v.kind))
        for v in visits:
            v.minute = 8 * 60 + 15 * r.randint(0, 32)
        return visits

    def _pre_window_history(self) -> None:
        """Conditions diagnosed before the record's window: on the problem list with their treatment."""
        for key, onset in sorted(self.onset.items(), key=lambda kv: kv[1]):
            if onset > self.start or key == "prediabetes":
                continue
            self.condition(None, key, onset=onset, category="problem-list-item")
            self._treat(key, onset, None)

    def _allergies(self, day: date) -> list[tuple]:
        r = self.rng
        n = r.choices([0, 1, 2], [0.62, 0.3, 0.08])[0]
        chosen = r.sample(ALLERGENS, n)
        for allergen in chosen:
            self.allergy(day, allergen, r.choice(allergen[4]))
        return chosen

    def _visit(self, v: _Visit, allergens: list[tuple]) -> None:
        r = self.rng
        enc_kind = v.kind
        if v.kind == "diagnosis" and "afib" in v.about:
            enc_kind = "emergency"
        code, display = ENCOUNTER_TYPES[enc_kind]
        duration = {"wellness": 30, "procedure": 60, "emergency": 180}.get(enc_kind, 20) + 5 * r.randint(0, 4)
        enc: dict[str, Any] = {
            "resourceType": "Encounter",
            "id": self.uid(),
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                      "code": "EMER" if enc_kind == "emergency" else "AMB",
                      "display": "emergency" if enc_kind == "emergency" else "ambulatory"},
            "type": [_cc(SNOMED, code, display)],
            "subject": self.ref(self.patient),
            "participant": [{
                "type": [_cc("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PPRF", "primary performer")],
                "individual": {**self.ref(self.practitioner), "display": "Dr. " + " ".join(
                    [*self.practitioner["name"][0]["given"], self.practitioner["name"][0]["family"]])},
            }],
            "period": {"start": self.when(v.day, v.minute), "end": self.when(v.day, min(v.minute + duration, 23 * 60 + 59))},
            "serviceProvider": {**self.ref(self.organization), "display": self.organization["name"]},
        }  # fmt: skip
        v.resource = self.add(enc)
        reasons: list[dict] = []

        # diagnoses made at this visit
        new: list[str] = [k for k in v.diagnoses if k not in self.conditions]  # not already found earlier
        for key in new:
            self.condition(v, key)
        acute_condition = None
        if v.kind == "acute":
            key = v.about[0]
            cond = acute_condition = self.condition(v, key)
            lo, hi = ACUTE[key][2]
            end = v.day + timedelta(days=r.randint(lo, hi))
            if end < self.now:
                self.resolve_condition(key, end)
            self.conditions.pop(key)  # several episodes of the same kind are separate conditions
            reasons.append(cond)
        for key in v.about:
            if key in self.conditions and self.conditions[key] not in reasons:
                reasons.append(self.conditions[key])
        if reasons:
            enc["reasonReference"] = [{**self.ref(c), "display": c["code"]["text"]} for c in reasons]

        if v.kind == "procedure":
            self.procedure(v, "colonoscopy", minutes=40)
            return

        self.vitals(v, height=v.kind == "wellness", acute=v.kind == "acute")
        about = set(v.about) | ({k for k, d in self.onset.items() if d <= v.day} if v.kind == "wellness" else set())
        if v.kind == "wellness":
            self._smoking(v)

        # labs
        wanted: list[str] = []
        if v.kind == "wellness":
            if self.age >= 50 or self.rng.random() < 0.6:
                wanted.append("cbc")
            wanted.append("bmp")
            if "hyperlipidemia" in about or "diabetes" in about or (self.age >= 40 and self.rng.random() < 0.6):
                wanted.append("lipid")
        if about & {"ckd3"} or ("hypertension" in about and (v.day - self.last_panel.get("bmp", date.min)).days > 300):
            wanted.append("bmp")
        if about & {"anemia"}:
            wanted.append("cbc")
        if "hyperlipidemia" in about and v.kind in ("diagnosis", "followup"):
            wanted.append("lipid")
        for name in dict.fromkeys(wanted):
            if self.last_panel.get(name) != v.day:
                self.panel(v, name)
        diabetic = "diabetes" in about or self._since("diabetes", v.day) is not None and v.kind == "wellness"
        if diabetic or (v.kind == "wellness" and (self.age >= 45 or self.bmi0 >= 25)):
            a1c = self.observation(v, "hba1c", self.a1c(v.day), minute_offset=90)
            value = a1c["valueQuantity"]["value"]
            future_diabetic = (self._since("diabetes", v.day) or 0) < 0
            if (
                ("prediabetes" in self.onset or future_diabetic)
                and "prediabetes" not in self.conditions
                and "diabetes" not in self.conditions
                and 5.7 <= value < 6.5
            ):
                self.condition(v, "prediabetes", category="problem-list-item")
        if about & {"hypothyroidism"}:
            self.observation(v, "tsh", self.tsh(v.day), minute_offset=90)
        if "afib" in about and self._treated_days(("warfarin",), v.day) is not None:
            self.observation(v, "inr", self.rng.gauss(2.5, 0.35), minute_offset=60)
        if about & {"depression"} or v.kind == "wellness":
            if v.kind == "wellness":
                self.procedure(v, "depression_screening")
            if (
                "depression" in about
                or self._since("depression", v.day) is not None
                and self._since("depression", v.day) > -120
            ):
                self.observation(v, "phq9", min(27, max(0, self.phq9(v.day))))

        found = self._diagnose_from_measurements(v)
        new += found
        if found:
            about |= set(found)
            for key in found:
                cond = self.conditions[key]
                enc.setdefault("reasonReference", []).append({**self.ref(cond), "display": cond["code"]["text"]})

        # procedures
        if "afib" in new or ("afib" in about and v.kind == "wellness"):
            self.procedure(v, "ecg", reason="afib")
        if "asthma" in new:
            self.procedure(v, "spirometry", reason="asthma", minutes=30)
        if v.kind == "acute" and v.about[0] == "strep":
            self.procedure(v, "throat_culture", minutes=10)
        if (
            v.kind == "wellness"
            and self.gender == "female"
            and 50 <= _years_between(self.birth, v.day) <= 74
            and r.random() < 0.5
        ):
            self.procedure(v, "mammography", minutes=20)

        # treatment decisions
        for key in new:
            self._treat(key, v.day, v)
        if "prediabetes" in self.conditions and "diabetes" in new:
            self.resolve_condition("prediabetes", v.day)
        self._adjust(v)
        if acute_condition is not None:
            self._treat_acute(v, acute_condition, allergens)

        if v.kind in ("followup", "wellness") and self.active_drugs(v.day):
            self.procedure(v, "medrec", minutes=10)
        if v.kind == "wellness":
            self._wellness_vaccines(v)
