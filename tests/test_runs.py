"""The run store (clinqa.runs) and evaluation runs on it: identity by content, readable refusals,
locks (in-process and across processes, stale takeover), migration of old folders, bad numbers."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate import EvalConfig, Run, evaluate, shuffle
from clinqa.evaluate.methods import make_items
from clinqa.runs import (
    LOCK_FILE,
    RunFolder,
    check_writable,
    data_change,
    describe_config_change,
    fingerprint,
    lock_path,
    read_meta,
)


def questions(n=4, answer_of=None):
    answer_of = answer_of or {}
    return [
        Question(
            id=f"card-{i:03d}",
            question=f"Which option is number {i}?",
            options={"A": f"alpha {i}", "B": f"bravo {i}", "C": f"charlie {i}", "D": f"delta {i}"},
            answer=answer_of.get(i, "ABCD"[i % 4]),
            specialties=["cardiology"],
            source="t",
        )
        for i in range(n)
    ]


class Row(BaseModel):
    key: str
    value: float


@dataclasses.dataclass
class DRow:
    key: str
    n: int


# ------------------------------------------------------------------------------------------- store


def test_store_round_trips_pydantic_and_dataclass_samples(tmp_path):
    with RunFolder.open(tmp_path / "a", {"x": 1}, kind="t", sample_type=Row) as run:
        assert run.append([Row(key="a", value=0.5), Row(key="b", value=1.5)]) == 2
        assert run.append([]) == 0
        run.finish(n=2)
    back = RunFolder.load(tmp_path / "a", Row)
    assert back.samples() == [Row(key="a", value=0.5), Row(key="b", value=1.5)]
    assert back.meta["counts"] == {"n": 2} and back.meta["finished_at"] and back.meta["store"] == 2
    assert "python" in back.meta["versions"]
    with RunFolder.open(tmp_path / "d", {"x": 1}, kind="t", sample_type=DRow) as run:
        run.append([DRow("k", 3)])
        assert run.samples() == [DRow("k", 3)]
    # the lock file is gone once the run is closed, and the folder holds only what the store wrote
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["run.json", "samples.jsonl"]


def test_config_change_is_refused_with_a_dotted_diff(tmp_path):
    RunFolder.open(tmp_path / "r", {"model": "m", "lora": {"rank": 8}}, kind="t", sample_type=Row).close()
    with pytest.raises(ClinqaError) as e:
        RunFolder.open(tmp_path / "r", {"model": "m", "lora": {"rank": 16}}, kind="t", sample_type=Row)
    msg = str(e.value)
    assert "lora.rank: 8 -> 16" in msg and "another --out folder or delete" in msg and "\n" not in msg
    assert describe_config_change({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 4}) == [
        "b.c: 2 -> 3",
        "d: None -> 4",
    ]


def test_fingerprint_names_the_changed_question_and_field():
    old = fingerprint([(q.id, q.model_dump()) for q in questions(10)], noun="questions")
    edited = questions(10, answer_of={7: "A", 8: "A", 9: "B"})  # 7: D->A, 8: A (same), 9: B (same as before: 9 % 4 = 1)
    new = fingerprint([(q.id, q.model_dump()) for q in edited], noun="questions")
    assert data_change(old, new) == "1 questions differ, first: card-007 answer"
    # more questions (a resume after a larger --limit) are fine; fewer are not
    more = fingerprint([(q.id, q.model_dump()) for q in questions(12)], noun="questions")
    assert data_change(old, more) is None
    assert data_change(more, old) == "2 questions missing, first: card-010"
    assert fingerprint([(q.id, q.model_dump()) for q in questions(10)])["sha256"] == old["sha256"]


def test_garbage_and_empty_run_json_are_one_line_errors(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "run.json").write_text("{not json")
    with pytest.raises(ClinqaError, match=r"run.json: not valid JSON"):
        read_meta(tmp_path / "g")
    (tmp_path / "g" / "run.json").write_text("{}")
    with pytest.raises(ClinqaError, match="not a clinqa run description"):
        Run.load(tmp_path / "g")
    (tmp_path / "g" / "run.json").write_text("[1, 2]")
    with pytest.raises(ClinqaError, match="not a clinqa run description"):
        Run.load(tmp_path / "g")
    with pytest.raises(ClinqaError, match="not a run folder"):
        Run.load(tmp_path / "nothing")


def test_check_writable_refuses_files_and_paths_under_files(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ClinqaError, match="is a file, not a folder"):
        check_writable(tmp_path / "f")
    with pytest.raises(ClinqaError, match="is a file, so nothing can be written under it"):
        check_writable(tmp_path / "f" / "sub" / "run")
    with pytest.raises(ClinqaError, match="is a folder, not a file"):
        check_writable(tmp_path, folder=False)
    assert check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing created


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_out_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ClinqaError, match="not writable"):
            check_writable(ro / "run")
    finally:
        ro.chmod(0o755)


# -------------------------------------------------------------------------------------------- lock


def test_lock_is_exclusive_reentrant_and_released_on_exceptions(tmp_path):
    f = tmp_path / "ann.jsonl"
    with lock_path(f) as lock:
        assert lock == tmp_path / "ann.jsonl.lock"
        owner = json.loads(lock.read_text())
        assert owner["pid"] == os.getpid() and owner["host"]
        with lock_path(f):  # the same process may nest
            pass
        assert lock.exists()
    assert not lock.exists()
    with pytest.raises(RuntimeError):
        with lock_path(tmp_path / "d", folder=True):
            raise RuntimeError("boom")
    assert not (tmp_path / "d" / LOCK_FILE).exists()
    with lock_path(tmp_path / "d", folder=True):  # taken again after the exception released it
        pass
    # folders made only to hold the lock are removed if the command wrote nothing (a failed eval leaves no --out)
    with pytest.raises(ClinqaError):
        with lock_path(tmp_path / "new" / "run", folder=True):
            raise ClinqaError("no such model")
    assert not (tmp_path / "new").exists()


HOLDER = textwrap.dedent("""
    import sys, time
    from clinqa.runs import lock_path
    with lock_path(sys.argv[1], folder=sys.argv[2] == "folder"):
        print("locked", flush=True)
        time.sleep(60)
