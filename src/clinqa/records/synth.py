"""Synthetic, realistic FHIR R4 patient records: transaction Bundles like Synthea's, made offline and
deterministically (the same seed gives byte-identical JSON).

Each patient gets demographics, a care timeline of several years before `now` and a physiology
that the timeline measures. Conditions drive everything else, as in a real chart:

- type 2 diabetes: HbA1c drifts up over the visits before the diagnosis, metformin is started at the
  diagnosis and HbA1c comes down over the following months (some patients drift up again later);
- hypertension: blood pressure is high until treatment; lisinopril (amlodipine first over 55) is
  started, and amlodipine, then hydrochlorothiazide are added at follow-ups where it is still
  >= 140 systolic; a few patients get the ACE-inhibitor cough, stop lisinopril and switch to losartan
  (recorded as an AllergyIntolerance of type intolerance);
- hyperlipidemia -> a statin and a falling LDL; hypothyroidism -> levothyroxine and a normalising
  TSH; atrial fibrillation -> warfarin (INR series) and digoxin; iron deficiency anemia -> ferrous
  sulfate, a recovering hemoglobin and an abated condition; depression -> sertraline and a falling
  PHQ-9; CKD stage 3 -> a rising creatinine and falling eGFR; asthma -> inhalers; knee
  osteoarthritis -> acetaminophen; obesity and prediabetes are diagnosed from the measurements;
- acute episodes (sinusitis, bronchitis, strep throat, UTI, ankle sprain, pharyngitis) with
  abatement dates and short antibiotic or analgesic courses, chosen around the patient's allergies.

Codes are real: SNOMED CT for conditions and procedures, RxNorm for medications, LOINC and UCUM for
observations, CVX for vaccines. Every resource validates against the same FHIR R4(B) models the
loader uses (see clinqa.records.fhir). The data are made up; resources are tagged HTEST.
"""

from __future__ import annotations

import json
import math
import random
import re
import uuid
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from clinqa.records.render import resource_datetime

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
TEST_TAG = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "code": "HTEST",
    "display": "test health data",
}

# ---------------------------------------------------------------------------------------- code tables


@dataclass(frozen=True)
class Test:
    code: str
    display: str
    unit: str
    decimals: int
    low: float | None = None  # reference range
    high: float | None = None
    category: str = "laboratory"


