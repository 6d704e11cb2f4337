"""Adapting a model: LoRA adapters, steering vectors, retrieval, prompts; and the spec modifiers
(`+lora:`, `+steer:`, `+rag:`, `+prompt:`) that apply them to any predictor.

Each modifier lives in its own module and exposes `apply(predictor, modifier) -> Predictor`; the
registry below names them by import path so the core never imports what a spec does not use.
"""

from __future__ import annotations

import importlib

from clinqa.errors import ClinqaError
from clinqa.models import load_base_model, parse_spec
from clinqa.models.base import Predictor
from clinqa.models.spec import Modifier

MODIFIERS: dict[str, str] = {
    "lora": "clinqa.adapt.lora:apply_modifier",
    "steer": "clinqa.adapt.control:apply_modifier",
    "rag": "clinqa.adapt.rag:apply_modifier",
    "prompt": "clinqa.adapt.prompting:apply_modifier",
}


def apply_modifier(predictor: Predictor, modifier: Modifier) -> Predictor:
    module_name, _, func = MODIFIERS[modifier.kind].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, func)(predictor, modifier)


def load_predictor(spec: str) -> Predictor:
    """A model spec with its +modifiers applied in order, e.g. default+lora:adapters/cardio."""
    ms = parse_spec(spec)
    predictor = load_base_model(ms)
    for mod in ms.modifiers:
        predictor = apply_modifier(predictor, mod)
    return predictor


__all__ = ["MODIFIERS", "apply_modifier", "load_predictor", "ClinqaError"]
