import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from clinqa.errors import ClinqaError
from clinqa.serve.auth import KeyRecord, KeyStore, Scope, format_scopes, parse_scopes, scopes_for


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys.sqlite")


def record(scope_text: str) -> KeyRecord:
    return KeyRecord(
        key_id="0123456789ab", name="t", scopes=parse_scopes(scope_text), created=datetime.now(timezone.utc)
    )


# ---------------------------------------------------------------- scopes


@pytest.mark.parametrize(
    "text",
    [
        "patient/123.read",
        "patient/*.ask",
        "admin",
        "patient/*.ask patient/123.read admin",
        "patient/*.read patient/*.ask",
        "patient/a.b-c.read patient/a.b-c.ask patient/z9.read",
        "",
    ],
)
def test_canonical_scope_text_round_trips(text):
    scopes = parse_scopes(text)
    assert format_scopes(scopes) == text
    assert parse_scopes(format_scopes(scopes)) == scopes


def test_scope_parsing_normalises_order_whitespace_and_redundancy():
    scopes = parse_scopes("  admin\tpatient/123.read   patient/*.ask patient/9.ask admin\n")
    assert scopes == {
        Scope(operation="admin"),
        Scope(operation="read", patient="123"),
        Scope(operation="ask", patient="*"),
    }
    assert format_scopes(scopes) == "patient/*.ask patient/123.read admin"


def test_patient_id_with_dots_splits_on_last_dot():
    (scope,) = parse_scopes("patient/a.b.c.ask")
    assert scope == Scope(operation="ask", patient="a.b.c")


@pytest.mark.parametrize(
    "bad",
    [
        "patient/123",
        "patient/123.write",
        "patient/123.admin",
        "patient/.read",
        "patient/a b.read",
        "Patient/123.read",
        "user/123.read",
        "admin.read",
        "patient/" + "x" * 65 + ".read",
        "patient/12_3.read",
        "read",
    ],
)
def test_malformed_scopes_raise_a_clinqa_error_naming_the_token(bad):
    with pytest.raises(ClinqaError, match="bad scope"):
        parse_scopes(f"admin {bad}")


def test_scopes_for_is_the_product_with_admin_once():
    assert format_scopes(scopes_for(["1", "2"], ["read", "ask", "admin"])) == (
        "patient/1.read patient/1.ask patient/2.read patient/2.ask admin"
    )
    assert format_scopes(scopes_for("*", ["ask"])) == "patient/*.ask"
    with pytest.raises(ClinqaError, match=r"'\*' already covers every patient"):  # was: '7' silently dropped
        scopes_for(["7", "*"], "read")
    assert format_scopes(scopes_for([], ["admin"])) == "admin"
    with pytest.raises(ClinqaError, match="unknown operation"):
        scopes_for("*", ["write"])
    with pytest.raises(ClinqaError, match="need patients"):
        scopes_for([], ["read"])
    with pytest.raises(ClinqaError, match="patient id"):
        scopes_for(["a/b"], ["read"])


# ---------------------------------------------------------------- allows / visible_patients

ALLOWS_MATRIX = [
    # scopes, operation, patient, expected
    ("patient/123.read", "read", "123", True),
    ("patient/123.read", "read", "124", False),
    ("patient/123.read", "ask", "123", False),
    ("patient/123.read", "admin", None, False),
    ("patient/123.read", "read", None, False),  # no patient given: only a patient/* grant answers yes
    ("patient/123.read", "read", "*", False),
    ("patient/*.ask", "ask", "anyone", True),
    ("patient/*.ask", "ask", None, True),
    ("patient/*.ask", "read", "anyone", False),
    ("patient/*.ask patient/123.read", "read", "123", True),
    ("patient/*.ask patient/123.read", "read", "5", False),
    ("admin", "admin", None, True),
    ("admin", "admin", "123", True),  # admin is not patient-scoped
    ("admin", "read", "123", False),  # and grants no patient access
    ("admin", "ask", None, False),
    ("patient/*.read patient/*.ask", "admin", None, False),
    ("", "read", "123", False),
]


