"""What the question generator knows of clinical names: the LOINC codes of measurements and the words
clinicians use for them, the labs, conditions, drugs and vaccines a record is probed for (present
or absent), and which measurement a clinician checks around a drug's start."""

from __future__ import annotations

# LOINC code -> the name a clinician would use in a question.
FRIENDLY: dict[str, str] = {
    "4548-4": "hemoglobin A1c", "17856-6": "hemoglobin A1c", "2345-7": "glucose", "2339-0": "glucose",
    "2160-0": "creatinine", "38483-4": "creatinine", "33914-3": "eGFR", "62238-1": "eGFR", "98979-8": "eGFR",
    "48642-3": "eGFR", "48643-1": "eGFR", "2823-3": "potassium", "6298-4": "potassium", "2951-2": "sodium",
    "2947-0": "sodium", "2093-3": "total cholesterol", "18262-6": "LDL cholesterol", "13457-7": "LDL cholesterol",
    "2089-1": "LDL cholesterol", "2085-9": "HDL cholesterol", "2571-8": "triglycerides", "718-7": "hemoglobin",
    "6690-2": "white blood cell count", "777-3": "platelet count", "789-8": "red blood cell count",
    "4544-3": "hematocrit", "787-2": "MCV", "785-6": "MCH", "786-4": "MCHC", "21000-5": "RDW",
    "32207-3": "platelet distribution width", "32623-1": "mean platelet volume", "3016-3": "TSH",
    "6301-6": "INR", "34714-6": "INR", "44261-6": "PHQ-9 score", "8480-6": "systolic blood pressure",
    "8462-4": "diastolic blood pressure", "8867-4": "heart rate", "29463-7": "body weight", "8302-2": "body height",
    "39156-5": "BMI", "8310-5": "body temperature", "8331-1": "oral temperature", "9279-1": "respiratory rate",
    "59408-5": "oxygen saturation", "2708-6": "oxygen saturation", "72514-3": "pain score",
    "6299-2": "urea nitrogen", "3094-0": "urea nitrogen", "2075-0": "chloride", "2069-3": "chloride",
    "2028-9": "carbon dioxide", "20565-8": "carbon dioxide", "17861-6": "calcium", "49765-1": "calcium",
    "1742-6": "ALT", "1920-8": "AST", "1975-2": "total bilirubin", "1751-7": "albumin", "2885-2": "total protein",
    "6768-6": "alkaline phosphatase", "14959-1": "urine microalbumin/creatinine ratio",
}  # fmt: skip
# (question name, LOINC codes, words that mean it is there) for labs a record may lack.
LAB_PROBES: list[tuple[str, set[str], tuple[str, ...]]] = [
    ("hemoglobin A1c", {"4548-4", "17856-6"}, ("a1c",)),
    ("TSH", {"3016-3", "11580-8"}, ("thyrotropin", "tsh")),
    ("INR", {"6301-6", "34714-6"}, ("inr",)),
    ("PSA", {"2857-1", "35741-8"}, ("prostate specific",)),
    ("vitamin D level", {"1989-3", "62292-8"}, ("vitamin d", "25-hydroxy")),
    ("ferritin", {"2276-4"}, ("ferritin",)),
    ("troponin", {"6598-7", "10839-9", "89579-7"}, ("troponin",)),
    ("BNP", {"30934-4", "33762-6"}, ("natriuretic",)),
    ("magnesium", {"19123-9", "2601-3"}, ("magnesium",)),
    ("ALT", {"1742-6", "1743-4"}, ("alanine aminotransferase",)),
    ("CRP", {"1988-5", "30522-7"}, ("c reactive",)),
    ("uric acid", {"3084-1"}, ("urate", "uric acid")),
    ("LDL cholesterol", {"18262-6", "13457-7", "2089-1"}, ("ldl", "low density")),
    ("potassium", {"2823-3", "6298-4"}, ("potassium",)),
    ("creatinine", {"2160-0", "38483-4"}, ("creatinine",)),
    ("hemoglobin", {"718-7"}, ("hemoglobin [mass",)),
]
# (question name, SNOMED codes, words that mean it is there)
CONDITION_PROBES: list[tuple[str, set[str], tuple[str, ...]]] = [
    ("asthma", {"195967001"}, ("asthma",)),
    ("type 2 diabetes", {"44054006"}, ("diabetes",)),
    ("hypertension", {"38341003", "59621000"}, ("hypertens",)),
    ("atrial fibrillation", {"49436004"}, ("atrial fibrillation",)),
    ("chronic kidney disease", {"709044004", "433144002", "431855005", "431856006"}, ("kidney disease",)),
    ("COPD", {"13645005"}, ("obstructive", "copd", "emphysema")),
    ("heart failure", {"84114007", "88805009"}, ("heart failure",)),
    ("hypothyroidism", {"40930008"}, ("hypothyroid",)),
    ("depression", {"35489007", "370143000"}, ("depress",)),
    ("osteoarthritis", {"396275006", "239873007"}, ("osteoarthritis",)),
    ("coronary artery disease", {"53741008"}, ("coronary",)),
    ("stroke", {"230690007"}, ("stroke", "cerebrovascular")),
    ("epilepsy", {"84757009"}, ("epilep", "seizure")),
    ("hyperlipidemia", {"55822004"}, ("hyperlipid", "cholesterol")),
    ("migraine", {"37796009"}, ("migraine",)),
    ("gout", {"90560007"}, ("gout",)),
    ("rheumatoid arthritis", {"69896004"}, ("rheumatoid",)),
    ("anemia", {"271737000", "87522002"}, ("anemia", "anaemia")),
]
MEDICATION_PROBES = [
    "warfarin", "insulin", "metformin", "atorvastatin", "lisinopril", "levothyroxine", "prednisone", "furosemide",
    "omeprazole", "sertraline", "apixaban", "amlodipine", "albuterol", "gabapentin", "tramadol", "allopurinol",
]  # fmt: skip
VACCINE_GROUPS: dict[str, str] = {
    "140": "influenza", "141": "influenza", "150": "influenza", "158": "influenza", "161": "influenza", "88": "influenza",
    "113": "tetanus", "115": "tetanus", "09": "tetanus", "138": "tetanus", "133": "pneumococcal", "33": "pneumococcal",
    "152": "pneumococcal", "215": "pneumococcal", "216": "pneumococcal", "187": "shingles", "121": "shingles",
    "207": "COVID-19", "208": "COVID-19", "212": "COVID-19", "213": "COVID-19", "217": "COVID-19", "218": "COVID-19",
    "43": "hepatitis B", "08": "hepatitis B", "45": "hepatitis B", "83": "hepatitis A", "52": "hepatitis A",
    "10": "polio", "20": "diphtheria, tetanus and pertussis (DTaP)", "114": "meningococcal", "119": "rotavirus",
    "49": "Haemophilus influenzae type b", "62": "HPV", "165": "HPV", "03": "measles, mumps and rubella", "21": "varicella",
}  # fmt: skip
# A drug (word in its name) -> the measurement a clinician checks around its start.
LAB_FOR_DRUG: list[tuple[str, str]] = [
    ("metformin", "hemoglobin A1c"), ("insulin", "hemoglobin A1c"), ("lisinopril", "systolic blood pressure"),
    ("amlodipine", "systolic blood pressure"), ("hydrochlorothiazide", "systolic blood pressure"),
    ("losartan", "systolic blood pressure"), ("atorvastatin", "LDL cholesterol"), ("rosuvastatin", "LDL cholesterol"),
    ("simvastatin", "LDL cholesterol"), ("pravastatin", "LDL cholesterol"), ("levothyroxine", "TSH"),
    ("ferrous", "hemoglobin"), ("sertraline", "PHQ-9 score"), ("fluoxetine", "PHQ-9 score"),
    ("escitalopram", "PHQ-9 score"), ("digoxin", "heart rate"),
]  # fmt: skip
_INACTIVE_OBS = {"entered-in-error", "cancelled", "registered"}
# Paperwork, not care: "has the patient ever had a medication reconciliation?" is not a useful question.
_ADMIN_PROCEDURES = {"428191000124101", "430193006", "710824005", "711013002"}
_ACTIVE_CONDITION = {"active", "recurrence", "relapse"}
_BAD_VERIFICATION = {"refuted", "entered-in-error"}
