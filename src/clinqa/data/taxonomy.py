"""The fixed taxonomy of 15 clinical specialties every label in clinqa refers to.

Six are the experiment specialties of S-MedQA; nine more cover the rest of a licensing exam.
"""

from __future__ import annotations

from dataclasses import dataclass

from clinqa.errors import ClinqaError


@dataclass(frozen=True)
class Specialty:
    id: str
    name: str
    definition: str
    aliases: tuple[str, ...] = ()


SPECIALTIES: tuple[Specialty, ...] = (
    Specialty(
        "cardiology",
        "Cardiology",
        "Heart and blood vessels: ischaemia, arrhythmia, heart failure, valves, hypertension.",
        ("cardio", "cardiovascular"),
    ),
    Specialty(
        "gastroenterology",
        "Gastroenterology",
        "Digestive tract, liver, biliary system and pancreas.",
        ("gastro", "hepatology", "gi"),
    ),
    Specialty(
        "infectious_diseases",
        "Infectious diseases",
        "Bacterial, viral, fungal and parasitic infections, antimicrobials, vaccination.",
        ("infectious", "id", "infectious_disease", "microbiology"),
    ),
    Specialty(
        "neurology",
        "Neurology",
        "Brain, spinal cord, peripheral nerves and muscle: stroke, seizures, headache, neuropathy.",
        ("neuro",),
    ),
    Specialty(
        "obstetrics_gynecology",
        "Obstetrics & gynecology",
        "Pregnancy, childbirth, the female reproductive system and contraception.",
        ("obgyn", "ob_gyn", "obstetrics", "gynecology", "gynaecology"),
    ),
    Specialty(
        "pediatrics",
        "Pediatrics",
        "Health and disease of infants, children and adolescents, growth and development.",
        ("paediatrics", "peds", "paeds"),
    ),
    Specialty(
        "endocrinology",
        "Endocrinology",
        "Hormones and metabolism: diabetes, thyroid, adrenal, pituitary, bone metabolism.",
        ("endo",),
    ),
    Specialty(
        "hematology_oncology",
        "Hematology/oncology",
        "Blood disorders, coagulation, transfusion and cancer care.",
        ("hematology", "oncology", "haematology", "hemonc"),
    ),
    Specialty(
        "nephrology", "Nephrology", "Kidney disease, electrolytes, acid-base balance and dialysis.", ("renal", "nephro")
    ),
    Specialty(
        "pulmonology",
        "Pulmonology",
        "Lungs and airways: asthma, COPD, pneumonia management, pulmonary embolism, ventilation.",
        ("respiratory", "pulmonary", "pulm"),
    ),
    Specialty(
        "psychiatry",
        "Psychiatry",
        "Mental disorders, substance use and psychopharmacology.",
        ("psych", "mental_health"),
    ),
    Specialty("dermatology", "Dermatology", "Skin, hair and nails.", ("derm", "skin")),
    Specialty("rheumatology", "Rheumatology", "Joints, connective tissue and autoimmune disease.", ("rheum",)),
    Specialty(
        "surgery",
        "Surgery",
        "Operative management, trauma, perioperative care and the acute abdomen.",
        ("general_surgery",),
    ),
    Specialty(
        "emergency_medicine",
        "Emergency medicine",
        "Resuscitation, toxicology, triage and acute undifferentiated presentations.",
        ("emergency", "em", "toxicology"),
    ),
)

EXPERIMENT_SPECIALTIES: tuple[str, ...] = (
    "cardiology",
    "gastroenterology",
    "infectious_diseases",
    "neurology",
    "obstetrics_gynecology",
    "pediatrics",
)

_BY_ID = {s.id: s for s in SPECIALTIES}
_BY_ALIAS = {a: s.id for s in SPECIALTIES for a in (s.id, *s.aliases)}


def _norm(label: str) -> str:
    return (
        label.strip()
        .lower()
        .replace("&", "_")
        .replace("/", "_")
        .replace("-", "_")
        .replace(" ", "_")
        .replace("__", "_")
        .strip("_")
    )


def resolve_specialty(label: str) -> str:
    """Map an id, alias or display name to its taxonomy id; a clear error for anything else."""
    key = _norm(label)
    if key in _BY_ALIAS:
        return _BY_ALIAS[key]
    for s in SPECIALTIES:
        if _norm(s.name) == key:
            return s.id
    raise ClinqaError(
        f"unknown specialty {label!r}: use one of {', '.join(s.id for s in SPECIALTIES)} (or an alias such as cardio, gastro, obgyn)"
    )


def get_specialty(label: str) -> Specialty:
    return _BY_ID[resolve_specialty(label)]
