"""The bundled question sets meet the issue's promises: sizes, labels, rationales, one answer each."""

from collections import Counter

from clinqa.data.loaders import load_questions
from clinqa.specialties import EXPERIMENT_SPECIALTIES, SPECIALTIES

TAXONOMY = {s.id for s in SPECIALTIES}


def test_clinical_set_size_and_specialties():
    qs = load_questions("bundled").questions
    assert len(qs) >= 180
    primary = Counter(q.specialties[0] for q in qs)
    for spec in EXPERIMENT_SPECIALTIES:
        assert primary[spec] >= 30, spec
    for q in qs:
        assert q.specialties and set(q.specialties) <= TAXONOMY
        assert q.meta.get("rationale", "").strip(), q.id
        assert len(set(q.options.values())) == len(q.options), q.id
        for h in q.meta.get("harmful_options", []):
            assert h in q.options and h != q.answer, q.id
    assert len({q.id for q in qs}) == len(qs)
    assert sum(bool(q.meta.get("harmful_options")) for q in qs) >= 30


def test_answer_letters_are_balanced():
    counts = Counter(q.answer for q in load_questions("bundled").questions)
    assert max(counts.values()) - min(counts.values()) <= 0.1 * sum(counts.values())


def test_control_set_is_non_medical_and_large_enough():
    qs = load_questions("bundled:control").questions
    assert len(qs) >= 60
    assert all(not q.specialties for q in qs)


def test_statements_are_balanced_true_false():
    qs = load_questions("bundled:statements").questions
    labels = Counter(q.answer for q in qs)
    assert labels["A"] == labels["B"] and len(qs) >= 60