""")


def _holder(folder: Path, kind: str = "folder") -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), kind],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_lock_taken_but_not_yet_signed_is_waited_for_so_the_error_names_the_owner(tmp_path):
    """Two commands started together: the loser may find the lock held before the winner has written
    who it is; it waits a moment for the owner's note instead of saying "another process"."""
    import fcntl
    import threading

    folder = tmp_path / "run"
    folder.mkdir()
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, still empty

    def sign() -> None:
        os.write(fd, json.dumps({"pid": 4242, "host": "h", "since": "t"}).encode())

    timer = threading.Timer(0.3, sign)
    timer.start()
    try:
        with pytest.raises(ClinqaError, match="is in use by pid 4242 on h since t"):
            with lock_path(folder, folder=True):
                pass
    finally:
        timer.join()
        os.close(fd)


def test_second_process_gets_one_line_error_and_a_dead_owner_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    p = _holder(folder)
    try:
        with pytest.raises(ClinqaError) as e:
            with lock_path(folder, folder=True):
                pass
        msg = str(e.value)
        assert f"is in use by pid {p.pid} on " in msg and "\n" not in msg
        # the same through the store: nothing is created or changed in the folder
        with pytest.raises(ClinqaError, match=f"in use by pid {p.pid}"):
            evaluate(None, questions(2), EvalConfig(model="m", data="d"), folder)
        assert not (folder / "run.json").exists()
    finally:
        p.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        p.wait()
    assert (folder / LOCK_FILE).exists()
    notes = []
    with lock_path(folder, folder=True, notify=notes.append):
        pass
    assert len(notes) == 1 and f"took over the stale lock on {folder} left by pid {p.pid}" in notes[0]
    assert "no longer running" in notes[0]
    assert not (folder / LOCK_FILE).exists()


