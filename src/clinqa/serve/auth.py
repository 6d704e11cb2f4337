"""API keys with SMART-on-FHIR-style scopes, kept in a small SQLite file.

Keys
----
A key looks like ``cq_<key_id>_<secret>``: ``key_id`` is 12 lowercase hex characters (public, it
names the key in listings and in the audit log) and ``secret`` is ``secrets.token_urlsafe(32)``
(43 characters of ``A-Za-z0-9_-``). The plain key is returned once, by :meth:`KeyStore.create`;
the store keeps only ``scrypt(secret, per-key salt)`` and compares digests with
:func:`hmac.compare_digest`.

Scope grammar
-------------
A scope string is a whitespace-separated list of scope tokens::

    scopes    := token (WS token)*          (the empty string is "no scopes")
    token     := "patient/" patient "." op  |  "admin"
    patient   := "*"  |  id                 ("*" means every patient)
    id        := [A-Za-z0-9.-]{1,64}        (a FHIR resource id)
    op        := "read" | "ask"

For example ``patient/123.read patient/*.ask admin``: read patient 123's record, ask questions
about any patient, and administer the service. ``admin`` is not tied to patients and grants no
patient access by itself; ``read`` and ``ask`` are independent (neither implies the other).
A patient id may contain dots; the operation is whatever follows the last dot.

:func:`format_scopes` prints the canonical form (``patient/*`` grants first, then ids in sorted
order, ``read`` before ``ask``, ``admin`` last; grants already covered by a ``patient/*`` grant
for the same operation are dropped), so ``format_scopes(parse_scopes(s)) == s`` for a canonical
``s`` and ``parse_scopes(format_scopes(x)) == x`` for any normalised set ``x``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from clinqa.errors import ClinqaError

__all__ = [
    "OPERATIONS",
    "PATIENT_OPERATIONS",
    "KeyRecord",
    "KeyStore",
    "Scope",
    "format_scopes",
    "parse_scopes",
    "scopes_for",
]

Operation = Literal["read", "ask", "admin"]
OPERATIONS: tuple[str, ...] = ("read", "ask", "admin")
PATIENT_OPERATIONS: tuple[str, ...] = ("read", "ask")
ALL_PATIENTS = "*"

_PATIENT_ID = re.compile(r"[A-Za-z0-9.\-]{1,64}")
KEY_PREFIX = "cq"
_KEY_ID_BYTES = 6  # 12 hex characters
_SECRET_BYTES = 32  # token_urlsafe(32) -> 43 characters
_PLAIN_KEY = re.compile(r"cq_([0-9a-f]{12})_([A-Za-z0-9_\-]{43})")

# scrypt cost. The secret is 256 random bits, so the KDF is not what stops guessing; it only keeps
# a stolen store from being a cheap oracle. ~35 ms per check on a laptop-class CPU.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
_PBKDF2_ITERATIONS = 200_000  # fallback only, when OpenSSL lacks scrypt
_SALT_BYTES = 16


# --------------------------------------------------------------------------- scopes


class Scope(BaseModel):
    """One grant: an operation, and for ``read``/``ask`` the patient it applies to (``"*"`` = all)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operation: Operation
    patient: Optional[str] = None

    @model_validator(mode="after")
    def _patient_matches_operation(self) -> Scope:
        if self.operation == "admin":
            if self.patient is not None:
                raise ValueError("the admin scope is not tied to a patient; write it as 'admin'")
        else:
            if self.patient is None:
                raise ValueError(f"the {self.operation} scope needs a patient id or '*'")
            if self.patient != ALL_PATIENTS and not _PATIENT_ID.fullmatch(self.patient):
                raise ValueError(f"patient id {self.patient!r} is not a FHIR id (1-64 of A-Z a-z 0-9 . -) or '*'")
        return self

    def __str__(self) -> str:
        if self.operation == "admin":
            return "admin"
        return f"patient/{self.patient}.{self.operation}"

    @classmethod
    def parse(cls, token: str) -> Scope:
        """Parse one scope token (``patient/<id|*>.<read|ask>`` or ``admin``); ClinqaError if malformed."""
        hint = "expected 'patient/<id>.read', 'patient/<id>.ask' (id may be '*') or 'admin'"
        if token == "admin":
            return cls(operation="admin")
        if not token.startswith("patient/") or "." not in token:
            raise ClinqaError(f"bad scope {token!r}: {hint}")
        patient, _, op = token[len("patient/") :].rpartition(".")
        if op not in PATIENT_OPERATIONS:
            raise ClinqaError(f"bad scope {token!r}: unknown operation {op!r}; {hint}")
        if patient != ALL_PATIENTS and not _PATIENT_ID.fullmatch(patient):
            raise ClinqaError(f"bad scope {token!r}: patient id {patient!r} must be '*' or 1-64 of A-Z a-z 0-9 . -")
        return cls(operation=op, patient=patient)

    def _sort_key(self) -> tuple:
        if self.operation == "admin":
            return (2, "", 0)
        return (0 if self.patient == ALL_PATIENTS else 1, self.patient, OPERATIONS.index(self.operation))


