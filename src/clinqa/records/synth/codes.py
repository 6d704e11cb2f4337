"""The clinical vocabulary of the synthetic patients: code systems, lab tests with their LOINC codes and
reference ranges, conditions (SNOMED CT), drugs (RxNorm, with their sig), encounter types,
procedures, vaccines (CVX), allergens and reactions, and the names and places patients get.
Data tables only; `clinqa.records.synth.patient` draws from them."""

from __future__ import annotations

from dataclasses import dataclass

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
