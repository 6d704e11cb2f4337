"""`PatientRecord`, what every loader returns, and the vocabulary of loading: the FHIR version, the
billing and directory resource types, the shapes of references and ids, patient names and FHIR dates."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from typing import Any

FHIR_VERSION = "R4B"
BILLING_TYPES = frozenset({"Claim", "ClaimResponse", "ExplanationOfBenefit"})
# Resources that belong to no patient: shared by every record that refers to them.
DIRECTORY_TYPES = frozenset(
    {"Organization", "Practitioner", "PractitionerRole", "Location", "HealthcareService", "Endpoint", "Medication"}
)
# Where a resource names the patient it is about, in order of preference.
_PATIENT_FIELDS = ("subject", "patient", "beneficiary", "individual")
_FHIR_JSON = "application/fhir+json"

_RELATIVE_REF = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
_ABSOLUTE_REF = re.compile(r"^(https?://.+?)/([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
_CONDITIONAL_REF = re.compile(r"^[A-Z][A-Za-z]+\?")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
# What a user can do about a strict-mode error: the CLI's flag and the service's setting (lenient=True in Python).
LENIENT_HINT = "use --lenient (serve: records_lenient) to load the rest and list the problems"
KEEP_INVALID_HINT = "use --lenient (serve: records_lenient) to keep invalid resources"


@dataclass
class PatientRecord:
    """One patient's resources as loaded.

    `resources` maps resource id -> resource JSON (dict), the Patient included, in load order.
    Ids are FHIR ids; only if two resources of different types share an id does the second get
    the key ``Type/id``. References inside the resources are rewritten to ``Type/id``.
    `problems` lists what lenient loading kept despite errors and references that lead nowhere.
    """

    patient_id: str
    patient: dict
    resources: dict[str, dict]
    problems: list[str] = field(default_factory=list)
    source: str = ""
    excluded: dict[str, int] = field(default_factory=dict)  # resource type -> count left out (billing)

    def by_type(self, resource_type: str) -> list[dict]:
        """The resources of one type, in load order."""
        return [r for r in self.resources.values() if r.get("resourceType") == resource_type]

    def counts(self) -> dict[str, int]:
        """Resource type -> number of resources, most frequent first."""
        return dict(Counter(r.get("resourceType", "?") for r in self.resources.values()).most_common())

    def resolve(self, reference: str | dict | None) -> dict | None:
        """The resource a reference (``"Type/id"``, a Reference dict or a bare id) points to, or None."""
        if isinstance(reference, dict):
            reference = reference.get("reference")
        if not reference:
            return None
        m = _RELATIVE_REF.match(reference)
        if m:
            rtype, rid = m.groups()
            for key in (rid, f"{rtype}/{rid}"):
                found = self.resources.get(key)
                if found is not None and found.get("resourceType") == rtype:
                    return found
            return None
        return self.resources.get(reference)

    @property
    def name(self) -> str:
        """The patient's name as "Given Family" (official name first), or "" if none."""
        return patient_name(self.patient)

    @property
    def birth_date(self) -> date | None:
        return parse_date(self.patient.get("birthDate"))

    @property
    def gender(self) -> str | None:
        return self.patient.get("gender")

    def __repr__(self) -> str:
        return f"PatientRecord({self.patient_id!r}, {self.name!r}, {len(self.resources)} resources, source={self.source!r})"


def patient_name(patient: dict) -> str:
    names = patient.get("name") or []
    if not isinstance(names, list) or not names:
        return ""
    chosen = next((n for n in names if isinstance(n, dict) and n.get("use") == "official"), names[0])
    if not isinstance(chosen, dict):
        return ""
    if chosen.get("text"):
        return str(chosen["text"])
    parts = [*chosen.get("given", []), chosen.get("family", "")]
    return " ".join(str(p) for p in parts if p)


def parse_date(value: Any) -> date | None:
    """The calendar date of a FHIR date/dateTime/instant ("2021", "2021-03", "2021-03-04T..."); partial
    dates fall on the first day of their year or month."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        year = int(value[0:4])
        month = int(value[5:7]) if len(value) >= 7 else 1
        day = int(value[8:10]) if len(value) >= 10 else 1
        return date(year, month, day)
    except ValueError:
        return None
