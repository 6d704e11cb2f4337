"""`load_records`: records from wherever they are (a server URL, a Bundle file, NDJSON, a folder)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from clinqa.errors import ClinqaError
from clinqa.records.fhir.assembly import _Assembly
from clinqa.records.fhir.files import _load_bundle_assembly, _ndjson_files, _ndjson_items, load_ndjson_folder
from clinqa.records.fhir.record import DIRECTORY_TYPES, PatientRecord
from clinqa.records.fhir.server import load_fhir_server

log = logging.getLogger("clinqa.records.fhir")  # one logger for the whole loader, as before the split

_SERVER_URL = re.compile(r"^(https?://.+?)/Patient/([A-Za-z0-9\-.]{1,64})(?:/\$everything)?/?$")


def _is_directory_bundle(path: Path) -> bool:
    """A Synthea hospitalInformation*/practitionerInformation* file: shared resources, no patient."""
    try:
        bundle = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return False
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        return False
    types = {(e.get("resource") or {}).get("resourceType") for e in bundle.get("entry", []) if isinstance(e, dict)}
    return bool(types) and types <= DIRECTORY_TYPES


def load_records(
    path_or_url: str | Path, *, lenient: bool = False, include_billing: bool = False, client: Any = None
) -> list[PatientRecord]:
    """Records from wherever they are:

    - ``https://server/fhir/Patient/123`` (or ``.../$everything``): that patient from a FHIR server;
    - a ``.json`` Bundle file: its patients (a multi-patient bundle is split);
    - a ``.ndjson``/``.ndjson.gz`` file, or a folder of them: a bulk export;
    - a folder of ``.json`` Bundles: each one (Synthea's output folder works as is: its
      hospital/practitioner files hold no patient and are skipped).

    In lenient mode a folder's unreadable files are skipped with a warning instead of raising.
    """
    text = str(path_or_url)
    if text.startswith(("http://", "https://")):
        m = _SERVER_URL.match(text)
        if not m:
            raise ClinqaError(f"{text}: give a patient URL, e.g. https://server/fhir/Patient/<id>")
        return [
            load_fhir_server(m.group(1), m.group(2), client=client, lenient=lenient, include_billing=include_billing)
        ]
    path = Path(path_or_url)
    if not path.exists():
        raise ClinqaError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name.endswith((".ndjson", ".ndjson.gz")):
            asm = _Assembly(str(path), lenient=lenient, include_billing=include_billing, scope="the file")
            for item in _ndjson_items(path, asm):
                asm.add(item)
            asm.link()
            return asm.split()
        asm = _load_bundle_assembly(path, lenient=lenient, include_billing=include_billing)
        return [asm.single()] if len(asm.patients()) == 1 else asm.split()
    if _ndjson_files(path):
        return load_ndjson_folder(path, lenient=lenient, include_billing=include_billing)
    bundles = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".json")
    if not bundles:
        raise ClinqaError(f"{path}: no .json Bundles or .ndjson files in this folder")
    records: list[PatientRecord] = []
    for b in bundles:
        try:
            records.extend(load_records(b, lenient=lenient, include_billing=include_billing))
        except ClinqaError as exc:
            if "no Patient resource" in str(exc) and _is_directory_bundle(b):
                log.info("%s: shared organizations/practitioners only; skipped", b)
                continue
            if not lenient:
                raise
            log.warning("skipped %s", exc)
    return records
