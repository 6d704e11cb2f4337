"""Hostile question files (issue 16): oversized questions and duplicate options are bad rows with
file:line, under the loaders' usual strict / --skip-invalid rules."""

from __future__ import annotations

import json

import pytest

from clinqa.data.loaders import DEFAULT_MAX_QUESTION_CHARS, MAX_QUESTION_ENV, load_questions, max_question_chars
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError


def row(qid="q1", question="Which drug treats anaphylaxis first?", options=None, answer="A"):
    return {
        "id": qid,
        "question": question,
        "options": options or {"A": "Adrenaline", "B": "Cetirizine", "C": "Prednisolone", "D": "Salbutamol"},
        "answer": answer,
    }


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_oversized_question_is_refused_with_file_line(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_QUESTION_ENV, raising=False)
    big = "x" * 100_000
    f = write(tmp_path / "q.jsonl", [row(), row("q2", question=big)])
    size = 100_000 + len("AdrenalineCetirizinePrednisoloneSalbutamol")
    with pytest.raises(ClinqaError) as exc:
        load_questions(f)
    assert str(exc.value) == (
        f"{f}:2: field 'question': question and options are {size:,} characters, over the limit of "
        f"{DEFAULT_MAX_QUESTION_CHARS:,} (set {MAX_QUESTION_ENV} to raise it) (use --skip-invalid to skip bad rows)"
    )
    res = load_questions(f, skip_invalid=True)
    assert [q.id for q in res.questions] == ["q1"] and res.skipped[0].line == 2
    # the cap is configurable: by argument and by environment
    assert len(load_questions(f, max_chars=200_000).questions) == 2
    monkeypatch.setenv(MAX_QUESTION_ENV, "200000")
    assert max_question_chars() == 200_000 and len(load_questions(f).questions) == 2
    monkeypatch.setenv(MAX_QUESTION_ENV, "lots")
    with pytest.raises(ClinqaError, match="CLINQA_MAX_QUESTION_CHARS='lots'"):
        load_questions(f)


def test_a_question_exactly_at_the_cap_is_kept(tmp_path):
    opts = {"A": "a", "B": "b"}
    f = write(tmp_path / "q.jsonl", [row(question="y" * 98, options=opts)])  # 98 + 2 option characters = 100
    assert len(load_questions(f, max_chars=100).questions) == 1
    with pytest.raises(ClinqaError, match="101"):
        load_questions(write(tmp_path / "r.jsonl", [row(question="y" * 99, options=opts)]), max_chars=100)


def test_duplicate_option_texts_are_a_bad_row(tmp_path):
    same = {"A": "Aspirin", "B": "aspirin ", "C": "Heparin", "D": "Aspirin"}
    f = write(tmp_path / "q.jsonl", [row(), row("q2", options=same, answer="C")])
    with pytest.raises(ClinqaError) as exc:
        load_questions(f)
    assert str(exc.value) == (
        f"{f}:2: field 'options': options A and B have the same text 'aspirin' (use --skip-invalid to skip bad rows)"
    )
    res = load_questions(f, skip_invalid=True)
    assert [q.id for q in res.questions] == ["q1"] and res.skipped[0].field == "options"


def test_four_identical_options_cannot_be_built():
    with pytest.raises(ValueError, match="options A and B have the same text"):
        Question(id="x", question="Q?", options={k: "same" for k in "ABCD"}, answer="A")


def test_bundled_sets_pass_the_new_checks():
    for spec in ("bundled", "bundled:control", "bundled:statements"):
        assert load_questions(spec).questions
