"""The taxonomy lives in `clinqa.data.taxonomy` (data must not import specialties); kept importable here."""

from clinqa.data.taxonomy import EXPERIMENT_SPECIALTIES, SPECIALTIES, Specialty, get_specialty, resolve_specialty

__all__ = ["EXPERIMENT_SPECIALTIES", "SPECIALTIES", "Specialty", "get_specialty", "resolve_specialty"]
