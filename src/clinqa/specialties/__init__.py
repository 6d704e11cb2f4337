"""Clinical specialties: the taxonomy, annotators and conformal multi-label sets."""

from clinqa.specialties.taxonomy import EXPERIMENT_SPECIALTIES, SPECIALTIES, Specialty, get_specialty, resolve_specialty

__all__ = ["SPECIALTIES", "Specialty", "EXPERIMENT_SPECIALTIES", "get_specialty", "resolve_specialty"]
