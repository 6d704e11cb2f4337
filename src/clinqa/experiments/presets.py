"""Named settings of published protocols, applied under explicit flags.

    settings = apply_preset("s-medqa", explicit={"epochs": None, "shuffles": 2}, defaults={"epochs": 3, "shuffles": 1})
    # -> {"epochs": 10, "shuffles": 2, ...}: a flag the user gave wins, then the preset, then clinqa's default

clinqa's own defaults suit small models on a CPU (LoRA learning rate 2e-4, few epochs, 1 shuffle,
the option method). `--preset s-medqa` is the S-MedQA paper's protocol instead: LoRA learning rate
2e-5, up to 10 epochs with early stopping on the validation loss, 5 option shuffles, answers
generated and mapped to an option by a matcher (the paper's classifier; here MiniLM similarity,
clinqa.evaluate.matcher). The preset's name goes into the run's or experiment's config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clinqa.errors import ClinqaError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)  # option name -> value


PRESETS: dict[str, Preset] = {
    "s-medqa": Preset(
        "s-medqa",
        "S-MedQA's protocol: LoRA lr 2e-5, up to 10 epochs with early stopping (patience 2), 5 shuffles, "
        "--method generate with the MiniLM matcher",
        {"learning_rate": 2e-5, "epochs": 10, "patience": 2, "shuffles": 5, "method": "generate", "matcher": "minilm"},
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ClinqaError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}") from None


def apply_preset(name: str | None, explicit: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """For every key of `defaults`: the explicit value when not None, else the preset's, else the default."""
    preset = get_preset(name).settings if name else {}
    return {k: explicit[k] if explicit.get(k) is not None else preset.get(k, d) for k, d in defaults.items()}


__all__ = ["PRESETS", "Preset", "apply_preset", "get_preset"]
