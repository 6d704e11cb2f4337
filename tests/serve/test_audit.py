import hashlib
import multiprocessing
import sqlite3
import stat
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from clinqa.errors import ClinqaError
from clinqa.serve.audit import GENESIS_HASH, MAX_DETAIL, AuditLog, hash_question

QUESTION = "Does the patient in bed 4 have a penicillin allergy?"


@pytest.fixture
def log(tmp_path: Path):
    with AuditLog(tmp_path / "audit.sqlite") as log:
        yield log


def fill(log: AuditLog, n: int = 5) -> None:
    for i in range(n):
        log.append(
            "ask",
            key_id="0123456789ab",
            patient_id=f"p{i % 2}",
            question=f"{QUESTION} #{i}",
            resource_ids=[f"Observation/{i}", "AllergyIntolerance/7"],
            outcome="ok" if i % 3 else "forbidden",
            detail=f"entry {i}",
        )


def raw(log: AuditLog) -> sqlite3.Connection:
    """What an attacker with write access to the file can do: plain SQL, triggers dropped."""
    db = sqlite3.connect(log.path, isolation_level=None)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("DROP TRIGGER audit_no_delete")
    return db


def restore_triggers(db: sqlite3.Connection) -> None:
    """A careful attacker puts the triggers back, so only the hash chain can give them away."""
    db.execute("CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'x'); END")
    db.execute("CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'x'); END")
    db.close()


def test_hash_question():
    assert hash_question(QUESTION) == hashlib.sha256(QUESTION.encode()).hexdigest()
    assert hash_question("é") == hashlib.sha256("é".encode()).hexdigest()
    assert hash_question("a ") != hash_question("a")  # exactly as given


def test_append_and_verify(log: AuditLog):
    assert log.verify().ok and log.verify().n == 0 and log.head() == (0, GENESIS_HASH)
    e1 = log.append("ask", key_id="k1", patient_id="123", question=QUESTION, resource_ids=["Observation/9"])
    e2 = log.append("read", key_id="k1", patient_id="123", outcome="not_found", detail="no such Observation")
    assert (e1.seq, e2.seq) == (1, 2)
    assert e1.prev_hash == GENESIS_HASH and e2.prev_hash == e1.row_hash
    assert e1.question_hash == hash_question(QUESTION) and e2.question_hash is None
    assert e1.compute_hash() == e1.row_hash
    assert datetime.fromisoformat(e1.time).tzinfo == timezone.utc
    assert log.entries() == [e1, e2]
    assert log.head() == (2, e2.row_hash) and len(log) == 2
    result = log.verify()
    assert result and result.ok and result.n == 2 and result.first_bad_seq is None
    # reopening continues the same chain
    with AuditLog(log.path) as again:
        e3 = again.append("admin.key_create", key_id="k0", detail="created key k1")
    assert e3.seq == 3 and e3.prev_hash == e2.row_hash and log.verify().n == 3


def test_question_text_is_never_stored(log: AuditLog):
    secret_question = "Is patient 4711 HIV positive? unique-marker-qz81"
    log.append("ask", patient_id="4711", question=secret_question)
    files = [p for p in log.path.parent.iterdir() if p.name.startswith(log.path.name)]
    blob = b"".join(p.read_bytes() for p in files)
    assert b"unique-marker-qz81" not in blob
    assert hash_question(secret_question).encode() in blob


