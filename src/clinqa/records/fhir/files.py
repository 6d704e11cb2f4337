"""Records from files: a Bundle JSON file (or a Bundle already in memory) and a bulk-export folder
of NDJSON files."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clinqa.errors import ClinqaError
from clinqa.records.fhir.assembly import _Assembly, _Item
from clinqa.records.fhir.record import PatientRecord


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ClinqaError(f"{path}: not a text file; expected FHIR JSON") from None
    except OSError as exc:
        raise ClinqaError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClinqaError(
            f"{path}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); expected a FHIR R4 Bundle"
        ) from None


def _bundle_items(bundle: Any, where: str) -> list[_Item]:
    if not isinstance(bundle, dict) or "resourceType" not in bundle:
        raise ClinqaError(f"{where}: not a FHIR resource (no resourceType); expected a FHIR R4 Bundle")
    if bundle["resourceType"] != "Bundle":
        raise ClinqaError(f"{where}: a FHIR {bundle['resourceType']} resource, not a Bundle; expected a FHIR R4 Bundle")
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise ClinqaError(f"{where}: Bundle.entry is not a list")
    items = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):  # null, a number, a string: reported by _Assembly.add, never dropped silently
            items.append(_Item(f"{where}: entry[{i}]", entry))
            continue
        if "resource" not in entry:
            continue  # e.g. a DELETE in a transaction: nothing to load
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        items.append(_Item(f"{where}: entry[{i}]", entry["resource"], full_url))
    return items


def _load_bundle_assembly(path: Path, *, lenient: bool, include_billing: bool) -> _Assembly:
    if not path.exists():
        raise ClinqaError(f"{path}: no such file")
    if path.is_dir():
        raise ClinqaError(f"{path}: is a folder; load_bundle reads one Bundle file (load_records reads folders)")
    asm = _Assembly(str(path), lenient=lenient, include_billing=include_billing)
    for item in _bundle_items(_read_json(path), str(path)):
        asm.add(item)
    asm.link()
    return asm


def record_from_bundle(
    bundle: dict, *, source: str = "<bundle>", lenient: bool = False, include_billing: bool = False
) -> PatientRecord:
    """`load_bundle` for a Bundle already in memory (e.g. from `clinqa.records.synth.synthesize_patients`)."""
    asm = _Assembly(source, lenient=lenient, include_billing=include_billing)
    for item in _bundle_items(bundle, source):
        asm.add(item)
    asm.link()
    return asm.single()


def load_bundle(path: str | Path, *, lenient: bool = False, include_billing: bool = False) -> PatientRecord:
    """One patient's record from a FHIR R4 Bundle JSON file (transaction, collection, searchset, ...).

    Raises ClinqaError for a file that is not JSON, not a Bundle, holds no Patient or more than one,
    and (unless lenient) for the first resource that is not valid FHIR R4.
    """
    return _load_bundle_assembly(Path(path), lenient=lenient, include_billing=include_billing).single()


# ---------------------------------------------------------------------------------------- NDJSON bulk export


def _ndjson_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and (p.name.endswith(".ndjson") or p.name.endswith(".ndjson.gz"))
    )


def _ndjson_items(path: Path, asm: _Assembly) -> Iterator[_Item]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield _Item(f"{path}: line {n}", json.loads(line))
                except json.JSONDecodeError as exc:
                    asm.fail_or_note(f"{path}: line {n}: not JSON ({exc.msg}, column {exc.colno})")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise ClinqaError(f"{path}: cannot read ({exc}); expected NDJSON, one FHIR resource per line") from None


def load_ndjson_folder(
    path: str | Path, *, lenient: bool = False, include_billing: bool = False
) -> list[PatientRecord]:
    """Records from a FHIR bulk-data export folder (Patient.ndjson, Observation.ndjson, ...; also .ndjson.gz),
    one per Patient, in the order the Patients appear."""
    folder = Path(path)
    if not folder.is_dir():
        raise ClinqaError(f"{folder}: not a folder; expected a bulk-export folder of .ndjson files")
    files = _ndjson_files(folder)
    if not files:
        raise ClinqaError(
            f"{folder}: no .ndjson files; expected a bulk-export folder (Patient.ndjson, Observation.ndjson, ...)"
        )
    # Patients first, so records come out in the Patient file's order whatever the file names.
    files.sort(key=lambda p: (not p.name.startswith("Patient"), p.name))
    asm = _Assembly(str(folder), lenient=lenient, include_billing=include_billing, scope="the export")
    for f in files:
        for item in _ndjson_items(f, asm):
            asm.add(item)
    asm.link()
    return asm.split()
