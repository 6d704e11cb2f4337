"""Keys, audit and answers that cannot pass silently (issue 16): scope mixes and zero-day keys are
refused, `audit verify` is read-only and refuses what is not an audit log, anchors catch a cut-off
tail, and an answer citing nothing of the patient's record is flagged unsupported."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from clinqa.errors import ClinqaError
from clinqa.models.base import ModelInfo
from clinqa.records.fhir import load_records
from clinqa.records.synth import synthesize_patients, write_patients
from clinqa.serve.app import create_app
from clinqa.serve.audit import AuditLog, default_anchor_path, read_anchors, verify_file
from clinqa.serve.auth import KeyStore, scopes_for
from clinqa.serve.config import ServeConfig


def clinqa(*args):
    return subprocess.run(
        [sys.executable, "-m", "clinqa.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def error_line(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr.strip().splitlines()[-1]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- keys


def test_all_patients_mixed_with_ids_is_refused():
    with pytest.raises(ClinqaError, match=r"patients '\*' \(all patients\) and 'abc' given together"):
        scopes_for(["*", "abc"], ["read"])
    assert {str(s) for s in scopes_for(["*"], ["read"])} == {"patient/*.read"}


def test_keys_create_refuses_zero_days_and_star_mix(tmp_path):
    db = tmp_path / "keys.db"
    assert "--days 0" in error_line(clinqa("keys", "create", "w", "--patients", "p1", "--days", "0", "--db", str(db)))
    assert "'abc'" in error_line(clinqa("keys", "create", "w", "--patients", "*,abc", "--db", str(db)))
    assert not KeyStore(db).list()  # nothing was created by either refusal
    r = clinqa("keys", "create", "w", "--patients", "p1", "--days", "1", "--db", str(db))
    assert r.returncode == 0, r.stderr
    (rec,) = KeyStore(db).list()
    assert rec.expires is not None and 86_000 < (rec.expires - rec.created).total_seconds() <= 86_400


def test_keys_list_and_revoke_on_a_missing_store_create_nothing(tmp_path):
    db = tmp_path / "nope" / "keys.db"
    assert "no key store at" in error_line(clinqa("keys", "list", "--db", str(db)))
    assert "no key store at" in error_line(clinqa("keys", "revoke", "abc", "--db", str(db)))
    assert not (tmp_path / "nope").exists()


# ------------------------------------------------------------------------------------------- audit


def test_verify_refuses_the_key_store_and_leaves_it_untouched(tmp_path):
    db = tmp_path / "keys.db"
    KeyStore(db).create("w", patients="p1", operations="read")
    before = digest(db)
    last = error_line(clinqa("audit", "verify", "--db", str(db)))
    assert "is not a clinqa audit log: it has no audit table (tables: api_keys)" in last
    assert digest(db) == before and sorted(p.name for p in tmp_path.iterdir()) == ["keys.db"]
    with sqlite3.connect(db) as con:
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["api_keys"]


def test_verify_refuses_a_log_whose_table_was_dropped_and_never_creates_a_file(tmp_path):
    db = tmp_path / "audit.db"
    with AuditLog(db) as log:
        log.append("ask", key_id="k")
    with sqlite3.connect(db) as con:
        con.execute("DROP TABLE audit")
    with pytest.raises(ClinqaError, match="has no audit table"):
        verify_file(db)
    assert "no audit log at" in error_line(clinqa("audit", "verify", "--db", str(tmp_path / "missing.db")))
    assert not (tmp_path / "missing.db").exists()
    (tmp_path / "junk.db").write_text("not a database at all " * 100)
    assert "is not a clinqa audit log" in error_line(clinqa("audit", "verify", "--db", str(tmp_path / "junk.db")))


def _cut_tail(db, keep: int) -> None:
    """What an attacker with write access does: drop the triggers, delete the last rows, put the triggers back."""
    with sqlite3.connect(db) as con:
        sql = [r[0] for r in con.execute("SELECT sql FROM sqlite_master WHERE type='trigger'")]
        con.execute("DROP TRIGGER audit_no_delete")
        con.execute("DROP TRIGGER audit_no_update")
        con.execute("DELETE FROM audit WHERE seq > ?", (keep,))
        for s in sql:
            con.execute(s)


def test_anchors_catch_a_cut_off_tail_the_chain_alone_cannot(tmp_path):
    db, anchor = tmp_path / "audit.db", tmp_path / "audit.db.anchor"
    assert default_anchor_path(db) == anchor
    with AuditLog(db, anchor=anchor, anchor_every=2) as log:
        log.write_anchor("start")
        heads = [log.append("ask", key_id="k", outcome="ok") for _ in range(5)]
        log.write_anchor("shutdown")
    lines = [json.loads(x) for x in anchor.read_text().splitlines()]
    assert [(x["seq"], x["event"]) for x in lines] == [(0, "start"), (2, "every"), (4, "every"), (5, "shutdown")]
    assert read_anchors(anchor)[-1] == (5, heads[-1].row_hash)
    assert verify_file(db, read_anchors(anchor)).ok
    _cut_tail(db, keep=3)
    assert verify_file(db).ok  # the hash chain alone sees an honest 3-row log
    res = verify_file(db, read_anchors(anchor))
    assert not res.ok and "the log ends at row 3 but an anchor names row 5" in res.message
    r = clinqa("audit", "verify", "--db", str(db))  # the anchor beside the log is used by default
    assert r.returncode == 1 and "TAMPERED" in r.stderr and "cut off the end" in r.stderr
    r = clinqa("audit", "verify", "--db", str(db), "--anchor", str(tmp_path / "none"))
    assert "no such anchor file" in error_line(r)


def test_an_edited_anchor_file_is_a_one_line_error(tmp_path):
    db, anchor = tmp_path / "audit.db", tmp_path / "a.jsonl"
    with AuditLog(db, anchor=anchor) as log:
        log.append("ask")
        log.write_anchor()
    anchor.write_text(anchor.read_text() + "garbage\n")
    assert f"{anchor}:2: not an anchor line" in error_line(
        clinqa("audit", "verify", "--db", str(db), "--anchor", str(anchor))
    )


# ------------------------------------------------------------------------------------------- the service


class NoCitations:
    """A model that answers confidently about the wrong patient and cites nothing."""

    def __init__(self):
        self.info = ModelInfo(spec="nocite", backend="fake", name="nocite")

    def generate(self, prompts, config=None):
        return ["The patient has type 2 diabetes and takes metformin." for _ in prompts]


@pytest.fixture(scope="module")
def one_patient(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    write_patients(root / "bundles", synthesize_patients(1, seed=3))
    return root, load_records(root / "bundles")


def test_service_anchors_at_start_and_shutdown_and_flags_unsupported_answers(one_patient, tmp_path):
    root, records = one_patient
    pid = records[0].patient_id
    keys = KeyStore(tmp_path / "keys.db")
    _, key = keys.create("all", scopes="patient/*.read patient/*.ask")
    config = ServeConfig(keys_db=tmp_path / "keys.db", audit_db=tmp_path / "audit.db")
    app = create_app(config, predictor=NoCitations(), records=records)
    with TestClient(app) as client:
        r = client.post(
            f"/api/patients/{pid}/ask",
            json={"question": "What conditions does Maria Garcia have?"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["citations"] == [] and body["supported"] is False
    events = [json.loads(x)["event"] for x in (tmp_path / "audit.db.anchor").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "shutdown"
    anchors = read_anchors(tmp_path / "audit.db.anchor")
    assert anchors[-1][0] == 1 and verify_file(tmp_path / "audit.db", anchors).ok


def test_page_shows_the_unsupported_warning():
    from importlib.resources import files

    static = files("clinqa.serve") / "static"
    html, js = (static / "index.html").read_text(), (static / "app.js").read_text()
    assert 'id="unsupported"' in html and "hidden" in html.split('id="unsupported"')[1].split(">")[0]
    assert '$("unsupported").hidden = body.supported !== false;' in js


def test_mcq_with_identical_options_is_a_422(one_patient, tmp_path):
    _, records = one_patient
    _, key = KeyStore(tmp_path / "keys.db").create("all", scopes="patient/*.read patient/*.ask")
    app = create_app(
        ServeConfig(keys_db=tmp_path / "keys.db", audit_db=tmp_path / "audit.db"),
        predictor=NoCitations(),
        records=records,
    )
    with TestClient(app) as client:
        r = client.post(
            "/api/mcq",
            json={"question": "Which?", "options": {k: "same" for k in "ABCD"}},
            headers={"Authorization": f"Bearer {key}"},
        )
    assert r.status_code == 422 and "options A and B have the same text 'same'" in r.text
