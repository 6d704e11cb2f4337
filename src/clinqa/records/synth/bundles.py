"""The public face of the generator: `n` synthetic patients as FHIR R4 transaction Bundles, and
their files."""

from __future__ import annotations

import json
import random
import re
from datetime import date
from pathlib import Path

from clinqa.records.synth.patient import _Patient


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
