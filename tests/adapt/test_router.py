"""Per-category steering: the router (MiniLM or hidden-state features), category folders, routed predictors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clinqa.adapt.control import SteeredPredictor, apply_modifier, steer
from clinqa.adapt.router import Router, build_category_vectors, load_category_vectors, question_from_prompt
from clinqa.adapt.steering import SteeringConfig
from clinqa.data.loaders import load_questions
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate.prompts import cloze_prompt, generate_prompt, letter_prompt
from clinqa.models.spec import Modifier

TRAIN = {
    "cardiology": [
        "Crushing chest pain with ST elevation in the inferior leads.",
        "Which drug lowers mortality in heart failure with reduced ejection fraction?",
        "Irregularly irregular pulse with no P waves on the ECG.",
        "A harsh systolic murmur radiating to the carotids.",
        "First-line treatment for hypertension in a 50-year-old.",
        "Raised troponin after exertional angina: next step?",
        "Pericarditis with pleuritic chest pain relieved by sitting forward.",
        "Narrow complex tachycardia with palpitations.",
    ],
    "dermatology": [
        "Silvery scaly plaques on the elbows and knees.",
        "An itchy flexural rash in a child with eczema.",
        "An irregular pigmented mole with asymmetric borders that has grown.",
        "Honey-crusted lesions around the mouth of a child.",
        "A pearly nodule with telangiectasia on the nose.",
        "Target lesions on the palms after starting a new drug.",
        "Itchy burrows between the fingers spreading in a family.",
        "Comedones and inflammatory papules on a teenager's face.",
    ],
    "psychiatry": [
        "Low mood, anhedonia and early morning waking for two months.",
        "Auditory hallucinations and persecutory delusions in a young man.",
        "Recurrent panic attacks with fear of dying.",
        "Intrusive thoughts and hand-washing rituals for hours a day.",
        "Elevated mood, pressured speech and no need for sleep.",
        "Nightmares and flashbacks after an assault.",
        "A patient on lithium has a coarse tremor and confusion.",
        "Binge eating followed by self-induced vomiting.",
    ],
}
TEST = {
    "cardiology": [
        "Atrial fibrillation: how to prevent stroke?",
        "Ankle oedema and breathlessness from a failing heart.",
        "ST depression on the ECG during an exercise test.",
        "Blood pressure of 180/110 with headache.",
    ],
    "dermatology": [
        "A ring-shaped scaly itchy patch on the skin.",
        "Blistering skin rash in an elderly patient.",
        "Sunburn and a changing mole on the back.",
        "Dandruff and a greasy scaly rash on the face.",
    ],
    "psychiatry": [
        "Hearing voices that comment on his actions.",
        "Persistent sadness and thoughts of suicide.",
        "Excessive worry about everything for a year.",
        "Refuses to eat and fears gaining weight.",
    ],
}


def flat(d):
    return [t for ts in d.values() for t in ts], [c for c, ts in d.items() for _ in ts]


@pytest.fixture(scope="module")
def router():
    return Router("embed", threshold=0.5).fit(*flat(TRAIN), holdout=0.25)


def test_question_from_prompt_reads_every_prompt_format():
    q = Question(
        id="x",
        question="Which artery is occluded?\nChoose one.",
        options={"A": "RCA", "B": "LAD"},
        answer="A",
        meta={"contexts": ["An abstract."]},
    )
    stem = "Which artery is occluded?\nChoose one."
    assert question_from_prompt(cloze_prompt(q)) == stem
    assert question_from_prompt(letter_prompt(q, q.options)) == stem
    assert question_from_prompt(generate_prompt(q, q.options)) == stem
    assert question_from_prompt("just some text") == "just some text"


def test_router_routes_three_categories(tmp_path, router):
    assert router.classes == ["cardiology", "dermatology", "psychiatry"]
    assert router.metrics["n_test"] == 6 and router.routing_accuracy is not None
    texts, labels = flat(TEST)  # unseen texts
    P = router.probabilities(texts)
    np.testing.assert_allclose(P.sum(1), 1.0)
    assert np.mean([router.classes[i] == y for i, y in zip(P.argmax(1), labels)]) >= 0.9
    assert router.route(texts[:1]) == ["cardiology"]
    # below the threshold: no vector
    strict = Router.load(router.save(tmp_path / "r"))
    strict.threshold = 1.01
    assert strict.route(texts[:3]) == [None, None, None]
    # JSON round trip gives the same probabilities
    doc = json.loads((tmp_path / "r" / "router.json").read_text())
    assert doc["format"] == "clinqa.steering_router" and doc["classes"] == router.classes
    np.testing.assert_allclose(Router.load(tmp_path / "r").probabilities(texts), P, atol=1e-12)
    with pytest.raises(ClinqaError, match="at least 2 categories"):
        Router().fit(["a", "b"], ["x", "x"])


def test_binary_router_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    texts, labels = flat({k: TRAIN[k] for k in ("cardiology", "psychiatry")})
    r = Router("embed", C=0.1, threshold=0.0).fit(texts, labels, holdout=0)
    X = r.features(texts)
    clf = LogisticRegression(C=0.1, max_iter=2000, random_state=0).fit(
        (X - r.mean) / r.scale, [r.classes.index(y) for y in labels]
    )
    np.testing.assert_allclose(r.probabilities(texts), clf.predict_proba((X - r.mean) / r.scale), atol=1e-10)
    assert r.route(texts) == labels


def test_hidden_state_router(tmp_path, tiny_predictor):
    data = {
        "numbers": ["one two three", "four five six", "seven eight nine", "ten eleven twelve"] * 2,
        "colours": ["red green blue", "yellow purple pink", "orange brown black", "white grey cyan"] * 2,
    }
    r = Router("hidden", layer=1, predictor=tiny_predictor).fit(*flat(data), holdout=0)
    assert r.route(["one two three", "red green blue"]) == ["numbers", "colours"]
    r.save(tmp_path / "h")
    back = Router.load(tmp_path / "h", predictor=tiny_predictor)
    np.testing.assert_allclose(back.probabilities(["four five six"]), r.probabilities(["four five six"]))
    with pytest.raises(ClinqaError, match="hidden states"):
        Router.load(tmp_path / "h")
    with pytest.raises(ClinqaError, match="needs the model"):
        Router("hidden")


def test_router_chooses_C_and_threshold_by_cross_validation(tmp_path):
    from clinqa.adapt.router import C_GRID

    texts, labels = flat(TRAIN)
    r = Router("embed", coverage=0.5).fit(texts, labels, holdout=0)
    assert r.C is None and r.C_used in C_GRID
    y = np.array([r.classes.index(x) for x in labels])
    X = r.features(texts)
    oof = {C: r._out_of_fold(X, y, C) for C in C_GRID}
    assert (oof[r.C_used].argmax(1) == y).mean() == max((P.argmax(1) == y).mean() for P in oof.values())
    conf = oof[r.C_used].max(1)  # the threshold routes half of the out-of-fold texts
    assert (conf >= r.threshold).mean() >= 0.5 > (conf > r.threshold).mean()
    back = Router.load(r.save(tmp_path / "cv"))
    assert back.threshold == r.threshold and back.C_used == r.C_used
    assert json.loads((tmp_path / "cv" / "router.json").read_text())["C_by_cv"] is True
    with pytest.raises(ClinqaError, match="2\\+ texts per category"):
        Router().fit(texts + ["Wheeze and a prolonged expiratory phase."], labels + ["respiratory"], holdout=0)
    assert Router(C=0.1, threshold=0.5).fit(texts + ["Wheeze."], labels + ["respiratory"], holdout=0).C_used == 0.1
    small = Router().fit(texts + ["Wheeze.", "Stridor."], labels + ["respiratory"] * 2)  # too few to hold one out
    assert small.metrics["n_test"] == 0 and small.classes[-1] == "respiratory"


def test_router_metrics_confusion_and_accuracy_at_coverage(router):
    texts, labels = flat(TEST)
    m = router.evaluate(texts, labels)
    confusion = np.array(m["confusion"])
    assert confusion.sum() == len(texts) and confusion.sum(1).tolist() == [4, 4, 4]
    assert np.trace(confusion) / len(texts) == m["routing_accuracy"] == m["accuracy_at_coverage"]["1.0"]
    assert set(m["accuracy_at_coverage"]) == {"1.0", "0.9", "0.75", "0.5"}
    assert router.metrics["confusion"] and router.metrics["n_test"] == 6


def test_embed_plus_hidden_router_balances_the_two_blocks(tmp_path, tiny_predictor):
    data = {
        "numbers": ["one two three", "four five six", "seven eight nine", "ten eleven twelve"] * 2,
        "colours": ["red green blue", "yellow purple pink", "orange brown black", "white grey cyan"] * 2,
    }
    r = Router("embed+hidden", layer=1, predictor=tiny_predictor).fit(*flat(data), holdout=0)
    X = r.features(["one two three"])
    hidden = X.shape[1] - 384
    assert r._dims == [384, hidden]
    z = (r.features(flat(data)[0]) - r.mean) / r.scale  # each block carries the same total variance
    np.testing.assert_allclose(z[:, :384].var(0).sum(), z[:, 384:].var(0).sum(), rtol=0.02)
    assert r.route(["one two three", "red green blue"]) == ["numbers", "colours"]
    back = Router.load(r.save(tmp_path / "eh"), predictor=tiny_predictor)
    np.testing.assert_allclose(back.probabilities(["four five six"]), r.probabilities(["four five six"]))
    with pytest.raises(ClinqaError, match="needs the model"):
        Router("embed+hidden", layer=1)


def test_category_vectors_folder_and_routed_predictor(tmp_path, tiny_predictor):
    allq = load_questions("bundled").questions
    cats = ["cardiology", "neurology", "pediatrics"]
    qs = [q for c in cats for q in [x for x in allq if x.specialties[0] == c][:6]]
    out = tmp_path / "by_specialty"
    calls = []
    index = build_category_vectors(
        tiny_predictor,
        qs,
        "specialty",
        SteeringConfig(layers=[1, 2]),
        out,
        progress=lambda d, t: calls.append((d, t)),
        data="bundled",
    )
    assert sorted(index["categories"]) == cats and calls[-1] == (36, 36)
    assert json.loads((out / "vectors.json").read_text()) == index
    assert index["router"]["routing_accuracy"] is not None and index["router"]["mode"] == "embed"
    for c in cats:
        assert (out / c / "vector.safetensors").is_file() and index["categories"][c]["n_pairs"] == 6
    vectors, router = load_category_vectors(out)
    assert sorted(vectors) == cats and vectors["neurology"].category == "neurology"

    sp = apply_modifier(tiny_predictor, Modifier("steer", str(out), {"alpha": "3", "layer": "2"}))
    assert isinstance(sp, SteeredPredictor) and sp.routed
    cost = sp.cost()  # one layer of each of 3 vectors, plus the router's weights; build and fit seconds
    hidden = tiny_predictor.model.config.hidden_size
    assert (
        cost["extra_params"] == 3 * hidden + np.size(router.coef) + np.size(router.intercept) and cost["training_s"] > 0
    )
    cardio, neuro = qs[0], qs[6]
    groups = [(cloze_prompt(q), [" " + v for v in q.options.values()]) for q in (cardio, neuro)]
    ann = sp.annotations(groups[0][0])["steer"]
    assert ann == {"vector": "by_specialty/cardiology", "alpha": 3.0, "routed_to": "cardiology"}
    got = sp.score_continuations(groups)
    for (ctx, conts), scores, cat in zip(groups, got, ["cardiology", "neurology"]):
        with steer(tiny_predictor, vectors[cat], 3.0, layers=[2]):
            want = tiny_predictor.score_continuations([(ctx, conts)])[0]
        assert [s.logprob for s in scores] == [s.logprob for s in want]
    # nothing confident enough: answered unsteered, recorded as such
    none = apply_modifier(tiny_predictor, Modifier("steer", str(out), {"threshold": "1.01"}))
    assert none.annotations(groups[0][0])["steer"] == {"vector": None, "alpha": 1.0, "routed_to": None}
    base = tiny_predictor.score_continuations(groups)
    assert torch.equal(
        torch.tensor([[s.logprob for s in g] for g in none.score_continuations(groups)]),
        torch.tensor([[s.logprob for s in g] for g in base]),
    )
    with pytest.raises(ClinqaError, match="at least 2 categories"):
        build_category_vectors(tiny_predictor, qs, "topic", SteeringConfig(layers=[1]), tmp_path / "x")


@pytest.mark.embedded
def test_steer_build_command_per_specialty_on_a_part(tmp_path):
    from typer.testing import CliRunner

    from clinqa.cli import app

    out = tmp_path / "by"
    r = CliRunner().invoke(
        app,
        [
            "steer",
            "build",
            "default",
            "bundled",
            "--by",
            "specialty",
            "--part",
            "0/2",
            "--layers",
            "29",
            "--max-pairs",
            "2",
            "--coverage",
            "0.8",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    index = json.loads((out / "vectors.json").read_text())
    assert index["data"] == "bundled (part 0/2)" and all(c["n_questions"] == 17 for c in index["categories"].values())
    router = index["router"]
    assert router["mode"] == "embed" and router["n_train"] + router["n_test"] == 102 and len(router["confusion"]) == 6
    assert json.loads((out / "router" / "router.json").read_text())["coverage"] == 0.8
