"""Adapting a model: LoRA adapters, steering vectors, retrieval; and the spec modifiers that apply them."""

from __future__ import annotations

from clinqa.errors import ClinqaError
from clinqa.models import load_base_model, parse_spec
from clinqa.models.base import Predictor


def load_predictor(spec: str) -> Predictor:
    """A model spec with its +modifiers applied in order, e.g. default+lora:adapters/cardio."""
    ms = parse_spec(spec)
    predictor = load_base_model(ms)
    for mod in ms.modifiers:
        raise ClinqaError(f"model modifier '{mod.kind}:' is not available in this version of clinqa yet (spec {spec!r})")
    return predictor