TESTS: dict[str, Test] = {
    "hba1c": Test("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 1, 4.0, 5.6),
    "glucose": Test("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 0, 70, 99),
    "creatinine": Test("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 2, 0.6, 1.2),
    "egfr": Test(
        "33914-3",
        "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum or Plasma by Creatinine-based formula (MDRD)",
        "mL/min/{1.73_m2}",
        0,
        60,
        None,
    ),
    "potassium": Test("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 1, 3.5, 5.1),
    "sodium": Test("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 0, 136, 145),
    "cholesterol": Test("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 0, None, 200),
    "ldl": Test(
        "18262-6", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay", "mg/dL", 0, None, 130
    ),
    "hdl": Test("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", 0, 40, None),
    "triglycerides": Test("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", 0, None, 150),
    "hemoglobin": Test("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 1, 12.0, 17.5),
    "wbc": Test("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 1, 4.5, 11.0),
    "platelets": Test("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 0, 150, 400),
    "tsh": Test("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", "m[IU]/L", 2, 0.4, 4.0),
    "inr": Test("6301-6", "INR in Platelet poor plasma by Coagulation assay", "{INR}", 1, 0.8, 1.2),
    "phq9": Test(
        "44261-6",
        "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]",
        "{score}",
        0,
        None,
        None,
        "survey",
    ),
    "heart_rate": Test("8867-4", "Heart rate", "/min", 0, None, None, "vital-signs"),
    "weight": Test("29463-7", "Body weight", "kg", 1, None, None, "vital-signs"),
    "height": Test("8302-2", "Body height", "cm", 1, None, None, "vital-signs"),
    "bmi": Test("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 1, None, None, "vital-signs"),
    "temperature": Test("8310-5", "Body temperature", "Cel", 1, None, None, "vital-signs"),
    "resp_rate": Test("9279-1", "Respiratory rate", "/min", 0, None, None, "vital-signs"),
    "spo2": Test("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", 0, None, None, "vital-signs"),
}
BP_PANEL = ("85354-9", "Blood pressure panel with all children optional")
SYSTOLIC = ("8480-6", "Systolic blood pressure")
DIASTOLIC = ("8462-4", "Diastolic blood pressure")
SMOKING = ("72166-2", "Tobacco smoking status")
SMOKING_VALUES = {
    "never": ("266919005", "Never smoked tobacco (finding)"),
    "former": ("8517006", "Ex-smoker (finding)"),
    "current": ("449868002", "Smokes tobacco daily (finding)"),
}
PANELS = {  # DiagnosticReport code -> its tests
    "cbc": (("58410-2", "CBC panel - Blood by Automated count"), ("hemoglobin", "wbc", "platelets")),
    "bmp": (("51990-0", "Basic metabolic panel - Blood"), ("glucose", "creatinine", "egfr", "potassium", "sodium")),
    "lipid": (
        ("57698-3", "Lipid panel with direct LDL - Serum or Plasma"),
        ("cholesterol", "ldl", "hdl", "triglycerides"),
    ),
}

CONDITIONS = {
    "diabetes": ("44054006", "Diabetes mellitus type 2 (disorder)"),
    "prediabetes": ("15777000", "Prediabetes (finding)"),
    "hypertension": ("59621000", "Essential hypertension (disorder)"),
    "hyperlipidemia": ("55822004", "Hyperlipidemia (disorder)"),
    "ckd3": ("433144002", "Chronic kidney disease stage 3 (disorder)"),
    "hypothyroidism": ("40930008", "Hypothyroidism (disorder)"),
    "asthma": ("195967001", "Asthma (disorder)"),
    "afib": ("49436004", "Atrial fibrillation (disorder)"),
    "depression": ("35489007", "Depressive disorder (disorder)"),
    "osteoarthritis": ("239873007", "Osteoarthritis of knee (disorder)"),
    "anemia": ("87522002", "Iron deficiency anemia (disorder)"),
    "obesity": ("162864005", "Body mass index 30+ - obesity (finding)"),
}
ACUTE = {  # key -> (code, display, days to abatement (min, max))
    "sinusitis": ("444814009", "Viral sinusitis (disorder)", (10, 21)),
    "bronchitis": ("10509002", "Acute bronchitis (disorder)", (14, 28)),
    "strep": ("43878008", "Streptococcal sore throat (disorder)", (7, 14)),
    "uti": ("68566005", "Urinary tract infectious disease (disorder)", (5, 10)),
    "sprain": ("44465007", "Sprain of ankle (disorder)", (14, 42)),
    "pharyngitis": ("195662009", "Acute viral pharyngitis (disorder)", (7, 14)),
}


@dataclass(frozen=True)
class Drug:
    code: str
    display: str
    text: str  # sig
    dose: float
    dose_unit: tuple[str, str]  # (unit, UCUM code)
    frequency: int = 1
    period: float = 1
    period_unit: str = "d"
    as_needed: bool = False


TABLET = ("tablet", "{tbl}")
CAPSULE = ("capsule", "{cap}")
PUFF = ("puff", "{puff}")
DRUGS = {
    "metformin": Drug("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
                      "Take 2 tablets by mouth once daily with the evening meal", 2, TABLET),
    "lisinopril": Drug("314076", "lisinopril 10 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, TABLET),
    "amlodipine": Drug("197361", "amlodipine 5 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, TABLET),
    "hctz": Drug("310798", "hydrochlorothiazide 25 MG Oral Tablet", "Take 1 tablet by mouth once daily in the morning", 1, TABLET),
    "losartan": Drug("979492", "losartan potassium 50 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, TABLET),
    "atorvastatin": Drug("617310", "atorvastatin 20 MG Oral Tablet", "Take 1 tablet by mouth once daily at bedtime", 1, TABLET),
    "rosuvastatin": Drug("859747", "rosuvastatin calcium 10 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, TABLET),
    "levothyroxine": Drug("966222", "levothyroxine sodium 0.05 MG Oral Tablet",
                          "Take 1 tablet by mouth once daily before breakfast", 1, TABLET),
    "warfarin": Drug("855332", "warfarin sodium 5 MG Oral Tablet",
                     "Take 1 tablet by mouth once daily in the evening; dose adjusted to INR", 1, TABLET),
    "digoxin": Drug("197604", "digoxin 0.125 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, TABLET),
    "sertraline": Drug("312941", "sertraline 50 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, TABLET),
    "ferrous_sulfate": Drug("310325", "ferrous sulfate 325 MG Oral Tablet", "Take 1 tablet by mouth twice daily", 1, TABLET, 2),
    "albuterol": Drug("745679", "200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
                      "Inhale 2 puffs every 4 to 6 hours as needed for wheezing", 2, PUFF, 1, 4, "h", True),
    "fluticasone": Drug("895994", "120 ACTUAT fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
                        "Inhale 2 puffs twice daily", 2, PUFF, 2),
    "acetaminophen": Drug("313782", "acetaminophen 325 MG Oral Tablet",
                          "Take 2 tablets by mouth every 6 hours as needed for pain", 2, TABLET, 1, 6, "h", True),
    "ibuprofen": Drug("310965", "ibuprofen 200 MG Oral Tablet",
                      "Take 2 tablets by mouth every 8 hours as needed for pain", 2, TABLET, 1, 8, "h", True),
    "naproxen": Drug("849574", "naproxen sodium 220 MG Oral Tablet",
                     "Take 1 tablet by mouth every 12 hours as needed for pain", 1, TABLET, 1, 12, "h", True),
    "penicillin_v": Drug("834060", "penicillin V potassium 250 MG Oral Tablet",
                         "Take 1 tablet by mouth four times daily for 10 days", 1, TABLET, 4),
    "amox_clav": Drug("562251", "amoxicillin 250 MG / clavulanate 125 MG Oral Tablet",
                      "Take 1 tablet by mouth three times daily for 10 days", 1, TABLET, 3),
    "cephalexin": Drug("309114", "cephalexin 500 MG Oral Capsule", "Take 1 capsule by mouth twice daily for 7 days", 1, CAPSULE, 2),
    "azithromycin": Drug("308460", "azithromycin 250 MG Oral Tablet",
                         "Take 2 tablets on day 1, then 1 tablet daily on days 2 to 5", 1, TABLET),
}  # fmt: skip

ENCOUNTER_TYPES = {
    "wellness": ("162673000", "General examination of patient (procedure)"),
    "followup": ("390906007", "Follow-up encounter (procedure)"),
    "diagnosis": ("185347001", "Encounter for problem (procedure)"),
    "acute": ("185345009", "Encounter for symptom (procedure)"),
    "emergency": ("50849002", "Emergency room admission (procedure)"),
    "procedure": ("185347001", "Encounter for problem (procedure)"),
}
PROCEDURES = {
    "medrec": ("430193006", "Medication Reconciliation (procedure)"),
    "depression_screening": ("171207006", "Depression screening (procedure)"),
    "ecg": ("29303009", "Electrocardiographic procedure (procedure)"),
    "spirometry": ("23426006", "Measurement of respiratory function (procedure)"),
    "throat_culture": ("117015009", "Throat culture (procedure)"),
    "colonoscopy": ("73761001", "Colonoscopy (procedure)"),
    "mammography": ("24623002", "Screening mammography (procedure)"),
}
VACCINES = {
    "flu": ("140", "Influenza, seasonal, injectable, preservative free"),
    "td": ("113", "Td (adult) preservative free"),
    "pcv13": ("133", "Pneumococcal conjugate PCV 13"),
    "ppsv23": ("33", "pneumococcal polysaccharide vaccine, 23 valent"),
    "zoster": ("187", "zoster vaccine recombinant"),
    "covid": ("208", "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose"),
}
REACTIONS = {
    "rash": ("271807003", "Eruption of skin (disorder)"),
    "hives": ("126485001", "Urticaria (disorder)"),
    "anaphylaxis": ("39579001", "Anaphylaxis (disorder)"),
    "wheezing": ("56018004", "Wheezing (finding)"),
    "cough": ("49727002", "Cough (finding)"),
}
ALLERGENS = [  # (code, display, system, category, possible reactions)
    ("764146007", "Penicillin (substance)", SNOMED, "medication", ("rash", "hives", "anaphylaxis")),
    ("387406002", "Sulfonamide (substance)", SNOMED, "medication", ("rash", "hives")),
    ("762952008", "Peanut (substance)", SNOMED, "food", ("hives", "anaphylaxis")),
    ("111088007", "Latex (substance)", SNOMED, "environment", ("rash", "hives")),
    ("256277009", "Grass pollen (substance)", SNOMED, "environment", ("wheezing",)),
    ("260147004", "House dust mite (organism)", SNOMED, "environment", ("wheezing",)),
]
LISINOPRIL_INGREDIENT = ("29046", "lisinopril")

GIVEN = {
    "female": ["Maria", "Susan", "Linda", "Emily", "Grace", "Hannah", "Olivia", "Sofia", "Ana", "Ruth", "Carmen",
               "Jennifer", "Patricia", "Helen", "Nora", "Amara", "Mei", "Priya", "Fatima", "Ingrid", "Lucia", "Joan"],
    "male": ["James", "Robert", "Michael", "David", "Daniel", "Thomas", "Luis", "Omar", "Wei", "Arjun", "Samuel",
             "George", "Henry", "Peter", "Kofi", "Mateo", "Ivan", "Jonas", "Paul", "Walter", "Hugo", "Frank"],
}  # fmt: skip
FAMILY = ["Smith", "Garcia", "Nguyen", "Okafor", "Johansson", "Rossi", "Kowalski", "Haddad", "Chen", "Patel",
          "Murphy", "Schmidt", "Silva", "Kim", "Dubois", "Mensah", "Novak", "Larsen", "Moreau", "Brennan",
          "Alvarez", "Tanaka", "Ibrahim", "Fischer", "Costa", "Walsh", "Reyes", "Berg", "Lopez", "Harris"]  # fmt: skip
CITIES = [("Springfield", "MA", "01101"), ("Worcester", "MA", "01602"), ("Lowell", "MA", "01850"),
          ("Salem", "MA", "01970"), ("Quincy", "MA", "02169"), ("Pittsfield", "MA", "01201")]  # fmt: skip
STREETS = ["Maple St", "Oak Ave", "Elm St", "Pine Rd", "Cedar Ln", "Birch Way", "Willow Dr", "Chestnut St"]
PRACTITIONERS = [("Jordan", "Reyes", "female"), ("Sam", "Whitfield", "male"), ("Aisha", "Karimi", "female"),
                 ("Daniel", "Okoro", "male"), ("Lena", "Hoffmann", "female"), ("Victor", "Lindqvist", "male")]  # fmt: skip


# ---------------------------------------------------------------------------------------- small helpers


def _cc(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _qty(value: float | int, unit: str, code: str | None = None) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": code or unit}


def _round(value: float, decimals: int) -> float | int:
    return int(round(value)) if decimals == 0 else round(value, decimals)


def _years_between(d0: date, d1: date) -> int:
    return d1.year - d0.year - ((d1.month, d1.day) < (d0.month, d0.day))


@dataclass
class _Visit:
    day: date
    kind: str  # wellness | followup | diagnosis | acute | procedure
    minute: int = 0  # minutes after midnight
    about: list[str] = field(default_factory=list)  # condition keys this visit deals with
    diagnoses: list[str] = field(default_factory=list)  # chronic condition keys diagnosed at this visit
    resource: dict | None = None  # the Encounter


@dataclass
class _Prescription:
    drug: str
    start: date
    condition: str | None
    end: date | None = None
    status: str = "active"
    visit: _Visit | None = None
    reason: dict | None = None  # the Condition it treats
    resource: dict | None = None


# ---------------------------------------------------------------------------------------- one patient


class _Patient:
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


# ---------------------------------------------------------------------------------------- API


def synthesize_patients(
    n: int, seed: int = 0, now: date = date(2025, 1, 1), *, years: tuple[int, int] = (3, 6)
) -> list[dict]:
    """`n` synthetic patients as FHIR R4 transaction Bundles (JSON dicts), each covering `years` (min, max)
    years of care before `now`. Deterministic: the same (n, seed, now, years) gives byte-identical JSON."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= years[0] <= years[1]:
        raise ValueError(f"years must be (min, max) with 1 <= min <= max, got {years}")
    bundles = []
    for i in range(n):
        rng = random.Random(f"clinqa-synth:{seed}:{i}")
        bundles.append(_Patient(rng, now, years).build())
    return bundles


def bundle_patient(bundle: dict) -> dict:
    """The Patient resource of a bundle made by `synthesize_patients`."""
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")


def write_patients(directory: str | Path, bundles: list[dict]) -> list[Path]:
    """One ``Given_Family_<id>.json`` file per bundle in `directory` (created if needed); returns the paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for bundle in bundles:
        patient = bundle_patient(bundle)
        name = patient.get("name", [{}])[0]
        stem = "_".join([*name.get("given", [])[:1], name.get("family", "patient"), patient["id"]])
        path = out / f"{re.sub(r'[^A-Za-z0-9_-]', '', stem)}.json"
        path.write_text(json.dumps(bundle, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
