"""The fifteen-specialty bundled training set: `bundled:taxonomy` (nine specialties) and `bundled:all`."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from clinqa.data import bundled
from clinqa.data.bundled import bundled_files, bundled_names, bundled_path
from clinqa.data.loaders import load_questions
from clinqa.errors import ClinqaError
from clinqa.specialties.label import annotator_training_spec
from clinqa.specialties.taxonomy import EXPERIMENT_SPECIALTIES, SPECIALTIES

NINE = [s.id for s in SPECIALTIES if s.id not in EXPERIMENT_SPECIALTIES]


def _raw_rows(name: str) -> list[dict]:
    return [
        json.loads(line)
        for path in bundled_files(name)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def test_taxonomy_set_has_one_file_per_other_specialty():
    files = bundled_files("taxonomy")
    assert sorted(p.stem for p in files) == sorted(NINE)
    for path in files:  # every question of a file has that file's specialty as its primary label
        for line in path.read_text(encoding="utf-8").splitlines():
            assert json.loads(line)["specialties"][0] == path.stem


def test_all_set_is_clinical_plus_taxonomy_and_bundled_is_unchanged():
    clinical = load_questions("bundled").questions
    taxonomy = load_questions("bundled:taxonomy")
    every = load_questions("bundled:all")
    assert len(clinical) == 204  # what `make demo` evaluates stays the same
    assert taxonomy.skipped == [] and every.skipped == []
    assert [q.id for q in every.questions] == [q.id for q in clinical] + [q.id for q in taxonomy.questions]
    assert "taxonomy" in bundled_names() and "all" in bundled_names()
    with pytest.raises(ClinqaError, match="several files"):
        bundled_path("all")


def test_at_least_25_questions_per_specialty_for_all_fifteen():
    counts = collections.Counter(q.specialties[0] for q in load_questions("bundled:all").questions)
    assert set(counts) == {s.id for s in SPECIALTIES}
    assert min(counts.values()) >= 25, counts


def test_ids_unique_across_every_bundled_question_set():
    ids = [q.id for name in ("all", "control") for q in load_questions(f"bundled:{name}").questions]
    assert len(ids) == len(set(ids))


def test_taxonomy_questions_are_well_formed():
    rows = _raw_rows("taxonomy")
    stems = [r["question"].strip().lower() for r in rows]
    assert len(stems) == len(set(stems)), "a question text appears twice"
    for r in rows:
        where = r["id"]
        assert list(r["options"]) == ["A", "B", "C", "D"], where
        texts = [t.strip().lower() for t in r["options"].values()]
        assert all(texts) and len(set(texts)) == 4, f"{where}: duplicate or empty options"
        assert r["answer"] in r["options"], where
        assert r["meta"]["rationale"].strip() and r["meta"]["topic"].strip(), where
        harmful = r["meta"].get("harmful_options", [])
        assert set(harmful) <= {"A", "B", "C", "D"} and r["answer"] not in harmful, f"{where}: harmful options"
        assert r["source"] == "clinqa-bundled"
    # the options were shuffled when the set was written: the correct letter is spread over A-D
    answers = collections.Counter(r["answer"] for r in rows)
    assert set(answers) == {"A", "B", "C", "D"} and max(answers.values()) < 0.4 * len(rows)


def test_missing_taxonomy_folder_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "clinical_cardiology.jsonl").write_text("")
    monkeypatch.setattr(bundled, "bundled_dir", lambda: tmp_path)
    assert "all" not in bundled_names()
    with pytest.raises(ClinqaError, match=r"the bundled question set 'all' is missing .* reinstall clinqa"):
        load_questions("bundled:all")


def test_annotator_trains_on_all_fifteen_for_plain_bundled():
    assert annotator_training_spec("bundled") == "bundled:all"
    assert annotator_training_spec("bundled:clinical") == "bundled:clinical"
    assert annotator_training_spec("my.jsonl") == "my.jsonl"


class _WordHashEncoder:
    """A deterministic bag-of-words encoder (no model files): enough to check which labels get fitted."""

    clinqa_name = "word-hash"

    def get_embedding_dimension(self) -> int:
        return 64

    def encode(self, texts, **_):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_annotator_fitted_on_bundled_all_knows_every_specialty():
    from clinqa.specialties.embed import EmbeddingAnnotator

    six_only = EmbeddingAnnotator(model=_WordHashEncoder()).fit(load_questions("bundled").questions)
    assert "psychiatry" in six_only.untrained_labels  # the issue: no psychiatry in `bundled`
    ann = EmbeddingAnnotator(model=_WordHashEncoder()).fit(load_questions("bundled:all").questions)
    assert ann.untrained_labels == () and ann.constant_labels == ()
    assert min(ann.label_counts_.values()) >= 25
    probs = ann.predict_proba(["A man has recurrent binge eating and self-induced vomiting."])
    assert probs.shape == (1, 15) and np.all(probs > 0)


def test_cli_annotate_train_bundled_uses_all_fifteen(tmp_path):
    """`clinqa annotate X --train bundled` (the real MiniLM) trains on bundled:all and can answer psychiatry."""
    from typer.testing import CliRunner

    from clinqa.cli import app

    new = tmp_path / "new.jsonl"
    rows = [
        {
            "id": "p1",
            "question": "A 23-year-old hears voices commenting on his actions and believes his thoughts are "
            "broadcast; antipsychotic treatment is planned.",
            "options": {"A": "Haloperidol", "B": "Lithium"},
            "answer": "A",
        }
    ]
    new.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = CliRunner().invoke(
        app,
        [
            "annotate",
            str(new),
            "--train",
            "bundled",
            "--out",
            str(tmp_path / "a.jsonl"),
            "--labelled",
            str(tmp_path / "l.jsonl"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "bundled:all" in r.output
    assert load_questions(str(tmp_path / "l.jsonl")).questions[0].specialties == ["psychiatry"]
