"""Hostile but fair inputs (issue 16): untrusted text cannot crash or hijack the CLI's output,
inputs are bounded, keys and audit checks cannot pass silently. Each test is one probe of
docs/hardening.md."""

import json
import os
import subprocess
import sys

import pytest

from clinqa.textsafe import plain, safe

ESC_RED = "\x1b[31m"


def clinqa(*args, timeout=300, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "clinqa.cli", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "MarkupError" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), r.stderr
    for n in needles:
        assert n in last, (n, last)
    return last


def bundle(name: str, patient_id: str = "p1", extra=()):
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{patient_id}",
                "resource": {"resourceType": "Patient", "id": patient_id, "name": [{"given": [name], "family": "Doe"}]},
            },
            *extra,
        ],
    }


# ------------------------------------------------------------------------------------------- textsafe


def test_safe_escapes_markup_and_plain_strips_controls():
    from rich.console import Console

    c = Console(file=open(os.devnull, "w"), width=200, record=True)
    for text in ("[/]", "[bold]x[/bold]", "[/bold]", "a\\", "[link=file:///etc/passwd]y"):
        c.print(f"[red]{safe(text)}[/red]")  # would raise MarkupError or swallow tags unescaped
    assert c.export_text().splitlines() == ["[/]", "[bold]x[/bold]", "[/bold]", "a\\", "[link=file:///etc/passwd]y"]
    assert plain(f"Ann{ESC_RED}Red\x1b]0;pwned\x07\x07\x08 ok\ttab\nline\u202e") == "AnnRed ok\ttab\nline"
    assert safe(f"[b]{ESC_RED}") == "\\[b]"


# --------------------------------------------------------------------------------- markup injection


def test_markup_in_a_data_answer_gives_the_file_line_error(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"id": "a", "question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "[/]"}) + "\n")
    last = one_line_error(clinqa("eval", "default", str(f), "--out", str(tmp_path / "out")), f"{f}:1", "'[/]'")
    assert "field 'answer'" in last


def test_markup_in_an_id_is_printed_not_swallowed(tmp_path):
    from clinqa.serve.auth import KeyStore

    KeyStore(tmp_path / "k.db")
    one_line_error(
        clinqa("keys", "revoke", "[bold]abc", "--db", str(tmp_path / "k.db")), "'[bold]abc'", "clinqa keys list"
    )


@pytest.mark.embedded
def test_markup_in_out_path_does_not_crash_the_final_message(tmp_path):
    r = clinqa("eval", "default", "bundled", "--limit", "1", "--out", "runs/[/]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "run saved in runs/[/]" in r.stdout
    assert (tmp_path / "runs" / "[" / "]" / "run.json").is_file()


def test_records_show_prints_markup_and_strips_escapes_in_names(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps(bundle(f"[/bold]Ann{ESC_RED}")))
    r = clinqa("records", "show", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    assert "[/bold]Ann Doe (p1)" in r.stdout
    assert "\x1b" not in r.stdout + r.stderr


def test_problems_with_markup_and_escapes_are_printed_safely(tmp_path):
    obs = {
        "resource": {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": f"Practitioner/[/]{ESC_RED}"}],
        }
    }
    (tmp_path / "b.json").write_text(json.dumps(bundle("Ann", extra=[obs])))
    r = clinqa("records", "show", str(tmp_path / "b.json"), "--lenient")
    assert r.returncode == 0, r.stderr
    assert "problem:" in r.stderr and "[/]" in r.stderr and "\x1b" not in r.stderr


# ---------------------------------------------------------------------------------- bounded inputs


@pytest.mark.parametrize(
    "question,message",
    [
        ("", "the question is empty"),
        ("   ", "the question is empty"),
        ("x" * 2001, "the question is 2,001 characters, over the limit of 2,000 (raise it with --max-question-chars)"),
    ],
)
def test_records_ask_refuses_empty_and_oversized_questions(tmp_path, question, message):
    (tmp_path / "b.json").write_text(json.dumps(bundle("Ann")))
    one_line_error(clinqa("records", "ask", str(tmp_path / "b.json"), question), message)


def test_eval_refuses_an_oversized_question_with_file_line(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(
        json.dumps({"id": "a", "question": "x" * 100_000, "options": {"A": "x", "B": "y"}, "answer": "A"}) + "\n"
    )
    r = clinqa("eval", "default", str(f), "--out", str(tmp_path / "out"))
    one_line_error(r, f"{f}:1: field 'question'", "over the limit of 20,000", "CLINQA_MAX_QUESTION_CHARS")
    assert not (tmp_path / "out").exists()


def test_eval_refuses_duplicate_options_with_file_line(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(
        json.dumps({"id": "a", "question": "Q?", "options": {k: "same" for k in "ABCD"}, "answer": "A"}) + "\n"
    )
    one_line_error(
        clinqa("eval", "default", str(f), "--out", str(tmp_path / "out")),
        f"{f}:1: field 'options': options A and B have the same text 'same'",
    )
