"""Fixtures for the FHIR record tests: a few synthetic patients (no real data)."""

from __future__ import annotations

from datetime import date

import pytest

NOW = date(2025, 1, 1)


@pytest.fixture(scope="session")
def synthetic_bundles():
    from clinqa.records.synth import synthesize_patients

    return synthesize_patients(6, seed=11, now=NOW)


@pytest.fixture(scope="session")
def synthetic_records(synthetic_bundles):
    from clinqa.records.fhir import record_from_bundle

    return [record_from_bundle(b, source=f"synthetic-{i}") for i, b in enumerate(synthetic_bundles)]