@pytest.mark.parametrize("scopes, operation, patient, expected", ALLOWS_MATRIX)
def test_allows_matrix(scopes, operation, patient, expected):
    assert record(scopes).allows(operation, patient) is expected


def test_allows_rejects_unknown_operations():
    with pytest.raises(ValueError, match="unknown operation"):
        record("patient/*.read").allows("write", "1")


def test_visible_patients():
    ids = ["3", "1", "2", "4"]
    assert record("patient/*.read").visible_patients(ids) == ids
    assert record("patient/1.read patient/2.ask patient/9.read").visible_patients(ids) == ["1", "2"]
    assert record("patient/1.read patient/2.ask").visible_patients(ids, "ask") == ["2"]
    assert record("patient/1.read patient/*.ask").visible_patients(ids, "read") == ["1"]
    assert record("admin").visible_patients(ids) == []
    with pytest.raises(ValueError):
        record("admin").visible_patients(ids, "admin")


# ---------------------------------------------------------------- the store


def test_create_authenticate_list(store: KeyStore):
    rec, key = store.create("ward 7 tablet", ["123", "456"], ["read", "ask"])
    assert key.startswith(f"cq_{rec.key_id}_")
    assert len(rec.key_id) == 12 and int(rec.key_id, 16) >= 0
    assert rec.scope_text == "patient/123.read patient/123.ask patient/456.read patient/456.ask"
    got = store.authenticate(key)
    assert got == rec
    assert got.allows("ask", "456") and not got.allows("read", "789") and not got.allows("admin")

    rec2, key2 = store.create("ops", operations=["admin"], scopes="patient/*.ask")
    assert key2 != key
    assert store.authenticate(key2).scope_text == "patient/*.ask admin"
    rec3, _ = store.create("mixed", "7", "read", scopes=["patient/8.ask", Scope(operation="admin")])
    assert rec3.scope_text == "patient/7.read patient/8.ask admin"
    assert [r.key_id for r in store.list()] == [rec.key_id, rec2.key_id, rec3.key_id]
    # the same file, opened again (e.g. by another worker process), knows the keys
    assert KeyStore(store.path).authenticate(key) == rec


def test_listing_has_no_secrets(store: KeyStore):
    rec, key = store.create("x", "*", "read")
    secret = key.split("_", 2)[2]
    for r in store.list():
        dumped = r.model_dump_json()
        assert secret not in dumped and "scrypt" not in dumped and "hash" not in dumped


def test_store_file_never_contains_the_plain_key(store: KeyStore):
    keys = [store.create(f"k{i}", "*", ["read"])[1] for i in range(3)]
    files = [p for p in store.path.parent.iterdir() if p.name.startswith(store.path.name)]
    blob = b"".join(p.read_bytes() for p in files)
    assert blob  # the store is really there
    for key in keys:
        key_id, secret = key[3:15], key[16:]
        assert key_id.encode() in blob  # the id is public and stored
        assert secret.encode() not in blob
        assert key.encode() not in blob


def test_store_file_is_private(tmp_path: Path):
    old = os.umask(0o000)  # even with a permissive umask
    try:
        store = KeyStore(tmp_path / "sub" / "keys.sqlite")
    finally:
        os.umask(old)
    store.create("x", "*", "read")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_wrong_malformed_and_unknown_keys_are_refused(store: KeyStore):
    rec, key = store.create("x", "*", ["read"])
    key_id, secret = key[3:15], key[16:]
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    other_id = "f" * 12 if key_id != "f" * 12 else "e" * 12
    for bad in [
        f"cq_{key_id}_{flipped}",  # wrong secret
        f"cq_{other_id}_{secret}",  # unknown id
        key[:-1],  # truncated
        key + "x",  # too long
        f"xx_{key_id}_{secret}",  # wrong prefix
        f"cq_{key_id.upper()}_{secret}",  # id must be lowercase hex
        f"cq_{key_id}{secret}",  # no separator
        "cq__",
        "",
        "Bearer " + key,
        None,
        123,
        key.encode(),
    ]:
        assert store.authenticate(bad) is None, bad
    assert store.authenticate(f"  {key}\n") == rec  # surrounding whitespace (a pasted header) is fine


