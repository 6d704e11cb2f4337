"""The command line as a user meets it: the embedded model end to end, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from clinqa.cli import app

runner = CliRunner()


def clinqa(*args, timeout=300):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "clinqa.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("eval", "report"):
        assert cmd in r.output


@pytest.mark.embedded
def test_eval_and_report_on_embedded_model(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(
        app, ["eval", "default", "bundled", "--method", "option", "--shuffles", "2", "--limit", "4", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "chance" in r.output and "all" in r.output
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 8
    s = json.loads(lines[0])
    assert s["method"] == "option" and set(s["probs"]) == {"A", "B", "C", "D"}
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["model"] == "default" and meta["finished_at"]
    # the same command again resumes: nothing new is computed, the file is unchanged
    r = runner.invoke(
        app, ["eval", "default", "bundled", "--method", "option", "--shuffles", "2", "--limit", "4", "--out", str(out)]
    )
    assert r.exit_code == 0 and (out / "samples.jsonl").read_text().splitlines() == lines
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "report.md").exists() and (out / "specialties.png").exists()


@pytest.mark.embedded
def test_generate_method_counts_unparseable(tmp_path):
    out = tmp_path / "gen"
    r = runner.invoke(
        app,
        [
            "eval",
            "default",
            "bundled",
            "--method",
            "generate",
            "--limit",
            "2",
            "--max-new-tokens",
            "24",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert all("generated" in s["extras"] and s["extras"]["parse"] for s in samples)
    assert all((s["pred"] is None) == (s["extras"]["parse"] in ("unparseable", "ambiguous")) for s in samples)


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "./no/such/model", "bundled", "--out", "X"], "no such model folder: ./no/such/model"),
        (["eval", "missing.gguf", "bundled", "--out", "X"], "no such GGUF file: missing.gguf"),
        (
            ["eval", "openai:http://127.0.0.1:9/v1#m", "bundled", "--method", "letter", "--limit", "1", "--out", "X"],
            "cannot reach http://127.0.0.1:9/v1",
        ),
        (["eval", "default", "no_such_data.jsonl", "--out", "X"], "no such file or folder"),
        (["eval", "default+lora:", "bundled", "--out", "X"], "needs a target"),
        (["finetune", "default", "bundled", "--part", "3/2", "--out", "X"], "part '3/2': use K/N"),
        (["annotate", "bundled", "--none-from", "bundled", "--out", "X"], "give --train too"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, args, message):
    args = [a.replace("X", str(tmp_path / "out")) if a == "X" else a for a in args]
    r = clinqa(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert message in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "out").exists()


def test_bad_row_names_file_line_and_field(tmp_path):
    f = tmp_path / "q.jsonl"
    good = {"id": "a", "question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "A"}
    bad = {"id": "b", "question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "C"}
    f.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    r = clinqa("eval", "default", str(f), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and f"{f}:2" in r.stderr and "--skip-invalid" in r.stderr


def test_records_synth_show_and_questions(tmp_path):
    r = runner.invoke(app, ["records", "synth", "-n", "2", "--seed", "1", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "p").glob("*.json"))) == 2
    r = runner.invoke(app, ["records", "show", str(tmp_path / "p"), "--limit", "3"])
    assert r.exit_code == 0 and "[Patient/" in r.output and "0 problems" in r.output
    r = runner.invoke(app, ["records", "questions", str(tmp_path / "p"), "--out", str(tmp_path / "q.jsonl")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert {"unanswerable", "latest", "trend"} <= {q["qtype"] for q in rows}


def test_keys_and_audit_commands(tmp_path):
    db = str(tmp_path / "keys.db")
    r = runner.invoke(app, ["keys", "create", "ward 7", "--patients", "p1,p2", "--operations", "read", "--db", db])
    assert r.exit_code == 0, r.output
    key_id = r.output.split("key id ")[1].split()[0]
    plain = [line for line in r.output.splitlines() if line.startswith("cq_")][0]
    assert plain.encode() not in (tmp_path / "keys.db").read_bytes()
    r = runner.invoke(app, ["keys", "list", "--db", db])
    assert key_id in r.output and "patient/p1.read" in r.output
    assert runner.invoke(app, ["keys", "revoke", key_id, "--db", db]).exit_code == 0
    assert "revoked" in runner.invoke(app, ["keys", "list", "--db", db]).output
    from clinqa.serve.audit import AuditLog

    with AuditLog(tmp_path / "audit.db") as log:
        log.append("ask", key_id=key_id, patient_id="p1", question="q", resource_ids=["Observation/1"])
    r = runner.invoke(app, ["audit", "verify", "--db", str(tmp_path / "audit.db")])
    assert r.exit_code == 0 and "1 entries" in r.output


def test_index_build_and_query(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "af.md").write_text(
        "# Atrial fibrillation\nAnticoagulation with apixaban prevents stroke in atrial fibrillation."
    )
    (docs / "se.md").write_text("# Status epilepticus\nGive intravenous lorazepam first for status epilepticus.")
    r = runner.invoke(app, ["index", "build", str(docs), "--out", str(tmp_path / "idx"), "--no-dense"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["index", "query", str(tmp_path / "idx"), "lorazepam seizure", "-k", "1", "--mode", "bm25"])
    assert r.exit_code == 0 and "se#0" in r.output and "af#0" not in r.output


def test_annotate_command_reports_tradeoff(tmp_path):
    r = runner.invoke(
        app,
        [
            "annotate",
            "bundled",
            "--limit",
            "3",
            "--prompts",
            "2",
            "--min-votes",
            "1",
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "coverage" in r.output and len((tmp_path / "a" / "samples.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "a" / "run.json").read_text())["config"]["n_prompts"] == 2


def _write_jsonl(path, questions, strip=False):
    with open(path, "w") as fh:
        for q in questions:
            fh.write(json.dumps({**q.model_dump(), **({"specialties": []} if strip else {})}) + "\n")
    return str(path)


def test_annotate_with_minilm_calibrated_sets_and_labelled_output(tmp_path):
    from clinqa.data.loaders import load_questions

    qs = load_questions("bundled").questions
    train = _write_jsonl(tmp_path / "train.jsonl", qs[::2])
    cal = _write_jsonl(tmp_path / "cal.jsonl", qs[1::4])
    new = _write_jsonl(tmp_path / "new.jsonl", qs[3::4], strip=True)  # an unlabelled benchmark
    r = runner.invoke(
        app,
        [
            "annotate",
            new,
            "--train",
            train,
            "--calibration",
            cal,
            "--alpha",
            "0.2",
            "--out",
            str(tmp_path / "a.jsonl"),
            "--labelled",
            str(tmp_path / "labelled.jsonl"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "calibrated on 51 questions" in r.output and "51 of 51 with a specialty" in r.output
    assert "vote threshold" not in r.output  # one classifier: no vote table
    meta = json.loads((tmp_path / "a.jsonl" / "run.json").read_text())
    assert meta["kind"] == "annotate" and meta["config"]["annotator"] == "minilm" and meta["config"]["n_train"] == 102
    assert meta["data"]["n"] == 51 and (tmp_path / "a.jsonl" / "calibration" / "run.json").is_file()
    r = runner.invoke(app, ["annotate", cal, "--train", train, "--out", str(tmp_path / "d.jsonl")])
    assert r.exit_code == 0 and "top label is a gold label for" in r.output
    labelled = load_questions(str(tmp_path / "labelled.jsonl")).questions
    gold = {q.id: set(q.specialties) for q in qs}
    hits = sum(bool(set(q.specialties) & gold[q.id]) for q in labelled)
    assert hits / len(labelled) > 0.6  # the sets are held out here: calibrated and trained on other questions
    assert load_questions(str(tmp_path / "labelled.jsonl"), specialties=["cardiology"]).questions
    r = runner.invoke(
        app, ["annotate", new, "--train", train, "--calibration", train, "--out", str(tmp_path / "b.jsonl")]
    )
    assert r.exit_code != 0 and "shares question ids with --train" in str(r.exception)
    r = runner.invoke(app, ["annotate", new, "--calibration", new, "--out", str(tmp_path / "c.jsonl")])
    assert r.exit_code != 0 and "has no specialties" in str(r.exception) and not (tmp_path / "c.jsonl").exists()


@pytest.mark.embedded
def test_annotate_llm_with_calibration_file_writes_labelled_questions(tmp_path):
    from clinqa.data.loaders import load_questions

    qs = load_questions("bundled").questions
    cal = _write_jsonl(tmp_path / "cal.jsonl", qs[:3])
    new = _write_jsonl(tmp_path / "new.jsonl", qs[100:103], strip=True)
    r = runner.invoke(
        app,
        [
            "annotate",
            new,
            "--prompts",
            "2",
            "--min-votes",
            "1",
            "--calibration",
            cal,
            "--alpha",
            "0.5",
            "--out",
            str(tmp_path / "a"),
            "--labelled",
            str(tmp_path / "l.jsonl"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "calibrated on 3 questions" in r.output
    from clinqa.specialties.annotate import read_annotations

    assert [a.question_id for a in read_annotations(tmp_path / "a" / "calibration")] == [q.id for q in qs[:3]]
    labelled = load_questions(str(tmp_path / "l.jsonl")).questions
    assert [q.id for q in labelled] == [q.id for q in qs[100:103]] and all(q.specialties for q in labelled)


@pytest.mark.embedded
def test_steer_build_and_sweep(tmp_path):
    r = runner.invoke(
        app,
        ["steer", "build", "default", "bundled", "--layers", "29", "--max-pairs", "6", "--out", str(tmp_path / "v")],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "v" / "vector.safetensors").exists()
    r = runner.invoke(
        app,
        [
            "steer",
            "sweep",
            "default",
            "bundled",
            "--vector",
            str(tmp_path / "v"),
            "--alphas=0,2",
            "--limit",
            "3",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "| 29 | 0 |" in r.output and "right→wrong" in r.output
    r = runner.invoke(
        app,
        [
            "eval",
            f"default+steer:{tmp_path / 'v'}",
            "bundled",
            "--alpha",
            "1",
            "--limit",
            "2",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert '"steer"' in (tmp_path / "e" / "samples.jsonl").read_text()
