"""Annotation run folders (clinqa.specialties.annotate_store): the one run store, resume by id, refusal of
other settings or question texts, migration of the older one-file format, reading both forms."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.specialties import annotate_store
from clinqa.specialties.annotate import (
    PROMPTS,
    Annotation,
    annotate,
    annotate_to_file,
    annotate_to_run,
    label_continuations,
    read_annotations,
)

TEXTS = [
    "A 60-year-old man has crushing chest pain. What is the next step?",
    "A 4-year-old child has a barking cough and stridor. What is the diagnosis?",
    "A pregnant woman at 32 weeks has headache and hypertension. What is the diagnosis?",
]
QUESTIONS = [Question(id=f"q{i}", question=t, options={"A": "x", "B": "y"}, answer="A") for i, t in enumerate(TEXTS)]


class Counting:
    """Wraps a predictor and records the contexts of every score_continuations call."""

    def __init__(self, inner):
        self.inner, self.info, self.contexts = inner, inner.info, []

    def score_continuations(self, groups):
        self.contexts += [ctx for ctx, _ in groups]
        return self.inner.score_continuations(groups)

    def questions_scored(self) -> list[str]:
        return [t for t in TEXTS if any(t in ctx for ctx in self.contexts)]


def _old_config(min_votes: int, n_prompts: int = 5) -> dict:
    """The settings line format 1 wrote, built by hand from its definition."""
    prompts = hashlib.sha256(json.dumps([list(PROMPTS[:n_prompts]), label_continuations()]).encode()).hexdigest()
    return {
        "format": "clinqa.specialty_annotations",
        "model": "tiny",
        "adapter": None,
        "n_prompts": n_prompts,
        "min_votes": min_votes,
        "calibrate": True,
        "norm": "token",
        "prompts": prompts[:12],
    }


def _made_up(qid: str, sid: str) -> dict:
    """An annotation the model would not produce, so a carried-over one is told from a recomputed one."""
    probs = [0.01] * 15
    probs[["cardiology", "pediatrics", "neurology"].index(sid)] = 0.86
    return {"question_id": qid, "label": sid, "votes": {sid: 5}, "probs": probs, "per_prompt": [sid] * 5}


def _write_old_file(path, min_votes=2, torn=True):
    lines = [
        {**_made_up("q0", "pediatrics"), "config": _old_config(min_votes)},
        {**_made_up("q9", "neurology"), "config": _old_config(min_votes)},  # a question not given now
        {**_made_up("q1", "cardiology"), "config": _old_config(min_votes)},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + ('{"question_id": "q2", "lab' if torn else "")
    path.write_text(text)
    return lines, text


def test_run_folder_holds_config_data_and_plain_samples_and_resumes_only_missing(tiny_predictor, tmp_path):
    full = annotate(tiny_predictor, QUESTIONS, min_votes=2)  # the in-memory path, computed independently
    out = tmp_path / "ann"
    first = annotate_to_run(tiny_predictor, QUESTIONS[:2], out, min_votes=2, batch_size=1)
    assert [a.to_dict() for a in first] == [a.to_dict() for a in full[:2]]
    meta = json.loads((out / "run.json").read_text())
    assert meta["kind"] == "annotate" and meta["store"] == 2
    cfg = meta["config"]
    assert cfg == {**_old_config(2), "annotator": "llm-vote", "format_version": 2}
    assert meta["data"]["n"] == 2 and meta["data"]["fields"] == ["question"]
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in lines] == ["q0", "q1"] and all("config" not in r for r in lines)
    with open(out / "samples.jsonl", "a") as fh:  # a kill mid-write leaves a torn last line
        fh.write('{"question_id": "q2", "lab')

    wrapped, seen = Counting(tiny_predictor), []
    again = annotate_to_run(wrapped, QUESTIONS, out, min_votes=2, progress=lambda d, t: seen.append((d, t)))
    assert wrapped.questions_scored() == [TEXTS[2]]  # only the missing question is scored
    assert len([c for c in wrapped.contexts if "N/A" not in c]) == 5  # one group per prompt
    assert seen[0] == (2, 3) and seen[-1] == (3, 3)
    assert [a.to_dict() for a in again] == [a.to_dict() for a in full]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3
    assert [a.to_dict() for a in read_annotations(out)] == [a.to_dict() for a in full]

    wrapped.contexts.clear()
    assert annotate_to_file is annotate_to_run  # the old name still works
    annotate_to_file(wrapped, QUESTIONS, out, min_votes=2)
    sub = annotate_to_run(wrapped, QUESTIONS[1:2], out, min_votes=2)  # a subset of what is there
    assert wrapped.contexts == [] and [a.to_dict() for a in sub] == [full[1].to_dict()]


def test_other_settings_or_question_texts_are_refused(tiny_predictor, tmp_path):
    out = tmp_path / "ann"
    annotate_to_run(tiny_predictor, QUESTIONS, out, min_votes=2)
    before = (out / "samples.jsonl").read_text()
    with pytest.raises(ClinqaError, match=r"a different config \(min_votes: 2 -> 3\)"):
        annotate_to_run(tiny_predictor, QUESTIONS, out, min_votes=3)
    with pytest.raises(ClinqaError, match=r"calibrate: True -> False"):
        annotate_to_run(tiny_predictor, QUESTIONS, out, min_votes=2, calibrate=False)
    edited = [QUESTIONS[0], QUESTIONS[1].model_copy(update={"question": "A child has a rash."}), QUESTIONS[2]]
    with pytest.raises(ClinqaError, match=r"other data \(1 questions differ, first: q1 question\)"):
        annotate_to_run(tiny_predictor, edited, out, min_votes=2)
    with pytest.raises(ClinqaError, match="other data"):  # the same through a subset
        annotate_to_run(tiny_predictor, edited[1:2], out, min_votes=2)
    assert (out / "samples.jsonl").read_text() == before
    with pytest.raises(ClinqaError, match="appears twice"):
        annotate_to_run(tiny_predictor, [QUESTIONS[0], QUESTIONS[0]], tmp_path / "dup")


def test_old_file_migrates_with_its_annotations(tiny_predictor, tmp_path):
    old = tmp_path / "ann.jsonl"
    lines, text = _write_old_file(old)
    notes = []
    wrapped = Counting(tiny_predictor)
    anns = annotate_to_run(wrapped, QUESTIONS, old, min_votes=2, notify=notes.append)
    backup = tmp_path / "ann.v1.jsonl"
    assert old.is_dir() and backup.read_text() == text  # the old file is kept byte for byte
    kept = {r["question_id"]: {k: v for k, v in r.items() if k != "config"} for r in lines}
    assert [a.to_dict() for a in anns[:2]] == [kept["q0"], kept["q1"]]  # carried over, not recomputed
    assert wrapped.questions_scored() == [TEXTS[2]]
    assert anns[2].to_dict() == annotate(tiny_predictor, QUESTIONS[2:], min_votes=2)[0].to_dict()
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "2 annotations carried over, 1 of questions not given now only in" in notes[0]
    assert json.loads((old / "run.json").read_text())["migrated_from"] == {
        "file": "ann.v1.jsonl",
        "format": 1,
        "records": 3,
    }
    assert [a.question_id for a in read_annotations(old)] == ["q0", "q1", "q2"]
    assert [a.to_dict() for a in read_annotations(backup)] == [kept["q0"], kept["q9"], kept["q1"]]
    wrapped.contexts.clear()  # migrated once: now an ordinary resume
    assert annotate_to_run(wrapped, QUESTIONS, old, min_votes=2, notify=notes.append) == anns
    assert wrapped.contexts == [] and len(notes) == 1


def test_old_file_with_other_settings_is_left_alone_and_refused(tiny_predictor, tmp_path):
    old = tmp_path / "ann.jsonl"
    _, text = _write_old_file(old, min_votes=3)
    with pytest.raises(ClinqaError) as e:
        annotate_to_run(tiny_predictor, QUESTIONS, old, min_votes=2)
    msg = str(e.value)
    assert "\n" not in msg and f"{old}:1 is an annotation file of an older clinqa" in msg
    assert "min_votes: 3 -> 2" in msg and f"mv {old} {tmp_path / 'ann.v1.jsonl'}" in msg
    assert old.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["ann.jsonl"]
    bare = tmp_path / "bare.jsonl"  # written without settings (write_annotations, the MiniLM path)
    bare.write_text(json.dumps(_made_up("q0", "pediatrics")) + "\n")
    with pytest.raises(ClinqaError, match="no recorded settings"):
        annotate_to_run(tiny_predictor, QUESTIONS, bare, min_votes=2)


def test_a_migration_killed_between_its_renames_is_finished(tiny_predictor, tmp_path, monkeypatch):
    old = tmp_path / "ann.jsonl"
    lines, _ = _write_old_file(old, torn=False)
    real = os.replace

    def dies_before_the_folder_is_renamed(a, b):
        if str(a).endswith(".migrating"):
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(annotate_store.os, "replace", dies_before_the_folder_is_renamed)
    with pytest.raises(KeyboardInterrupt):
        annotate_to_run(tiny_predictor, QUESTIONS, old, min_votes=2, notify=lambda m: None)
    monkeypatch.setattr(annotate_store.os, "replace", real)
    assert not old.exists() and (tmp_path / "ann.v1.jsonl").is_file() and (tmp_path / ".ann.jsonl.migrating").is_dir()
    notes = []
    wrapped = Counting(tiny_predictor)
    anns = annotate_to_run(wrapped, QUESTIONS, old, min_votes=2, notify=notes.append)
    assert notes == [f"finished the interrupted migration of {old} into the run folder {old}"]
    assert anns[0].to_dict() == {k: v for k, v in lines[0].items() if k != "config"}
    assert wrapped.questions_scored() == [TEXTS[2]]


def test_calibration_file_of_format_1_migrates_into_its_folder(tiny_predictor, tmp_path):
    """`legacy_file`: the old A.calibration.jsonl seeds A/calibration (the CLI's --calibration)."""
    legacy = annotate_store.legacy_calibration_file(tmp_path / "a.jsonl")
    assert legacy == tmp_path / "a.calibration.jsonl"
    lines, _ = _write_old_file(legacy, torn=False)
    anns = annotate_to_run(
        tiny_predictor, QUESTIONS[:2], tmp_path / "a" / "calibration", min_votes=2, legacy_file=legacy, notify=print
    )
    assert [a.to_dict() for a in anns] == [{k: v for k, v in r.items() if k != "config"} for r in (lines[0], lines[2])]
    assert (tmp_path / "a.calibration.v1.jsonl").is_file() and not legacy.exists()


def test_read_annotations_and_checks(tmp_path):
    anns = [Annotation.from_dict(_made_up("q0", "cardiology"))]
    plain = annotate_store.write_annotations(tmp_path / "x.jsonl", anns)
    assert read_annotations(plain) == anns
    with pytest.raises(ClinqaError, match="do not exist"):
        read_annotations(tmp_path / "nothing")
    other = tmp_path / "run"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"kind": "eval", "config": {}, "identity": "x"}))
    with pytest.raises(ClinqaError, match="'eval' run folder, not specialty annotations"):
        read_annotations(other)
    with pytest.raises(ClinqaError, match="'eval' run folder, not annotations"):
        annotate_store.check_annotation_out(other)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ClinqaError, match="is not a clinqa run folder"):
        annotate_store.check_annotation_out(tmp_path / "notes")
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": "q1", "question": "?"}\n')
    with pytest.raises(ClinqaError, match="q.jsonl: record 1: not a specialty annotation record"):
        annotate_store.check_annotation_out(bad)
    assert annotate_store.check_annotation_out(plain) == plain


def test_cli_bad_out_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not json\n")
    r = subprocess.run(
        [sys.executable, "-m", "clinqa.cli", "annotate", "bundled", "--limit", "2", "--out", str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "notes.txt:1" in lines[0], r.stderr
    assert bad.read_text() == "not json\n"
