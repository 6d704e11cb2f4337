"""Load a patient's FHIR R4 record: a Bundle file, a bulk-export NDJSON folder or a FHIR server.

Every loader ends in the same place: one `PatientRecord` per patient, holding the raw resource
JSON keyed by resource id, with references rewritten to the plain ``Type/id`` form (what a FHIR
server stores after it processes a transaction), so ``record.resolve(ref)`` finds the target.

Validation uses the FHIR **R4B** models of ``fhir.resources`` (``fhir.resources.R4B``).
``fhir.resources`` 8 validates R5 by default, and R5 rejects ordinary R4 data (``Encounter.class``
became a list, ``MedicationRequest.medicationCodeableConcept`` became ``medication``, ...).
The package ships no R4 models; R4B is R4 plus the new medication-definition and subscription
resources, with the clinical resources unchanged, so R4 data validates against it as is: all eight
Synthea R4 sample bundles this was developed against (1 Patient, Encounter, Condition,
Observation, MedicationRequest, Procedure, Immunization, DiagnosticReport, CarePlan, Claim,
ExplanationOfBenefit, Organization, Practitioner) validate without a single error. The only R4
resources R4B does not know are the ones it replaced (MedicinalProduct*, Substance{Specification,
Polymer, ...}, Effect/RiskEvidenceSynthesis); they never carry patient care data, and in lenient
mode they are kept unvalidated like any other invalid resource.

Strict mode (the default) raises `ClinqaError` on the first invalid resource, naming the file,
the entry, the resource and the field. ``lenient=True`` keeps such resources as they are and
records a line in ``record.problems`` instead. References that point to nothing in the bundle are
always reported as problems, never errors: the rest of the record is still usable. Conditional
references (``Organization?identifier=...``), absolute URLs to other servers and references to
contained resources that exist are fine.

Claim and ExplanationOfBenefit (and ClaimResponse) carry billing, not care; they are left out
unless ``include_billing=True``.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from clinqa.errors import ClinqaError

log = logging.getLogger(__name__)

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


def _json_kind(value: Any) -> str:
    return {
        type(None): "null",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "a list",
    }.get(type(value), f"a {type(value).__name__}")


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


# ---------------------------------------------------------------------------------------- validation


def _model_class(resource_type: str):
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def _loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(resource)"


def _clean_msg(msg: str) -> str:
    msg = msg.removeprefix("Value error, ").strip().rstrip(".")
    if msg == "Extra inputs are not permitted":
        return "unknown field (not in FHIR R4)"
    return msg


def validation_errors(resource: dict) -> list[tuple[str, str]]:
    """(field path, message) for every way `resource` fails the FHIR R4(B) model; [] when valid."""
    rtype = resource.get("resourceType")
    try:
        model = _model_class(rtype)
    except (ValueError, KeyError, TypeError, AttributeError):
        return [("resourceType", f"unknown resource type {rtype!r}")]
    try:
        model.model_validate(resource)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        errors = getattr(exc, "errors", None)
        if callable(errors):
            return [(_loc(e.get("loc", ())), _clean_msg(str(e.get("msg", "")))) for e in errors()] or [
                ("(resource)", _clean_msg(str(exc)))
            ]
        return [("(resource)", _clean_msg(str(exc)))]
    return []


# ---------------------------------------------------------------------------------------- assembly


@dataclass
class _Item:
    where: str  # "file.json: entry[3]" -- where the resource came from, for messages
    resource: dict
    full_url: str | None = None


def _refs(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """(field path, Reference dict) for every Reference with a `reference` string inside `node`,
    contained resources included ("#id" references resolve against the containing resource)."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield path, node
        for k, v in node.items():
            yield from _refs(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _refs(v, f"{path}[{i}]")


def _describe(resource: dict) -> str:
    return f"{resource.get('resourceType', '?')}/{resource.get('id', '?')}"


def _id_from_full_url(full_url: str | None) -> str | None:
    if not full_url:
        return None
    if full_url.startswith("urn:uuid:") or full_url.startswith("urn:oid:"):
        candidate = full_url.split(":", 2)[2]
    else:
        candidate = full_url.rstrip("/").split("/")[-1]
    return candidate if _ID.match(candidate) else None


class _Assembly:
    """Validate, key, link and group a stream of resources into PatientRecords."""

    def __init__(self, source: str, *, lenient: bool, include_billing: bool, scope: str = "the bundle"):
        self.source = source
        self.scope = scope  # where a reference should have found its target, for messages
        self.lenient = lenient
        self.include_billing = include_billing
        self.resources: dict[str, dict] = {}  # key -> resource (copy, references rewritten)
        self.where: dict[str, str] = {}  # key -> where it came from
        self.by_type_id: dict[tuple[str, str], str] = {}  # (type, id) -> key
        self.by_full_url: dict[str, tuple[str, str]] = {}  # fullUrl -> (type, id)
        self.excluded: Counter[str] = Counter()
        self.excluded_urls: set[str] = set()
        self.excluded_type_ids: set[tuple[str, str]] = set()
        self.problems: dict[str, list[str]] = {}  # key -> problems about that resource
        self.loose_problems: list[str] = []  # problems that belong to no resource
        self._generated = 0

    # -- problems
    def _problem(self, key: str | None, text: str) -> None:
        if key is None:
            self.loose_problems.append(text)
        else:
            self.problems.setdefault(key, []).append(text)

    def fail_or_note(self, text: str, *, hint: str = LENIENT_HINT) -> None:
        if not self.lenient:
            raise ClinqaError(f"{text} ({hint})")
        self.loose_problems.append(text)

    # -- intake
    def add(self, item: _Item) -> None:
        res = item.resource
        if not isinstance(res, dict):
            self.fail_or_note(f"{item.where}: not a FHIR resource ({_json_kind(res)}, not an object)")
            return
        rtype = res.get("resourceType")
        if not isinstance(rtype, str) or not rtype:
            self.fail_or_note(f"{item.where}: not a FHIR resource (no resourceType)")
            return
        if rtype in BILLING_TYPES and not self.include_billing:
            self.excluded[rtype] += 1
            if item.full_url:
                self.excluded_urls.add(item.full_url)
            if isinstance(res.get("id"), str):
                self.excluded_type_ids.add((rtype, res["id"]))
            return

        res = json.loads(json.dumps(res))  # our own copy: references get rewritten below
        rid = res.get("id")
        if not isinstance(rid, str) or not rid:
            rid = _id_from_full_url(item.full_url)
            if rid is None:
                self._generated += 1
                rid = f"{rtype.lower()}-{self._generated}"
            res["id"] = rid

        errors = validation_errors(res)
        note = None
        if errors:
            fld, msg = errors[0]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            text = f"{item.where}, {rtype}/{rid}: field '{fld}': {msg}{more}"
            if not self.lenient:
                raise ClinqaError(f"{text} ({KEEP_INVALID_HINT})")
            note = f"{text}; kept unvalidated"

        if (rtype, rid) in self.by_type_id:
            first = self.by_type_id[(rtype, rid)]
            self._problem(first, f"{item.where}: {rtype}/{rid} appears again; kept the first one ({self.where[first]})")
            return
        key = rid if rid not in self.resources else f"{rtype}/{rid}"
        while key in self.resources:  # pathological: "Type/id" also taken
            key += "_"
        self.resources[key] = res
        self.where[key] = item.where
        self.by_type_id[(rtype, rid)] = key
        if item.full_url:
            self.by_full_url[item.full_url] = (rtype, rid)
        if note:
            self._problem(key, note)

    # -- linking
    def _target(self, ref: str, owner: dict) -> tuple[str, str] | None | bool:
        """(type, id) the reference points to; None if external/unknowable (fine); False if broken."""
        if ref.startswith("#"):
            local = ref[1:]
            contained = owner.get("contained") or []
            if not local:
                return None  # "#" = the containing resource itself
            return None if any(isinstance(c, dict) and c.get("id") == local for c in contained) else False
        if ref in self.by_full_url:
            return self.by_full_url[ref]
        if ref in self.excluded_urls:
            return None
        if ref.startswith("urn:"):
            return False
        if _CONDITIONAL_REF.match(ref):
            return None
        m = _RELATIVE_REF.match(ref)
        if m:
            rtype, rid = m.groups()
            if (rtype, rid) in self.by_type_id:
                return (rtype, rid)
            if (rtype, rid) in self.excluded_type_ids:
                return None
            return False
        m = _ABSOLUTE_REF.match(ref)
        if m:
            base, rtype, rid = m.groups()
            ours = any(u.startswith(base + "/") for u in self.by_full_url)
            if ours and (rtype, rid) in self.by_type_id:
                return (rtype, rid)
            return False if ours else None
        return False

    def link(self) -> None:
        broken: dict[tuple[str, str], list[str]] = {}  # (key, ref) -> field paths
        for key, res in self.resources.items():
            for path, node in _refs(res):
                ref = node["reference"]
                target = self._target(ref, res)
                if target is False:
                    broken.setdefault((key, ref), []).append(path)
                elif target is not None:
                    node["reference"] = f"{target[0]}/{target[1]}"
        for (key, ref), paths in broken.items():
            res = self.resources[key]
            extra = f" (and {len(paths) - 1} more fields)" if len(paths) > 1 else ""
            self._problem(
                key,
                f"{self.where[key]}, {_describe(res)}: field '{paths[0]}'{extra}: reference {ref!r} points to nothing in {self.scope}",
            )

    # -- grouping
    def _patient_of(self, res: dict) -> str | None:
        """The key of the Patient this resource is about, if it names exactly one."""
        if res.get("resourceType") == "Patient":
            return self.by_type_id.get(("Patient", res["id"]))
        for fld in _PATIENT_FIELDS:
            node = res.get(fld)
            ref = node.get("reference") if isinstance(node, dict) else None
            if isinstance(ref, str) and ref.startswith("Patient/"):
                return self.by_type_id.get(("Patient", ref.split("/", 1)[1]))
        found = {
            node["reference"].split("/", 1)[1]
            for _, node in _refs(res)
            if node["reference"].startswith("Patient/") and _RELATIVE_REF.match(node["reference"])
        }
        keys = {self.by_type_id.get(("Patient", pid)) for pid in found} - {None}
        return keys.pop() if len(keys) == 1 else None

    def _foreign_patient(self, res: dict) -> str | None:
        """The reference, if ``res`` names in a patient field (subject, patient, ...) a Patient that is not
        in this load: such a resource is about someone else and belongs in no record here."""
        if res.get("resourceType") == "Patient":
            return None
        for fld in _PATIENT_FIELDS:
            node = res.get(fld)
            ref = node.get("reference") if isinstance(node, dict) else None
            if not isinstance(ref, str) or ref.startswith("#"):
                continue
            m = _RELATIVE_REF.match(ref) or _ABSOLUTE_REF.match(ref)
            rtype, rid = m.groups()[-2:] if m else (None, None)
            if rtype is not None and rtype != "Patient":
                continue  # e.g. a Group: not a patient
            if rtype == "Patient" and ("Patient", rid) in self.by_type_id and (m.re is _RELATIVE_REF):
                return None
            return ref  # a Patient/x, absolute or urn: reference that resolved to no patient of this load
        return None

    def _leave_out_foreign(self, keys: list[str]) -> list[str]:
        """``keys`` without the resources about a patient who is not in this load (each reported once)."""
        kept = []
        for k in keys:
            ref = self._foreign_patient(self.resources[k])
            if ref is None:
                kept.append(k)
                continue
            text = (
                f"{self.where[k]}, {_describe(self.resources[k])}: about {ref!r}, a patient not in {self.scope}; "
                "left out of every record"
            )
            if text not in self.loose_problems:
                self.loose_problems.append(text)
        return kept

    def _record(self, patient_key: str, keys: list[str]) -> PatientRecord:
        problems = list(self.loose_problems)
        for k in keys:
            problems.extend(self.problems.get(k, []))
        return PatientRecord(
            patient_id=patient_key,
            patient=self.resources[patient_key],
            resources={k: self.resources[k] for k in keys},
            problems=problems,
            source=self.source,
            excluded=dict(self.excluded),
        )

    def patients(self) -> list[str]:
        return [k for k, r in self.resources.items() if r.get("resourceType") == "Patient"]

    def single(self, *, expected_patient: str | None = None) -> PatientRecord:
        """Everything in one record (a patient's bundle)."""
        patients = self.patients()
        if not patients:
            raise ClinqaError(f"{self.source}: no Patient resource; a record needs exactly one patient")
        if expected_patient is not None:
            chosen = self.by_type_id.get(("Patient", expected_patient))
            if chosen is None:
                raise ClinqaError(f"{self.source}: the response holds no Patient/{expected_patient}")
        elif len(patients) > 1:
            ids = ", ".join(self.resources[k]["id"] for k in patients[:5])
            raise ClinqaError(
                f"{self.source}: {len(patients)} Patient resources ({ids}{', ...' if len(patients) > 5 else ''}); "
                "load_bundle reads one patient per bundle, load_records splits a bundle by patient"
            )
        else:
            chosen = patients[0]
        # a resource about another patient (of this response, or one not in it) is not this patient's
        owner = {k: self._patient_of(r) for k, r in self.resources.items()}
        keys = self._leave_out_foreign([k for k in self.resources if owner[k] in (None, chosen)])
        return self._record(chosen, keys)

    def split(self) -> list[PatientRecord]:
        """One record per Patient: the resources about that patient, plus the shared resources they
        refer to (practitioners, organizations, medications, ...), transitively."""
        patients = self.patients()
        if not patients:
            raise ClinqaError(f"{self.source}: no Patient resource; nothing to build a record from")
        owner = {k: self._patient_of(r) for k, r in self.resources.items()}
        foreign = set(self.resources) - set(self._leave_out_foreign(list(self.resources)))
        members: dict[str, list[str]] = {p: [] for p in patients}
        for k, p in owner.items():
            if p is not None:
                members[p].append(k)
        unowned = [k for k, p in owner.items() if p is None]
        records = []
        for p in patients:
            keep = set(members[p])
            frontier = list(members[p])
            while frontier:  # pull in referenced shared resources
                k = frontier.pop()
                for _, node in _refs(self.resources[k]):
                    m = _RELATIVE_REF.match(node["reference"])
                    if not m:
                        continue
                    t = self.by_type_id.get((m.group(1), m.group(2)))
                    if t is not None and t not in keep and owner.get(t) is None and t not in foreign:
                        keep.add(t)
                        frontier.append(t)
            ordered = [k for k in self.resources if k in keep]
            records.append(self._record(p, ordered))
        clinical_orphans = [k for k in unowned if self.resources[k].get("resourceType") not in DIRECTORY_TYPES
                            and k not in foreign]  # fmt: skip
        used = set().union(*(r.resources for r in records)) if records else set()
        orphans = [k for k in clinical_orphans if k not in used]
        if orphans:
            sample = ", ".join(_describe(self.resources[k]) for k in orphans[:3])
            log.warning(
                "%s: %d resources name no patient of this load and were left out (%s%s)",
                self.source,
                len(orphans),
                sample,
                ", ..." if len(orphans) > 3 else "",
            )
        return records


# ---------------------------------------------------------------------------------------- bundle files


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


# ---------------------------------------------------------------------------------------- FHIR server


def _http_error(url: str, response: Any) -> ClinqaError:
    detail = ""
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
            issues = [i.get("diagnostics") or (i.get("details") or {}).get("text") for i in body.get("issue", [])]
            detail = "; ".join(i for i in issues if i)
    except ValueError:
        pass
    status = response.status_code
    hint = {
        401: "the server wants credentials: pass an httpx.Client with auth",
        403: "the server refused access: pass an httpx.Client with auth",
        404: "no such patient, or the server does not support $everything",
    }.get(status, "")
    parts = [p for p in (detail, hint) if p]
    return ClinqaError(f"{url}: HTTP {status}" + (f" ({'; '.join(parts)})" if parts else ""))


def load_fhir_server(
    base_url: str,
    patient_id: str,
    *,
    client: Any = None,
    lenient: bool = False,
    include_billing: bool = False,
    timeout: float = 60.0,
    max_pages: int = 1000,
) -> PatientRecord:
    """A patient's record from a FHIR R4 server: ``GET {base}/Patient/{id}/$everything``, following
    ``link[relation=next]`` pages. `client` is an ``httpx.Client`` (e.g. with auth or a MockTransport);
    by default a plain one is made and closed."""
    import httpx

    base = base_url.rstrip("/")
    first = f"{base}/Patient/{patient_id}/$everything"
    own = client is None
    http = httpx.Client(timeout=timeout, follow_redirects=True) if own else client
    asm = _Assembly(first, lenient=lenient, include_billing=include_billing, scope="the server's response")
    try:
        url: str | None = first
        seen: set[str] = set()
        page = 0
        while url:
            if url in seen or page >= max_pages:
                asm.loose_problems.append(
                    f"{first}: stopped paging at page {page + 1} ({'loop' if url in seen else 'page limit'})"
                )
                break
            seen.add(url)
            page += 1
            try:
                resp = http.get(url, headers={"Accept": _FHIR_JSON})
            except httpx.HTTPError as exc:
                raise ClinqaError(f"{url}: cannot reach the FHIR server ({type(exc).__name__}: {exc})") from None
            if resp.status_code >= 400:
                raise _http_error(url, resp)
            try:
                bundle = resp.json()
            except ValueError:
                raise ClinqaError(
                    f"{url}: the server's answer is not JSON (content-type {resp.headers.get('content-type')!r})"
                ) from None
            where = f"{first} page {page}"
            for item in _bundle_items(bundle, where):
                if isinstance(item.resource, dict) and item.resource.get("resourceType") == "OperationOutcome":
                    issues = [i.get("diagnostics", "") for i in item.resource.get("issue", []) if isinstance(i, dict)]
                    asm.loose_problems.append(
                        f"{item.where}: server says: {'; '.join(x for x in issues if x) or 'OperationOutcome'}"
                    )
                    continue
                asm.add(item)
            nxt = next(
                (l.get("url") for l in bundle.get("link", []) if isinstance(l, dict) and l.get("relation") == "next"),
                None,
            )
            url = urljoin(url, nxt) if nxt else None
    finally:
        if own:
            http.close()
    asm.link()
    return asm.single(expected_patient=patient_id)


# ---------------------------------------------------------------------------------------- dispatch

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
