"""Annotations -> a labelled question file the per-specialty commands read back."""

import json

import numpy as np
import pytest

from clinqa.data.loaders import load_questions, write_questions
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.specialties.annotate import SPECIALTY_IDS, Annotation
from clinqa.specialties.label import conformal_sets, embedding_annotations, gold_labels, labelled_questions

CARD, NEURO = SPECIALTY_IDS.index("cardiology"), SPECIALTY_IDS.index("neurology")


def q(i, specialties=()):
    return Question(
        id=f"q{i}",
        question=f"Question {i}?",
        options={"A": "yes", "B": "no"},
        answer="A",
        specialties=list(specialties),
        meta={"kept": i},
    )


def probs(p_card, p_neuro):
    row = np.full(len(SPECIALTY_IDS), (1 - p_card - p_neuro) / (len(SPECIALTY_IDS) - 2))
    row[CARD], row[NEURO] = p_card, p_neuro
    return row


def test_majority_labels_round_trip_through_the_native_loader(tmp_path):
    qs = [q(0, ["pediatrics"]), q(1)]
    anns = [
        Annotation("q0", {"cardiology": 3, "neurology": 2}, "cardiology", list(probs(0.6, 0.3)), []),
        Annotation("q1", {"cardiology": 2, "neurology": 2, "pediatrics": 1}, None, list(probs(0.4, 0.4)), []),
    ]
    out = labelled_questions(qs, anns)
    assert [x.specialties for x in out] == [["cardiology"], []]  # below the vote threshold: kept, unlabelled
    assert out[0].meta["kept"] == 0 and out[0].meta["specialty_annotation"]["original_specialties"] == ["pediatrics"]
    path = write_questions(tmp_path / "labelled.jsonl", out)
    back = load_questions(str(path)).questions
    assert [x.specialties for x in back] == [["cardiology"], []]
    assert [x.id for x in load_questions(str(path), specialties=["cardiology"]).questions] == ["q0"]
    assert (
        json.loads(path.read_text().splitlines()[0])["meta"]["specialty_annotation"]["labels_from"] == "majority vote"
    )


def test_conformal_sets_calibrated_elsewhere_give_several_labels_to_ambiguous_questions():
    cal_probs = [probs(0.8, 0.1)] * 10 + [probs(0.1, 0.8)] * 10
    cal_gold = [["cardiology"]] * 10 + [["neurology"]] * 10
    sets, cal = conformal_sets(cal_probs, cal_gold, [probs(0.85, 0.1), probs(0.45, 0.45)], alpha=0.1)
    # k = ceil(21 * 0.9) = 19th smallest score 1 - p(gold) = 0.2: a label needs p >= 0.8
    assert cal.n == 20 and cal.qhat == pytest.approx(0.2)
    assert sets == [["cardiology"], [SPECIALTY_IDS[CARD]]]  # the ambiguous one falls back to its argmax alone
    hard = [probs(0.4, 0.5)] * 2  # two hard cardiology items: the 19th score is now 0.6, so p >= 0.4 enters
    sets, cal = conformal_sets(cal_probs[:8] + hard + cal_probs[10:], cal_gold, [probs(0.45, 0.45)], alpha=0.1)
    assert cal.qhat == pytest.approx(0.6) and set(sets[0]) == {"cardiology", "neurology"}
    anns = [Annotation("q0", {"cardiology": 1}, "cardiology", list(probs(0.45, 0.45)), ["cardiology"])]
    out = labelled_questions([q(0)], anns, sets)
    assert set(out[0].specialties) == {"cardiology", "neurology"}
    assert out[0].meta["specialty_annotation"]["labels_from"] == "conformal set"


def test_bad_input_is_named():
    with pytest.raises(ClinqaError, match="'q1' has no specialties"):
        gold_labels([q(0, ["cardiology"]), q(1)], "cal.jsonl")
    with pytest.raises(ClinqaError, match="shape"):
        embedding_annotations(np.zeros((1, 3)), [q(0)])
    with pytest.raises(ClinqaError, match="'q0' has no annotation"):
        labelled_questions([q(0)], [])
    with pytest.raises(ClinqaError, match="too few"):
        conformal_sets([probs(0.8, 0.1)] * 3, [["cardiology"]] * 3, [probs(0.8, 0.1)], alpha=0.05)


def test_embedding_annotations_take_the_most_probable_label():
    (a,) = embedding_annotations(np.array([probs(0.2, 0.7)]), [q(0)])
    assert a.label == "neurology" and a.votes == {"neurology": 1} and len(a.probs) == len(SPECIALTY_IDS)


class FakeMiniLM:
    """Duck-typed EmbeddingAnnotator: cardiology for 'heart', else neurology; counts fits and predictions."""

    def __init__(self):
        self.coef_, self.include_options, self.embedding_model = None, False, "fake-minilm"
        self.C, self.random_state, self.max_iter = 1.0, 0, 100
        self.fits, self.predicted = 0, []

    def fit(self, questions):
        self.fits += 1
        self.coef_ = np.zeros((15, 2))
        return self

    def predict_proba(self, qs):
        self.predicted += [x.id for x in qs]
        return np.array([probs(0.7, 0.2) if "heart" in x.question else probs(0.1, 0.8) for x in qs])


def test_minilm_annotations_go_to_a_resumable_run_folder(tmp_path):
    from clinqa.specialties.annotate import read_annotations
    from clinqa.specialties.label import minilm_to_run

    train = [q(10, ["cardiology"]), q(11, ["neurology"])]
    qs = [q(0).model_copy(update={"question": "heart murmur?"}), q(1)]
    out = tmp_path / "ann"
    fake = FakeMiniLM()
    anns = minilm_to_run(out, qs[:1], train, "train.jsonl", annotator=fake)
    assert [a.label for a in anns] == ["cardiology"] and fake.fits == 1 and fake.predicted == ["q0"]
    meta = json.loads((out / "run.json").read_text())
    assert meta["kind"] == "annotate" and meta["config"]["annotator"] == "minilm"
    assert meta["config"]["train"] == "train.jsonl" and meta["config"]["embedding_model"] == "fake-minilm"
    again = FakeMiniLM()
    anns = minilm_to_run(out, qs, train, "train.jsonl", annotator=again)
    assert again.predicted == ["q1"] and [a.label for a in anns] == ["cardiology", "neurology"]
    assert [a.label for a in read_annotations(out)] == ["cardiology", "neurology"]
    done = FakeMiniLM()
    minilm_to_run(out, qs, train, "train.jsonl", annotator=done)
    assert done.fits == 0 and done.predicted == []  # nothing left: not even fitted
    other_train = [train[0], q(11, ["pediatrics"])]
    with pytest.raises(ClinqaError, match="train_questions: "):
        minilm_to_run(out, qs, other_train, "train.jsonl", annotator=FakeMiniLM())
