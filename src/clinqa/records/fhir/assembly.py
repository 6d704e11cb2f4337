"""`_Assembly`: every loader feeds it resources; it validates them (strict or lenient), keys them,
rewrites references to ``Type/id`` and reports the ones that lead nowhere, and groups the resources
into one `PatientRecord` per patient (`single` for a patient's bundle, `split` for many)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from clinqa.errors import ClinqaError
from clinqa.records.fhir.record import (
    _ABSOLUTE_REF,
    _CONDITIONAL_REF,
    _ID,
    _PATIENT_FIELDS,
    _RELATIVE_REF,
    BILLING_TYPES,
    DIRECTORY_TYPES,
    KEEP_INVALID_HINT,
    LENIENT_HINT,
    PatientRecord,
)
from clinqa.records.fhir.validate import validation_errors

log = logging.getLogger("clinqa.records.fhir")  # one logger for the whole loader, as before the split


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
