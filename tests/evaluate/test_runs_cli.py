"""Run folders as the command line meets them, with real processes: two evals into one folder,
Ctrl-C mid-run, and one-line errors for hostile inputs. The model is a tiny random Llama saved as
a Hugging Face folder, so each process loads in about a second."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory, tokenizer, make_tiny_llama):
    """A random-weight two-layer Llama with the embedded model's tokenizer, saved as a model folder."""
    model = make_tiny_llama(tokenizer)
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def clinqa(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "clinqa.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=_env(),
    )


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "200"}


def _popen(*args, cwd=None):
    return subprocess.Popen(
        [sys.executable, "-m", "clinqa.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=_env(),
    )


def _keys(out: Path) -> list[tuple[str, int]]:
    return [(s["question_id"], s["shuffle"]) for s in map(json.loads, (out / "samples.jsonl").read_text().splitlines())]


EVAL = ["bundled", "--limit", "20", "--shuffles", "2", "--batch-size", "2", "--method", "option"]
N = 40


def test_two_evals_into_one_folder_one_wins_one_gets_a_lock_error(tiny_model_folder, tmp_path):
    out = tmp_path / "R"
    procs = [_popen("eval", tiny_model_folder, *EVAL, "--out", out) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    err_lines = [line for line in loser[2].splitlines() if line.strip()]
    assert len(err_lines) == 1 and "is in use by pid" in err_lines[0] and "Traceback" not in loser[2], loser[2]
    keys = _keys(out)
    assert len(keys) == N and len(set(keys)) == N
    meta = json.loads((out / "run.json").read_text())
    assert meta["counts"]["samples"] == N and meta["finished_at"]
    assert not (out / ".clinqa.lock").exists()


def test_ctrl_c_prints_the_interrupted_line_releases_the_lock_and_resumes(tiny_model_folder, tmp_path):
    out = tmp_path / "R"
    p = _popen("eval", tiny_model_folder, *EVAL, "--out", out)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "samples.jsonl").exists() and (out / "samples.jsonl").stat().st_size):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    code = p.wait(timeout=120)
    stderr = p.communicate()[1]
    assert code == 130, stderr
    assert "interrupted: finished batches are saved; re-run the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert not (out / ".clinqa.lock").exists()
    partial = _keys(out)
    assert 0 < len(partial) < N
    r = clinqa("eval", tiny_model_folder, *EVAL, "--out", out)
    assert r.returncode == 0, r.stderr
    keys = _keys(out)
    assert keys[: len(partial)] == partial and len(keys) == N and len(set(keys)) == N


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--batch-size", "-5"], "--batch-size must be at least 1, got -5"),
        (["--limit", "-2"], "--limit must be at least 1, got -2"),
        (["--shuffles", "0"], "--shuffles must be at least 1, got 0"),
    ],
)
def test_bad_numbers_are_one_line_errors(tmp_path, args, message):
    r = clinqa("eval", "default", "bundled", *args, "--out", tmp_path / "R")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {message}", r.stderr
    assert not (tmp_path / "R").exists()


def test_hostile_outputs_and_models_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "run.json").write_text("\x00\x01 not json")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "run.json").write_text("{}")
    cases = [
        (["eval", "default", "bundled", "--out", tmp_path / "file"], "is a file, not a folder"),
        (
            ["eval", "default", "bundled", "--out", tmp_path / "file" / "R"],
            "is a file, so nothing can be written under it",
        ),
        (["eval", tmp_path / "empty", "bundled", "--limit", "2", "--out", tmp_path / "R"], "has no config.json"),
        (["report", tmp_path / "garbage"], "run.json: not valid JSON"),
        (["report", tmp_path / "blank"], "not a clinqa run description"),
    ]
    for args, message in cases:
        r = clinqa(*args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr)


def test_more_shuffles_than_orders_says_so(tiny_model_folder, tmp_path):
    data = tmp_path / "yn.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"id": f"q{i}", "question": f"Is {i} even?", "options": {"A": "yes", "B": "no"}, "answer": "AB"[i % 2]}
            )
            + "\n"
            for i in range(3)
        )
    )
    r = clinqa("eval", tiny_model_folder, data, "--shuffles", "5", "--out", tmp_path / "R")
    assert r.returncode == 0, r.stderr
    assert "--shuffles 5: 3 questions with 2 options have only 2 distinct orders" in r.stderr
    assert len(_keys(tmp_path / "R")) == 6