def _normalise(scopes: Iterable[Scope]) -> frozenset[Scope]:
    """Drop grants that a ``patient/*`` grant for the same operation already covers."""
    scopes = frozenset(scopes)
    wildcard_ops = {s.operation for s in scopes if s.patient == ALL_PATIENTS}
    return frozenset(s for s in scopes if s.patient in (None, ALL_PATIENTS) or s.operation not in wildcard_ops)


def parse_scopes(text: str) -> frozenset[Scope]:
    """Parse a whitespace-separated scope string (see the module docstring for the grammar)."""
    if not isinstance(text, str):
        raise ClinqaError(f"scopes must be a string like 'patient/123.read admin', got {type(text).__name__}")
    return _normalise(Scope.parse(token) for token in text.split())


def format_scopes(scopes: Iterable[Scope]) -> str:
    """The canonical text form of a set of scopes (inverse of :func:`parse_scopes`)."""
    return " ".join(str(s) for s in sorted(_normalise(scopes), key=Scope._sort_key))


def scopes_for(patients: str | Iterable[str], operations: str | Iterable[str]) -> frozenset[Scope]:
    """Every (patient, operation) grant: ``read``/``ask`` for each patient, ``admin`` once.

    ``patients`` is ``"*"`` (all patients), one id, or a list of ids (``"*"`` in the list means all).
    """
    pats = [patients] if isinstance(patients, str) else list(patients)
    ops = [operations] if isinstance(operations, str) else list(operations)
    for op in ops:
        if op not in OPERATIONS:
            raise ClinqaError(f"unknown operation {op!r}: choose from {', '.join(OPERATIONS)}")
    out: set[Scope] = set()
    if "admin" in ops:
        out.add(Scope(operation="admin"))
    patient_ops = [op for op in ops if op in PATIENT_OPERATIONS]
    if ALL_PATIENTS in pats and any(p != ALL_PATIENTS for p in pats):
        others = ", ".join(repr(p) for p in pats if p != ALL_PATIENTS)
        raise ClinqaError(
            f"patients '*' (all patients) and {others} given together: '*' already covers every "
            "patient; give '*' alone or only the patient ids"
        )
    if patient_ops and not pats:
        raise ClinqaError(
            f"operations {', '.join(patient_ops)} need patients: give patient ids or '*' for all patients"
        )
    for p in pats:
        if not isinstance(p, str) or not (p == ALL_PATIENTS or _PATIENT_ID.fullmatch(p)):
            raise ClinqaError(f"patient id {p!r} must be '*' or 1-64 of A-Z a-z 0-9 . -")
        for op in patient_ops:
            out.add(Scope(operation=op, patient=p))
    return _normalise(out)


# --------------------------------------------------------------------------- key records


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _as_utc(when: datetime, what: str) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ClinqaError(f"{what} must be a timezone-aware datetime (e.g. datetime.now(timezone.utc)), got {when}")
    return when.astimezone(timezone.utc)


def _iso(when: Optional[datetime]) -> Optional[str]:
    return None if when is None else when.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _from_iso(text: Optional[str]) -> Optional[datetime]:
    return None if text is None else datetime.fromisoformat(text)