def test_revoke(store: KeyStore):
    rec, key = store.create("x", "*", "read")
    other, other_key = store.create("y", "*", "read")
    revoked = store.revoke(rec.key_id)
    assert revoked.revoked is not None and revoked.status() == "revoked"
    assert store.authenticate(key) is None
    assert store.authenticate(other_key) == other  # only that key
    assert store.revoke(rec.key_id).revoked == revoked.revoked  # idempotent
    assert {r.key_id: r.status() for r in store.list()} == {rec.key_id: "revoked", other.key_id: "active"}
    with pytest.raises(ClinqaError, match="no API key"):
        store.revoke("000000000000")


def test_expiry(store: KeyStore):
    now = datetime.now(timezone.utc)
    rec, key = store.create("temp", ["1"], ["ask"], expires=timedelta(hours=1))
    assert rec.expires is not None and abs((rec.expires - now) - timedelta(hours=1)) < timedelta(minutes=1)
    assert store.authenticate(key) == rec
    assert store.authenticate(key, now=now + timedelta(minutes=59)) == rec
    assert store.authenticate(key, now=now + timedelta(hours=2)) is None
    assert rec.status(now + timedelta(hours=2)) == "expired"

    at = now + timedelta(days=1)
    rec2, key2 = store.create("until tomorrow", "*", "read", expires=at.astimezone(timezone(timedelta(hours=-5))))
    assert rec2.expires == at and store.get(rec2.key_id).expires == at
    assert store.authenticate(key2, now=at) is None  # expiry is exclusive


def test_create_validation(store: KeyStore):
    with pytest.raises(ClinqaError, match="name"):
        store.create("  ", "*", "read")
    with pytest.raises(ClinqaError, match="at least one scope"):
        store.create("x", [], [])
    with pytest.raises(ClinqaError, match="unknown operation"):
        store.create("x", "*", ["write"])
    with pytest.raises(ClinqaError, match="bad scope"):
        store.create("x", scopes="patient/1.delete")
    with pytest.raises(ClinqaError, match="past"):
        store.create("x", "*", "read", expires=timedelta(seconds=-1))
    with pytest.raises(ClinqaError, match="timezone-aware"):
        store.create("x", "*", "read", expires=datetime(2999, 1, 1))
    assert store.list() == []


def test_not_a_key_store(tmp_path: Path):
    bad = tmp_path / "junk.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ClinqaError, match="not a clinqa key store"):
        KeyStore(bad)
    with pytest.raises(ClinqaError, match="directory"):
        KeyStore(tmp_path)


def test_a_verified_key_skips_the_kdf_but_revocation_and_wrong_secrets_still_apply(tmp_path, monkeypatch):
    """After one scrypt check a key is verified against an in-memory digest; the row is still read on
    every call (revocation applies at once) and a wrong secret still pays the full KDF."""
    from clinqa.serve import auth as auth_module

    store = auth_module.KeyStore(tmp_path / "keys.sqlite")
    record, plain = store.create("tablet", "p1", "read")
    calls = []
    real = auth_module._check_secret
    monkeypatch.setattr(auth_module, "_check_secret", lambda s, h: calls.append(1) or real(s, h))
    assert store.authenticate(plain).key_id == record.key_id and len(calls) == 1
    assert store.authenticate(plain).key_id == record.key_id and len(calls) == 1  # cached: no second KDF
    wrong = plain[:-4] + ("AAAA" if not plain.endswith("AAAA") else "BBBB")
    assert store.authenticate(wrong) is None and len(calls) == 2  # a wrong secret pays the KDF
    store.revoke(record.key_id)
    assert store.authenticate(plain) is None  # revocation applies at once, cache or not