# ------------------------------------------------------------------------------- eval runs, by content


def test_same_questions_by_another_path_resume_and_an_edited_answer_is_refused(tiny_predictor, tmp_path):
    out = tmp_path / "r"
    evaluate(tiny_predictor, questions(6), EvalConfig(model="tiny", data="data/q.jsonl", method="letter"), out)
    before = (out / "samples.jsonl").read_bytes()
    # the same questions by an absolute path: resumes, nothing recomputed
    run = evaluate(
        tiny_predictor, questions(6), EvalConfig(model="tiny", data="/abs/data/q.jsonl", method="letter"), out
    )
    assert (out / "samples.jsonl").read_bytes() == before and len(run.samples()) == 6
    # an answer edited in the data: refused, saying which question and field, and how to start afresh
    edited = questions(6, answer_of={3: "A"})
    with pytest.raises(ClinqaError) as e:
        evaluate(tiny_predictor, edited, EvalConfig(model="tiny", data="data/q.jsonl", method="letter"), out)
    msg = str(e.value)
    assert "other data (1 questions differ, first: card-003 answer)" in msg
    assert "choose another --out folder or delete" in msg and "\n" not in msg
    assert (out / "samples.jsonl").read_bytes() == before


def _old_format_run(tiny_predictor, out: Path, cfg: EvalConfig) -> bytes:
    """A run folder as clinqa wrote it before the data fingerprint: no "store"/"data", the identity a
    hash of the whole config (computed here by hand, the way the old code did)."""
    evaluate(tiny_predictor, questions(4), cfg, out)
    meta = json.loads((out / "run.json").read_text())
    for k in ("store", "data"):
        meta.pop(k)
    # the old config had no device/dtype fields (they came with GPU support)
    old_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "dtype")}
    meta["config"] = old_cfg
    meta["identity"] = hashlib.sha256(json.dumps(old_cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    (out / "run.json").write_text(json.dumps(meta))
    return (out / "samples.jsonl").read_bytes()


def test_old_run_folders_resume_and_are_upgraded(tiny_predictor, tmp_path):
    cfg = EvalConfig(model="tiny", data="q.jsonl", method="option")
    out = tmp_path / "old"
    before = _old_format_run(tiny_predictor, out, cfg)
    run = evaluate(tiny_predictor, questions(4), cfg, out)
    assert (out / "samples.jsonl").read_bytes() == before and len(run.samples()) == 4
    meta = json.loads((out / "run.json").read_text())
    assert meta["store"] == 2 and meta["migrated_at"] and meta["data"]["n"] == 4
    # from now on it is identified by content: another path resumes
    evaluate(tiny_predictor, questions(4), EvalConfig(model="tiny", data="/elsewhere/q.jsonl", method="option"), out)
    assert (out / "samples.jsonl").read_bytes() == before


def test_old_run_folder_with_another_config_is_refused_with_the_diff(tiny_predictor, tmp_path):
    out = tmp_path / "old"
    _old_format_run(tiny_predictor, out, EvalConfig(model="tiny", data="q.jsonl", method="option"))
    with pytest.raises(ClinqaError, match=r"older clinqa with a different config \(method: 'option' -> 'letter'\)"):
        evaluate(tiny_predictor, questions(4), EvalConfig(model="tiny", data="q.jsonl", method="letter"), out)


def test_bad_numbers_are_refused_before_anything_is_written(tiny_predictor, tmp_path):
    cfg = EvalConfig(model="tiny", data="d")
    for bs in (0, -5):
        with pytest.raises(ClinqaError, match=f"--batch-size must be at least 1, got {bs}"):
            evaluate(tiny_predictor, questions(2), cfg, tmp_path / "r", batch_size=bs)
    with pytest.raises(ClinqaError, match="no questions to evaluate"):
        evaluate(tiny_predictor, [], cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_more_shuffles_than_orders_uses_each_order_once():
    q = Question(id="yn", question="Yes or no?", options={"A": "yes", "B": "no"}, answer="A")
    perms = shuffle.permutations(q.id, 5, 2, seed=0)
    assert perms == [[0, 1], [1, 0]]
    q3 = Question(id="t", question="Which?", options={"A": "a", "B": "b", "C": "c"}, answer="C")
    items = make_items([q3], 10, seed=1)
    assert len(items) == 6 and len({tuple(it.permutation) for it in items}) == 6 and items[0].permutation == [0, 1, 2]
    # fewer shuffles than orders: exactly the seeded permutations as before
    assert shuffle.permutations("t", 3, 4, 7) == [shuffle.permutation("t", k, 4, 7) for k in range(3)]
    note = shuffle.too_many_shuffles([q, q3, questions(1)[0]], 10)
    assert note == (
        "--shuffles 10: 1 question with 2 options has only 2 distinct orders; 1 question with 3 options has "
        "only 6 distinct orders: each of their orders is used once"
    )
    assert shuffle.too_many_shuffles([q3], 6) is None


def test_every_resumable_writer_takes_the_lock(tiny_predictor, tmp_path):
    """annotate, records eval, compare and steer sweep refuse a run folder another process holds."""
    from clinqa.experiments.compare import CompareConfig, compare
    from clinqa.specialties.annotate import annotate_to_file

    ann = tmp_path / "ann"  # an annotation run folder
    exp = tmp_path / "exp"
    holders = [_holder(ann), _holder(exp)]
    try:
        with pytest.raises(ClinqaError, match=f"ann is in use by pid {holders[0].pid}"):
            annotate_to_file(tiny_predictor, questions(2), ann)
        with pytest.raises(ClinqaError, match=f"exp is in use by pid {holders[1].pid}"):
            compare(CompareConfig(model="tiny", data="d"), questions(2), exp, load=lambda spec: tiny_predictor)
    finally:
        for p in holders:
            p.terminate()
            p.wait()
    assert not (ann / "run.json").exists() and not (exp / "base").exists()


def test_locks_live_in_clinqa_locks_and_lora_records_the_same_versions():
    import clinqa
    from clinqa import locks, runs
    from clinqa.adapt import lora_adapter

    assert runs.lock_path is locks.lock_path and runs.LOCK_FILE == locks.LOCK_FILE == ".clinqa.lock"
    assert runs.lock_file_for is locks.lock_file_for and runs.now is locks.now
    assert lora_adapter.versions is runs.versions  # one list of recorded packages, no copy
    assert {"peft", "accelerate", "bitsandbytes"} <= set(runs.VERSIONED_PACKAGES)
    v = runs.versions()
    assert v["clinqa"] == clinqa.__version__ and v["python"].count(".") == 2


@pytest.mark.parametrize("lock", [True, False])
def test_a_line_torn_by_a_kill_is_cut_off_by_a_writer_and_left_alone_by_a_reader(tmp_path, lock):
    folder = tmp_path / "run"
    with RunFolder.open(folder, {"a": 1}, kind="t", sample_type=Row) as run:
        run.append([Row(key="x", value=1.0)])
    samples = folder / "samples.jsonl"
    whole = samples.read_bytes()
    samples.write_bytes(whole + b'{"key": "y", "va')  # a kill mid-write
    assert [r.key for r in RunFolder.load(folder, Row).samples()] == ["x"]
    assert samples.read_bytes() == whole + b'{"key": "y", "va'  # a reader never writes
    run = RunFolder.open(folder, {"a": 1}, kind="t", sample_type=Row, lock=lock)  # lock=False: the caller holds it
    try:
        assert [r.key for r in run.samples()] == ["x"]
        assert samples.read_bytes() == whole
        run.append([Row(key="z", value=2.0)])
    finally:
        run.close()
    assert [r.key for r in RunFolder.load(folder, Row).samples()] == ["x", "z"]