class KeyRecord(BaseModel):
    """What the store knows about a key, without its secret or secret hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: str
    name: str
    scopes: frozenset[Scope]
    created: datetime
    expires: Optional[datetime] = None
    revoked: Optional[datetime] = None

    @field_validator("scopes")
    @classmethod
    def _normalised(cls, v: frozenset[Scope]) -> frozenset[Scope]:
        return _normalise(v)

    @property
    def scope_text(self) -> str:
        """The canonical scope string, e.g. ``patient/*.ask patient/123.read admin``."""
        return format_scopes(self.scopes)

    @property
    def operations(self) -> frozenset[str]:
        """Operations granted for at least one patient (or ``admin``)."""
        return frozenset(s.operation for s in self.scopes)

    def status(self, now: Optional[datetime] = None) -> Literal["active", "revoked", "expired"]:
        if self.revoked is not None:
            return "revoked"
        now = _utcnow() if now is None else _as_utc(now, "now")
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    def is_active(self, now: Optional[datetime] = None) -> bool:
        return self.status(now) == "active"

    def allows(self, operation: str, patient_id: Optional[str] = None) -> bool:
        """Whether this key grants ``operation`` (on ``patient_id`` for read/ask).

        ``admin`` ignores ``patient_id``. For ``read``/``ask`` without a ``patient_id`` the answer
        is True only for a ``patient/*`` grant (fail closed: a forgotten id never widens access);
        to serve a subset of patients, filter with :meth:`visible_patients`.
        This checks scopes only; :meth:`KeyStore.authenticate` already refused revoked/expired keys.
        """
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}: choose from {', '.join(OPERATIONS)}")
        if operation == "admin":
            return Scope(operation="admin") in self.scopes
        if Scope(operation=operation, patient=ALL_PATIENTS) in self.scopes:
            return True
        if patient_id is None or patient_id == ALL_PATIENTS:
            return False
        return any(s.operation == operation and s.patient == str(patient_id) for s in self.scopes)

    def visible_patients(self, all_ids: Iterable[str], operation: Optional[str] = None) -> list[str]:
        """The ids from ``all_ids`` (order kept) this key may use ``operation`` on.

        With ``operation=None`` a patient is visible if any patient operation (read or ask) is granted.
        """
        if operation is not None and operation not in PATIENT_OPERATIONS:
            raise ValueError(
                f"visible_patients takes a patient operation ({', '.join(PATIENT_OPERATIONS)}), got {operation!r}"
            )
        ops = PATIENT_OPERATIONS if operation is None else (operation,)
        return [pid for pid in all_ids if any(self.allows(op, pid) for op in ops)]


# --------------------------------------------------------------------------- secret hashing


def _hash_secret(secret: str, salt: bytes) -> str:
    if hasattr(hashlib, "scrypt"):
        digest = hashlib.scrypt(
            secret.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, maxmem=_SCRYPT_MAXMEM, dklen=32
        )
        return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, _PBKDF2_ITERATIONS)
    return f"pbkdf2_sha256${_PBKDF2_ITERATIONS}${salt.hex()}${digest.hex()}"


def _check_secret(secret: str, stored: str) -> bool:
    """Recompute the stored hash's KDF (with its own parameters) and compare in constant time."""
    parts = stored.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            salt, expected = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
            got = hashlib.scrypt(
                secret.encode(), salt=salt, n=n, r=r, p=p, maxmem=max(_SCRYPT_MAXMEM, 256 * n * r), dklen=len(expected)
            )
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            iterations, salt, expected = int(parts[1]), bytes.fromhex(parts[2]), bytes.fromhex(parts[3])
            got = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations, dklen=len(expected))
        else:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


# Used for unknown key ids so that "no such key" costs the same KDF work as "wrong secret".
_DUMMY_HASH = _hash_secret(secrets.token_urlsafe(_SECRET_BYTES), b"\0" * _SALT_BYTES)


def _split_key(plain_key: object) -> Optional[tuple[str, str]]:
    if not isinstance(plain_key, str):
        return None
    m = _PLAIN_KEY.fullmatch(plain_key.strip())
    return (m.group(1), m.group(2)) if m else None


# --------------------------------------------------------------------------- the store


def private_file(path: Path) -> None:
    """Create ``path`` (and its parent directories) readable by the owner only, if it does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created     TEXT NOT NULL,
    expires     TEXT,
    revoked     TEXT
);
"""


class KeyStore:
    """API keys in a SQLite file (created 0600). Safe to share between threads and processes:
    every call opens its own short connection."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True):
        """``create=False`` (listing, revoking) refuses a missing file instead of creating an empty store."""
        self.path = Path(path)
        self._verified: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._verified_lock = threading.Lock()
        if self.path.is_dir():
            raise ClinqaError(f"key store path {self.path} is a directory; give a file name such as keys.sqlite")
        if not create and not self.path.exists():
            raise ClinqaError(
                f"no key store at {self.path}: give --db (or CLINQA_KEYS_DB), or create a key first "
                "with `clinqa keys create`"
            )
        private_file(self.path)
        try:
            with closing(self._connect()) as db:
                db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ClinqaError(f"{self.path} is not a clinqa key store ({e}); choose another file") from e

    # Keys verified in this process: (key id, stored hash) -> sha256 of the secret. The scrypt check costs
    # tens of milliseconds by design, which capped the service at ~5 requests/s per core; a key that
    # passed it once is then checked against this digest (constant time). The row is still read on
    # every request, so revocation and expiry apply at once, and a re-hashed key misses the cache.
    _VERIFIED_MAX = 1024

    def _verified_before(self, key_id: str, stored: str, secret: str) -> bool:
        with self._verified_lock:
            digest = self._verified.get((key_id, stored))
            if digest is None:
                return False
            self._verified.move_to_end((key_id, stored))
        return hmac.compare_digest(digest, hashlib.sha256(secret.encode()).digest())

    def _remember(self, key_id: str, stored: str, secret: str) -> None:
        with self._verified_lock:
            self._verified[(key_id, stored)] = hashlib.sha256(secret.encode()).digest()
            while len(self._verified) > self._VERIFIED_MAX:
                self._verified.popitem(last=False)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    @staticmethod
    def _record(row: sqlite3.Row) -> KeyRecord:
        return KeyRecord(
            key_id=row["key_id"],
            name=row["name"],
            scopes=parse_scopes(row["scopes"]),
            created=_from_iso(row["created"]),
            expires=_from_iso(row["expires"]),
            revoked=_from_iso(row["revoked"]),
        )

    def create(
        self,
        name: str,
        patients: str | Iterable[str] = (),
        operations: str | Iterable[str] = (),
        expires: datetime | timedelta | None = None,
        *,
        scopes: str | Iterable[Scope] | None = None,
    ) -> tuple[KeyRecord, str]:
        """Make a key; returns its record and the plain key, which is shown this once and never stored.

        Grants are every (patient, operation) pair from ``patients`` x ``operations`` (see
        :func:`scopes_for`), plus ``scopes`` (a scope string or Scope objects) if given.
        ``expires`` is an aware datetime or a timedelta from now.
        """
        if not isinstance(name, str) or not name.strip():
            raise ClinqaError("a key needs a non-empty name (who or what uses it, e.g. 'ward-7 tablet')")
        name = name.strip()
        grants = set(scopes_for(patients, operations))
        if scopes is not None:
            if isinstance(scopes, str):
                grants |= parse_scopes(scopes)
            else:
                grants |= {s if isinstance(s, Scope) else Scope.parse(s) for s in scopes}
        grants = _normalise(grants)
        if not grants:
            raise ClinqaError("a key needs at least one scope: give operations (read, ask, admin) and patients")
        now = _utcnow()
        if isinstance(expires, timedelta):
            expires = now + expires
        elif expires is not None:
            expires = _as_utc(expires, "expires")
        if expires is not None and expires <= now:
            raise ClinqaError(f"expiry {_iso(expires)} is in the past; give a later time or none")

        secret = secrets.token_urlsafe(_SECRET_BYTES)
        secret_hash = _hash_secret(secret, secrets.token_bytes(_SALT_BYTES))
        with closing(self._connect()) as db:
            for _ in range(5):  # a 48-bit id collision is astronomically rare; retry anyway
                key_id = secrets.token_hex(_KEY_ID_BYTES)
                try:
                    db.execute(
                        "INSERT INTO api_keys (key_id, name, scopes, secret_hash, created, expires, revoked)"
                        " VALUES (?, ?, ?, ?, ?, ?, NULL)",
                        (key_id, name, format_scopes(grants), secret_hash, _iso(now), _iso(expires)),
                    )
                    break
                except sqlite3.IntegrityError:
                    continue
            else:  # pragma: no cover
                raise ClinqaError("could not allocate a unique key id; try again")
        record = KeyRecord(key_id=key_id, name=name, scopes=grants, created=now, expires=expires)
        return record, f"{KEY_PREFIX}_{key_id}_{secret}"

    def get(self, key_id: str) -> Optional[KeyRecord]:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else self._record(row)

    def list(self) -> list[KeyRecord]:
        """Every key (active, revoked and expired), oldest first. No secrets."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM api_keys ORDER BY created, key_id").fetchall()
        return [self._record(r) for r in rows]

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key for good (idempotent: revoking twice keeps the first time)."""
        with closing(self._connect()) as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked = COALESCE(revoked, ?) WHERE key_id = ?", (_iso(_utcnow()), key_id)
            )
            if cur.rowcount == 0:
                raise ClinqaError(f"no API key with id {key_id!r}; `clinqa keys list` shows the key ids")
            row = db.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return self._record(row)

    def authenticate(self, plain_key: object, *, now: Optional[datetime] = None) -> Optional[KeyRecord]:
        """The record for a valid, active key; None for malformed, unknown, wrong, revoked or expired keys.

        Unknown ids cost the same KDF work as a wrong secret, and digests are compared with
        hmac.compare_digest, so timing reveals neither whether an id exists nor how much matched.
        """
        parts = _split_key(plain_key)
        if parts is None:
            return None
        key_id, secret = parts
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        ok = row is not None and self._verified_before(key_id, row["secret_hash"], secret)
        if not ok:  # a wrong secret always pays the full KDF, so timing still tells nothing about the id
            ok = _check_secret(secret, row["secret_hash"] if row is not None else _DUMMY_HASH)
            if ok and row is not None:
                self._remember(key_id, row["secret_hash"], secret)
        if row is None or not ok:
            return None
        record = self._record(row)
        return record if record.is_active(now) else None