def test_file_is_private_and_wal(log: AuditLog):
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    db = sqlite3.connect(log.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_append_validation(log: AuditLog):
    with pytest.raises(ValueError, match="not both"):
        log.append("ask", question="q", question_hash=hash_question("q"))
    with pytest.raises(ValueError, match="sha256"):
        log.append("ask", question_hash="not-a-hash")
    with pytest.raises(ValueError, match="action"):
        log.append("Ask the model")
    with pytest.raises(ValueError, match="outcome"):
        log.append("ask", outcome="it went fine")
    with pytest.raises(ValueError, match="patient_id"):
        log.append("ask", patient_id="")
    long = log.append("ask", detail="x" * 1000, question_hash=hash_question("q"))
    assert len(long.detail) == MAX_DETAIL and long.question_hash == hash_question("q")
    assert len(log) == 1 and log.verify().ok


def test_entries_filters(log: AuditLog):
    fill(log, 6)
    log.append("read", key_id="other", patient_id="p0", outcome="ok")
    assert [e.seq for e in log.entries(patient_id="p0")] == [1, 3, 5, 7]
    assert [e.seq for e in log.entries(key_id="other")] == [7]
    assert [e.seq for e in log.entries(action="ask", outcome="forbidden")] == [1, 4]
    assert [e.seq for e in log.entries(limit=2)] == [1, 2]
    everything = log.entries()
    assert log.entries(since=everything[3].time) == everything[3:]
    assert log.entries(until=datetime.fromisoformat(everything[3].time)) == everything[:3]
    assert log.entries(since=datetime.now(timezone.utc) + timedelta(seconds=5)) == []
    assert everything[0].resource_ids == ["Observation/0", "AllergyIntolerance/7"]
    with pytest.raises(ClinqaError, match="timezone-aware"):
        log.entries(since=datetime(2020, 1, 1))


def test_triggers_refuse_update_and_delete(log: AuditLog):
    fill(log, 3)
    db = sqlite3.connect(log.path, isolation_level=None)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET outcome = 'ok' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit WHERE seq = 3")
    assert len(log) == 3 and log.verify().ok


def test_dropped_triggers_alone_are_reported(log: AuditLog):
    fill(log, 3)
    raw(log).close()
    result = log.verify()
    assert not result.ok and result.first_bad_seq is None and "trigger" in result.message
    AuditLog(log.path)  # reopening must not quietly put the triggers back
    assert not log.verify().ok


def test_edited_row_is_detected(log: AuditLog):
    fill(log, 5)
    db = raw(log)
    db.execute("UPDATE audit SET outcome = 'error' WHERE seq = 3")
    restore_triggers(db)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 3 and "edited" in result.message


@pytest.mark.parametrize("column, value", [("detail", "nothing to see"), ("patient_id", "p9"), ("resource_ids", "[]")])
def test_any_edited_field_is_detected(log: AuditLog, column, value):
    fill(log, 4)
    db = raw(log)
    db.execute(f"UPDATE audit SET {column} = ? WHERE seq = 2", (value,))
    restore_triggers(db)
    assert log.verify().first_bad_seq == 2


def test_edited_row_with_recomputed_hash_breaks_the_next_link(log: AuditLog):
    fill(log, 5)
    entry = log.entries()[2]
    forged = entry.model_copy(update={"outcome": "ok", "detail": "forged"})
    forged = forged.model_copy(update={"row_hash": forged.compute_hash()})
    db = raw(log)
    db.execute(
        "UPDATE audit SET outcome = ?, detail = ?, row_hash = ? WHERE seq = 3",
        (forged.outcome, forged.detail, forged.row_hash),
    )
    restore_triggers(db)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 4 and "prev_hash" in result.message


def test_changed_hash_is_detected(log: AuditLog):
    fill(log, 5)
    db = raw(log)
    db.execute("UPDATE audit SET row_hash = ? WHERE seq = 5", ("f" * 64,))
    restore_triggers(db)
    assert log.verify().first_bad_seq == 5
    db = raw(log)
    db.execute("UPDATE audit SET prev_hash = ? WHERE seq = 2", ("e" * 64,))
    restore_triggers(db)
    assert log.verify().first_bad_seq == 2


def test_deleted_middle_row_is_detected(log: AuditLog):
    fill(log, 5)
    db = raw(log)
    db.execute("DELETE FROM audit WHERE seq = 3")
    restore_triggers(db)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 4 and "missing" in result.message


def test_deleted_and_renumbered_row_is_detected(log: AuditLog):
    fill(log, 5)
    db = raw(log)
    db.execute("DELETE FROM audit WHERE seq = 3")
    db.execute("UPDATE audit SET seq = seq - 1 WHERE seq > 3")
    restore_triggers(db)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 3


def test_reordered_rows_are_detected(log: AuditLog):
    fill(log, 5)
    db = raw(log)
    rows = {r[0]: r for r in db.execute("SELECT * FROM audit WHERE seq IN (2, 4)")}
    db.execute("DELETE FROM audit WHERE seq IN (2, 4)")
    placeholders = ", ".join("?" * len(rows[2]))
    db.execute(f"INSERT INTO audit VALUES ({placeholders})", (2, *rows[4][1:]))  # row 4's content at seq 2
    db.execute(f"INSERT INTO audit VALUES ({placeholders})", (4, *rows[2][1:]))
    restore_triggers(db)
    assert log.verify().first_bad_seq == 2


def test_swapped_seq_numbers_are_detected(log: AuditLog):
    fill(log, 5)
    db = raw(log)
    db.execute("UPDATE audit SET seq = -3 WHERE seq = 3")
    db.execute("UPDATE audit SET seq = 3 WHERE seq = 4")
    db.execute("UPDATE audit SET seq = 4 WHERE seq = -3")
    restore_triggers(db)
    assert log.verify().first_bad_seq == 3


def test_anchor_catches_a_cut_tail(log: AuditLog):
    fill(log, 5)
    anchor = log.head()
    assert log.verify(anchor).ok
    log.append("ask")
    assert log.verify(anchor).ok  # appending after the anchor is fine
    db = raw(log)
    db.execute("DELETE FROM audit WHERE seq >= 5")
    restore_triggers(db)
    assert log.verify().ok  # undetectable by the chain alone ...
    result = log.verify(anchor)
    assert not result.ok and "cut off" in result.message  # ... but not with an anchor
    assert not log.verify((4, "0" * 64)).ok


def test_concurrent_threads(log: AuditLog):
    n_threads, per_thread = 8, 50
    barrier = threading.Barrier(n_threads)
    errors = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                log.append("ask", key_id=f"thread{t}", patient_id=str(i), question=f"q{t}-{i}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = log.verify()
    assert result.ok, result.message
    assert result.n == len(log) == n_threads * per_thread
    assert [e.seq for e in log.entries()] == list(range(1, n_threads * per_thread + 1))
    for t in range(n_threads):
        assert len(log.entries(key_id=f"thread{t}")) == per_thread


def _process_worker(path: str, tag: str, n: int, start) -> None:
    log = AuditLog(path)
    start.wait(60)
    for i in range(n):
        log.append("ask", key_id=tag, patient_id=str(i), question=f"{tag}-{i}", outcome="ok")
        time.sleep(0.001)  # let the writers interleave rather than run one after the other
    log.close()


def test_concurrent_processes(log: AuditLog):
    n_procs, per_proc = 2, 50
    # fork: the worker lives in this test module, which spawned children could not import
    # (pytest does not put tests/ on sys.path); the log itself never relies on fork.
    if "fork" not in multiprocessing.get_all_start_methods():  # pragma: no cover
        pytest.skip("needs the fork start method")
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(n_procs + 1)  # every writer ready before anyone appends
    procs = [
        ctx.Process(target=_process_worker, args=(str(log.path), f"proc{p}", per_proc, start)) for p in range(n_procs)
    ]
    for p in procs:
        p.start()
    start.wait(60)
    for i in range(per_proc):  # and this process appends at the same time
        log.append("read", key_id="parent", patient_id=str(i))
        time.sleep(0.001)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    result = log.verify()
    assert result.ok, result.message
    assert result.n == len(log) == (n_procs + 1) * per_proc
    for tag in ["proc0", "proc1", "parent"]:
        assert len(log.entries(key_id=tag)) == per_proc
    entries = log.entries()
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    tags = [e.key_id for e in entries]
    assert sum(a != b for a, b in zip(tags, tags[1:])) > n_procs  # the writers really did interleave


def test_not_an_audit_log(tmp_path: Path):
    bad = tmp_path / "junk.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ClinqaError, match="not a clinqa audit log"):
        AuditLog(bad)


def test_unreadable_resource_ids_are_reported(log: AuditLog):
    fill(log, 2)
    db = raw(log)
    db.execute("UPDATE audit SET resource_ids = 'not json' WHERE seq = 2")
    restore_triggers(db)
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 2 and "unreadable" in result.message
