"""A synthetic patient's physiology: the baseline and disease parameters drawn once per patient, and
the value each measurement has on a given day given the conditions' onsets and the treatments
started (HbA1c, blood pressure, heart rate, creatinine and eGFR, LDL, hemoglobin, TSH, PHQ-9, weight)."""

from __future__ import annotations

import math
import random
from datetime import date

from clinqa.records.synth.common import _Prescription, _years_between


class Physiology:
    """Mixin of `_Patient`: measurement values on a day. Needs rng, gender, birth, start, onset and rx."""

    rng: random.Random
    gender: str
    birth: date
    start: date
    onset: dict[str, date]
    rx: list[_Prescription]

    def _draw_physiology(self) -> None:
        """The patient's baseline physiology and disease parameters (drawn in this order: the seed fixes them)."""
        r = self.rng
        # baseline physiology
        female = self.gender == "female"
        self.height = r.gauss(163 if female else 177, 6.5)
        self.bmi0 = min(max(r.gauss(28, 5), 19), 42)
        self.weight_drift = r.uniform(-1.2, 1.5)  # kg/year
        self.sbp0, self.dbp0 = r.uniform(108, 128), r.uniform(66, 82)
        self.sbp_htn, self.dbp_htn = r.uniform(146, 168), r.uniform(90, 102)
        self.hr0 = r.uniform(60, 80)
        self.a1c0 = r.uniform(4.9, 5.6)
        self.ldl0, self.hdl0, self.tg0 = (
            r.uniform(85, 128),
            r.uniform(42, 68) - (0 if female else 6),
            r.uniform(80, 170),
        )
        self.cr0 = r.uniform(0.6, 0.9) if female else r.uniform(0.8, 1.1)
        self.hgb0 = r.uniform(12.4, 14.6) if female else r.uniform(13.8, 16.2)
        self.wbc0, self.plt0 = r.uniform(4.8, 8.8), r.uniform(180, 340)
        self.tsh0, self.k0, self.na0 = r.uniform(0.9, 3.0), r.uniform(3.8, 4.5), r.uniform(137.5, 142)
        self.smoking = r.choices(["never", "former", "current"], [0.6, 0.27, 0.13])[0]

        # disease parameters (used only if the condition is present)
        self.a1c_dx, self.a1c_target = r.uniform(7.6, 9.4), r.uniform(6.3, 7.0)
        self.a1c_late_drift = r.uniform(0.3, 0.7) if r.random() < 0.35 else 0.0  # %/year, from 18 months on
        self.bp_drop = [(r.uniform(9, 13), r.uniform(5, 7)) for _ in range(3)]
        self.ldl_htn, self.statin_cut = r.uniform(160, 195), r.uniform(0.35, 0.48)
        self.cr_ckd, self.cr_slope = r.uniform(1.35, 1.75) + (0 if female else 0.2), r.uniform(0.04, 0.12)
        self.hgb_anemia = r.uniform(9.0, 10.6)
        self.tsh_dx, self.tsh_target = r.uniform(7.5, 14.0), r.uniform(1.2, 2.8)
        self.phq_dx, self.phq_target = r.uniform(12, 19), r.uniform(3, 8)
        self.lisinopril_cough = r.random() < 0.15
        self.statin = r.choice(["atorvastatin", "atorvastatin", "rosuvastatin"])

    # -- physiology at a date ------------------------------------------------------------------
    def _since(self, key: str, day: date) -> float | None:
        """Days since the condition's onset (negative before it), None if the patient never has it."""
        onset = self.onset.get(key)
        return None if onset is None else (day - onset).days

    def _treated_days(self, drug_keys: tuple[str, ...], day: date) -> float | None:
        starts = [p.start for p in self.rx if p.drug in drug_keys and p.start <= day and (p.end is None or p.end > day)]
        return (day - min(starts)).days if starts else None

    def active_drugs(self, day: date) -> list[str]:
        return [p.drug for p in self.rx if p.start <= day and (p.end is None or p.end > day)]

    def years_in(self, day: date) -> float:
        return (day - self.start).days / 365.25

    def weight(self, day: date) -> float:
        base = self.bmi0 * (self.height / 100) ** 2
        return base + self.weight_drift * self.years_in(day) + self.rng.gauss(0, 0.7)

    def a1c(self, day: date) -> float:
        since = self._since("diabetes", day)
        noise = self.rng.gauss(0, 0.12)
        if since is None:
            if "prediabetes" in self.onset:
                return min(self.a1c0 + 0.8 + noise, 6.4)
            return self.a1c0 + noise
        if since < 0:  # the drift up to the diagnosis, over the preceding two years
            frac = max(0.0, 1 + since / 730)
            return 5.9 + (self.a1c_dx - 5.9) * frac**1.5 + noise
        treated = self._treated_days(("metformin",), day)
        value = (
            self.a1c_dx
            if treated is None
            else self.a1c_target + (self.a1c_dx - self.a1c_target) * math.exp(-treated / 110)
        )
        value += self.a1c_late_drift * max(0.0, since - 540) / 365
        return value + noise

    def blood_pressure(self, day: date) -> tuple[float, float]:
        since = self._since("hypertension", day)
        if since is None:
            sbp, dbp = self.sbp0, self.dbp0
        elif since < 0:
            frac = max(0.0, 1 + since / 240)
            sbp = self.sbp0 + (self.sbp_htn - self.sbp0) * frac
            dbp = self.dbp0 + (self.dbp_htn - self.dbp0) * frac
        else:
            sbp, dbp = self.sbp_htn, self.dbp_htn
            n = sum(1 for d in self.active_drugs(day) if d in ("lisinopril", "amlodipine", "hctz", "losartan"))
            for s, d in self.bp_drop[:n]:
                sbp, dbp = sbp - s, dbp - d
        return sbp + self.rng.gauss(0, 5), dbp + self.rng.gauss(0, 3.5)

    def heart_rate(self, day: date) -> float:
        since = self._since("afib", day)
        if since is not None and since >= 0:
            controlled = self._treated_days(("digoxin",), day)
            return self.rng.uniform(70, 84) if controlled and controlled > 14 else self.rng.uniform(96, 118)
        return self.hr0 + self.rng.gauss(0, 4)

    def creatinine(self, day: date) -> float:
        since = self._since("ckd3", day)
        noise = self.rng.gauss(0, 0.04)
        if since is None:
            return self.cr0 + noise
        if since < 0:
            frac = max(0.0, 1 + since / 900)
            return self.cr0 + (self.cr_ckd - self.cr0) * frac + noise
        return self.cr_ckd + self.cr_slope * since / 365 + noise

    def egfr(self, creatinine: float, day: date) -> float:
        """MDRD: 175 x Scr^-1.154 x age^-0.203 (x 0.742 if female)."""
        age = max(18, _years_between(self.birth, day))
        value = 175 * creatinine**-1.154 * age**-0.203 * (0.742 if self.gender == "female" else 1)
        return min(value, 120)

    def ldl(self, day: date) -> float:
        since = self._since("hyperlipidemia", day)
        noise = self.rng.gauss(0, 6)
        if since is None:
            return self.ldl0 + noise
        if since < 0:
            return self.ldl0 + (self.ldl_htn - self.ldl0) * max(0.0, 1 + since / 720) + noise
        treated = self._treated_days(("atorvastatin", "rosuvastatin"), day)
        cut = 0 if treated is None else self.statin_cut * (1 - math.exp(-treated / 40))
        return self.ldl_htn * (1 - cut) + noise

    def hemoglobin(self, day: date) -> float:
        since = self._since("anemia", day)
        noise = self.rng.gauss(0, 0.25)
        if since is None:
            return self.hgb0 + noise
        if since < 0:
            return self.hgb0 + (self.hgb_anemia - self.hgb0) * max(0.0, 1 + since / 240) + noise
        treated = self._treated_days(("ferrous_sulfate",), day)
        if treated is None:
            # after the course ends the gain persists
            course = next((p for p in self.rx if p.drug == "ferrous_sulfate"), None)
            treated = (day - course.start).days if course and course.start <= day else None
        if treated is None:
            return self.hgb_anemia + noise
        return self.hgb0 + (self.hgb_anemia - self.hgb0) * math.exp(-treated / 55) + noise

    def tsh(self, day: date) -> float:
        since = self._since("hypothyroidism", day)
        noise = self.rng.gauss(0, 0.15)
        if since is None:
            return self.tsh0 * math.exp(noise)
        if since < 0:
            return self.tsh0 + (self.tsh_dx - self.tsh0) * max(0.0, 1 + since / 365) + noise
        treated = self._treated_days(("levothyroxine",), day)
        if treated is None:
            return self.tsh_dx * math.exp(noise)
        return (self.tsh_target + (self.tsh_dx - self.tsh_target) * math.exp(-treated / 35)) * math.exp(noise)

    def phq9(self, day: date) -> float:
        since = self._since("depression", day)
        if since is None or since < -120:
            return self.rng.uniform(0, 4)
        if since < 0:
            return self.phq_dx * (1 + since / 240) + self.rng.gauss(0, 1)
        treated = self._treated_days(("sertraline",), day)
        base = (
            self.phq_dx
            if treated is None
            else self.phq_target + (self.phq_dx - self.phq_target) * math.exp(-treated / 70)
        )
        return base + self.rng.gauss(0, 1.2)
