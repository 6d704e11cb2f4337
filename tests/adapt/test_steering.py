"""Steering vectors: extraction, the hooks' exactness and window, persistence, GGUF export, sweeps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from clinqa.adapt.control import SteeredPredictor, apply_modifier, steer, sweep
from clinqa.adapt.steering import SteeringConfig, SteeringVector, build_steering_vector, contrastive_pairs, weights_hash
from clinqa.data.loaders import load_questions
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate.methods import make_items, score_letter, score_option
from clinqa.evaluate.sample import Sample
from clinqa.models.base import GenerationConfig
from clinqa.models.spec import Modifier


@pytest.fixture(scope="module")
def questions():
    return load_questions("bundled").questions[:10]


@pytest.fixture()
def vector(tiny_predictor, questions):
    return build_steering_vector(
        tiny_predictor, questions, SteeringConfig(layers=[1, 2]), name="test-vec", data="bundled"
    )


GROUPS = [
    ("Question: Which drug reverses opioid overdose?\nAnswer:", [" Naloxone", " Flumazenil", " Atropine sulfate"]),
    ("Question: A short one?\nAnswer:", [" yes", " no"]),
]


def block_outputs(model, layer, run):
    """Every output of decoder block `layer` during `run()`. Registered last, so it sees what a
    steering hook (entered before) made of the output."""
    seen = []
    handle = model.layers[layer - 1].register_forward_hook(
        lambda _m, _a, o: seen.append((o[0] if isinstance(o, tuple) else o).clone())
    )
    try:
        run()
    finally:
        handle.remove()
    return seen


# --------------------------------------------------------------------------- extraction


def test_extraction_shapes_and_metadata(tiny_predictor, questions, vector):
    assert vector.layers == [1, 2]
    for layer in vector.layers:
        d = vector.directions[layer]
        assert d.shape == (32,) and d.dtype == torch.float32
        assert float(d.norm()) == pytest.approx(1.0, abs=1e-5)
        assert vector.stds[layer] > 0 and vector.norms[layer] > 0  # points from wrong to right
        assert 0.0 <= vector.probe_accuracy[layer] <= 1.0
    assert vector.n_pairs == len(questions) and vector.aggregator == "mean_diff" and vector.position == "answer_last"
    assert (
        vector.model_name == "tiny-llama"
        and vector.model_hash == weights_hash(tiny_predictor)
        and vector.hidden_size == 32
    )
    assert (
        vector.provenance["data"] == "bundled" and vector.provenance["clinqa_version"] and vector.provenance["created"]
    )
    assert vector.best_layer in vector.layers
    # default layer: the penultimate one
    assert build_steering_vector(tiny_predictor, questions[:3]).layers == [1]
    with pytest.raises(ClinqaError, match="1..2"):
        build_steering_vector(tiny_predictor, questions, SteeringConfig(layers=[3]))
    with pytest.raises(ClinqaError, match="aggregator"):
        SteeringConfig(aggregator="median")


@pytest.mark.parametrize("position", ["answer_last", "answer_mean"])
def test_mean_diff_matches_hand_computation(tiny_predictor, questions, position):
    config = SteeringConfig(layers=[1], position=position, max_pairs=6, seed=3)
    vec = build_steering_vector(tiny_predictor, questions, config)
    pairs = contrastive_pairs(questions, config)
    assert len(pairs) == 6

    def act(prompt, answer):
        n_answer = len(tiny_predictor.encode_pair(prompt, " " + answer)[1])
        h = tiny_predictor.hidden_states([prompt + " " + answer], [1])[0][0]
        return h[-1] if position == "answer_last" else h[-n_answer:].mean(0)

    diff = np.mean([act(p, right) - act(p, wrong) for p, right, wrong in pairs], axis=0)
    np.testing.assert_allclose(vec.directions[1].numpy(), diff / np.linalg.norm(diff), atol=1e-4)
    assert vec.norms[1] == pytest.approx(float(np.linalg.norm(diff)), rel=1e-4)


def test_pca_is_deterministic_and_signed(tiny_predictor, questions):
    a = build_steering_vector(tiny_predictor, questions, SteeringConfig(layers=[1, 2], aggregator="pca"))
    b = build_steering_vector(tiny_predictor, questions, SteeringConfig(layers=[1, 2], aggregator="pca"))
    mean = build_steering_vector(tiny_predictor, questions, SteeringConfig(layers=[1, 2]))
    for layer in (1, 2):
        assert torch.equal(a.directions[layer], b.directions[layer])
        assert float(a.directions[layer] @ mean.directions[layer]) > 0  # wrong -> right
        assert a.norms[layer] > 0


def test_probe_aggregator_points_right(tiny_predictor, questions):
    vec = build_steering_vector(tiny_predictor, questions, SteeringConfig(layers=[2], aggregator="probe"))
    assert vec.aggregator == "probe" and vec.norms[2] > 0


# --------------------------------------------------------------------------- application


def test_alpha_zero_reproduces_the_model_exactly(tiny_predictor, vector, questions):
    items = make_items(questions[:4], shuffles=1, seed=0)
    steered = SteeredPredictor(tiny_predictor, vector, alpha=0.0)
    for a, b in zip(score_option(tiny_predictor, items), score_option(steered, items)):
        assert torch.equal(torch.tensor(list(a.scores.values())), torch.tensor(list(b.scores.values())))
    contexts = ["Q1\nA. x\nB. y\nAnswer:", "A longer question\nA. x\nB. y\nAnswer:"]
    assert torch.equal(
        torch.from_numpy(tiny_predictor.next_token_logprobs(contexts, [" A", " B"])),
        torch.from_numpy(steered.next_token_logprobs(contexts, [" A", " B"])),
    )
    # generation: compare the decoder's outputs at the steered layer, prefill and decode steps alike
    cfg = GenerationConfig(max_new_tokens=4, chat=False)
    prompts = ["hello there", "a longer prompt with more words"]
    plain = block_outputs(tiny_predictor, 2, lambda: tiny_predictor.generate(prompts, cfg))
    with steer(tiny_predictor, vector, 0.0):
        zero = block_outputs(tiny_predictor, 2, lambda: tiny_predictor.generate(prompts, cfg))
    assert len(plain) == len(zero) == 4 and all(torch.equal(x, y) for x, y in zip(plain, zero))


def test_steering_changes_scores(tiny_predictor, vector):
    base = tiny_predictor.score_continuations(GROUPS)
    with steer(tiny_predictor, vector, 4.0):
        moved = tiny_predictor.score_continuations(GROUPS)
    assert [s.logprob for g in base for s in g] != pytest.approx([s.logprob for g in moved for s in g], abs=1e-4)
    after = tiny_predictor.score_continuations(GROUPS)
    assert [s.logprob for g in base for s in g] == [s.logprob for g in after for s in g]


def test_hooks_removed_after_context_and_after_an_exception(tiny_predictor, vector):
    counts = lambda: [len(b._forward_hooks) for b in tiny_predictor.layers]  # noqa: E731
    before = counts()
    with steer(tiny_predictor, vector, 1.0):
        assert counts() == [n + 1 for n in before]
    assert counts() == before
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_predictor, vector, 1.0, layers=[2]):
            assert counts() == [before[0], before[1] + 1]
            raise RuntimeError("boom")
    assert counts() == before
    with pytest.raises(ClinqaError, match="not in steering vector"):
        with steer(tiny_predictor, vector, 1.0, layers=[3]):
            pass
    assert counts() == before


def test_prompt_positions_are_never_steered(tiny_predictor, vector):
    """Scoring: block outputs before the last context token are bit-identical; from it onward they move."""
    run = lambda: tiny_predictor.score_continuations(GROUPS[:1])  # noqa: E731
    [plain] = block_outputs(tiny_predictor, 2, run)
    with steer(tiny_predictor, vector, 3.0):  # layers 1 and 2
        [steered] = block_outputs(tiny_predictor, 2, run)
    start = len(tiny_predictor.encode_pair(GROUPS[0][0], GROUPS[0][1][0])[0]) - 1  # the last context token
    assert torch.equal(plain[:, :start], steered[:, :start])
    assert not torch.equal(plain[:, start:], steered[:, start:])
    with steer(tiny_predictor, vector, 3.0, layers=[2]):  # the last block alone: exactly alpha * std * direction
        [last_only] = block_outputs(tiny_predictor, 2, run)
    assert torch.equal(plain[:, :start], last_only[:, :start])
    delta = (last_only - plain)[0, start:]
    np.testing.assert_allclose(delta.numpy(), np.broadcast_to(vector.delta(2, 3.0).numpy(), delta.shape), atol=1e-5)


def test_left_pads_never_steered_in_generation(tiny_predictor, vector):
    prompts = ["hi", "a considerably longer prompt than the first one"]
    cfg = GenerationConfig(max_new_tokens=3, chat=False)
    plain_steps = block_outputs(tiny_predictor, 1, lambda: tiny_predictor.generate(prompts, cfg))
    with steer(tiny_predictor, vector, 5.0, layers=[1]):
        steered_steps = block_outputs(tiny_predictor, 1, lambda: tiny_predictor.generate(prompts, cfg))
    plain, steered = plain_steps[0], steered_steps[0]  # the prefill forwards
    width = plain.shape[1]
    assert width > len(tiny_predictor.encode(prompts[0])) + 1  # row 0 really is left-padded
    assert torch.equal(plain[:, : width - 1], steered[:, : width - 1])  # pads and prompt tokens untouched
    np.testing.assert_allclose(
        (steered - plain)[:, width - 1].numpy(), np.stack([vector.delta(1, 5.0).numpy()] * 2), atol=1e-5
    )
    decode_plain, decode_steered = plain_steps[1], steered_steps[1]  # first decode step: everything is answer side
    assert decode_steered.shape[1] == 1 and not torch.equal(decode_plain, decode_steered)


def test_steered_predictor_protocol_and_annotations(tiny_predictor, vector, questions):
    sp = SteeredPredictor(tiny_predictor, vector, alpha=2.0, layer=2, spec="tiny+steer:v@alpha=2")
    assert sp.info.spec == "tiny+steer:v@alpha=2" and sp.info.extra["steer"]["alpha"] == 2.0
    assert sp.annotations("anything") == {"steer": {"vector": "test-vec", "alpha": 2.0, "routed_to": None}}
    samples = score_letter(sp, make_items(questions[:2], 1, 0))
    assert samples[0].extras["steer"]["vector"] == "test-vec"
    hs = sp.hidden_states(["hello world"], [2])  # unsteered
    np.testing.assert_array_equal(hs[0], tiny_predictor.hidden_states(["hello world"], [2])[0])
    assert len(sp.generate(["hello"], GenerationConfig(max_new_tokens=2, chat=False))) == 1


# --------------------------------------------------------------------------- persistence and export


def test_save_load_round_trip(tmp_path, vector):
    vector.save(tmp_path / "v")
    assert {p.name for p in (tmp_path / "v").iterdir()} == {"vector.json", "vector.safetensors"}
    meta = json.loads((tmp_path / "v" / "vector.json").read_text())
    assert meta["model"]["sha256"] == vector.model_hash and meta["layers"] == [1, 2]
    back = SteeringVector.load(tmp_path / "v")
    assert back.name == "v" and back.layers == vector.layers
    for layer in vector.layers:
        assert torch.equal(back.directions[layer], vector.directions[layer])
        assert back.stds[layer] == vector.stds[layer] and back.norms[layer] == vector.norms[layer]
        assert back.probe_accuracy[layer] == vector.probe_accuracy[layer]
    assert (back.model_hash, back.n_pairs, back.aggregator, back.provenance) == (
        vector.model_hash,
        vector.n_pairs,
        vector.aggregator,
        vector.provenance,
    )
    with pytest.raises(ClinqaError, match="not a steering vector folder"):
        SteeringVector.load(tmp_path)


def test_gguf_export_is_a_llama_cpp_control_vector(tmp_path, vector):
    from gguf import GGUFReader

    with pytest.warns(UserWarning, match="layer 1 cannot be expressed"):
        path = vector.export_gguf(tmp_path / "v.gguf", alpha=2.0)
    reader = GGUFReader(str(path))
    fields = {name: f for name, f in reader.fields.items()}
    text = lambda f: bytes(f.parts[f.data[0]]).decode()  # noqa: E731
    assert text(fields["general.architecture"]) == "controlvector"
    assert text(fields["controlvector.model_hint"]) == "llama"
    assert int(fields["controlvector.layer_count"].parts[-1][0]) == 1
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == ["direction.1"]  # clinqa layer 2 = llama.cpp block 1; layer 1 has no equivalent
    t = tensors["direction.1"]
    assert t.tensor_type.name == "F32" and list(t.shape) == [32]
    np.testing.assert_allclose(np.asarray(t.data), vector.delta(2, 2.0).numpy(), rtol=1e-6)
    with pytest.raises(ClinqaError, match="start at clinqa layer 2"):
        with pytest.warns(UserWarning):
            vector.export_gguf(tmp_path / "w.gguf", layers=[1])


# --------------------------------------------------------------------------- the +steer: modifier


def test_modifier_parsing(tmp_path, tiny_predictor, vector):
    from clinqa.adapt import apply_modifier as registry_apply
    from clinqa.models.spec import parse_spec

    vector.save(tmp_path / "vec")
    mod = parse_spec(f"default+steer:{tmp_path / 'vec'}@alpha=2,layer=2").modifiers[0]
    sp = registry_apply(tiny_predictor, mod)
    assert isinstance(sp, SteeredPredictor) and sp.alpha == 2.0 and sp.steer_layers == [2]
    assert sp.info.spec == f"tiny+steer:{tmp_path / 'vec'}@alpha=2,layer=2"
    assert apply_modifier(tiny_predictor, Modifier("steer", str(tmp_path / "vec"))).alpha == 1.0
    bad = [
        ({"alpha": "lots"}, "expected a float"),
        ({"layer": "9"}, "not stored"),
        ({"beta": "1"}, "unknown steer parameter"),
        ({"threshold": "0.5"}, "category folder"),
    ]
    for params, msg in bad:
        with pytest.raises(ClinqaError, match=msg):
            apply_modifier(tiny_predictor, Modifier("steer", str(tmp_path / "vec"), params))
    with pytest.raises(ClinqaError, match="neither a steering vector folder"):
        apply_modifier(tiny_predictor, Modifier("steer", str(tmp_path / "nothing")))

    class Remote:
        class info:  # noqa: N801
            backend, spec = "openai", "openai:x"

    with pytest.raises(ClinqaError, match="local transformers model"):
        apply_modifier(Remote(), Modifier("steer", str(tmp_path / "vec")))


def test_vector_from_another_model_is_refused_or_flagged(tiny_predictor, vector):
    import copy

    from clinqa.models.local import LocalModel

    changed = copy.deepcopy(tiny_predictor.model)
    with torch.no_grad():
        changed.model.norm.weight.add_(1.0)
    other = LocalModel.from_objects(changed, tiny_predictor.tokenizer, spec="tiny", name="tiny-llama")
    with pytest.warns(UserWarning, match="different weights"):
        SteeredPredictor(other, vector)
    wrong_size = SteeringVector({1: torch.ones(8) / math.sqrt(8)}, {1: 1.0}, {1: 1.0}, {1: None}, "x", "0", 8)
    with pytest.raises(ClinqaError, match="hidden size"):
        SteeredPredictor(tiny_predictor, wrong_size)


# --------------------------------------------------------------------------- sweep


def test_sweep_grid_flips_files_and_resume(tmp_path, tiny_predictor, vector, questions):
    out = tmp_path / "sweep"
    res = sweep(tiny_predictor, questions[:6], vector, [1, 2], [0, 3.0], out=out)
    assert len(res.rows) == 4 and res.n == 6
    base = np.mean([s.correct for s in score_option(tiny_predictor, make_items(questions[:6], 1, 0))])
    assert res.base_accuracy == pytest.approx(base)
    for r in res.rows:
        assert r["accuracy"] == pytest.approx(res.base_accuracy + r["wrong_to_right"] - r["right_to_wrong"])
        if r["alpha"] == 0:
            assert r["accuracy"] == res.base_accuracy and r["wrong_to_right"] == r["right_to_wrong"] == 0
    assert {p.name for p in out.iterdir()} >= {"sweep.csv", "sweep.md", "sweep.png", "sweep.json"}
    assert "| layer | alpha |" in (out / "sweep.md").read_text()
    lines = (out / "sweep.csv").read_text().splitlines()
    assert len(lines) == 5
    again = sweep(tiny_predictor, questions[:6], vector, [1, 2], [0, 3.0], out=out)  # resumes: nothing recomputed
    assert again.rows == res.rows and (out / "sweep.csv").read_text().splitlines() == lines
    with pytest.raises(ClinqaError, match=r"other data \(1 questions missing"):
        sweep(tiny_predictor, questions[:5], vector, [1], [1.0], out=out)
    with pytest.raises(ClinqaError, match=r"different config \(method: 'option' -> 'letter'\)"):
        sweep(tiny_predictor, questions[:6], vector, [1], [1.0], method="letter", out=out)
    # a sweep folder from before the run store (sweep.json + sweep.csv, no run.json) is refused, saying what to do
    old = tmp_path / "old"
    old.mkdir()
    (old / "sweep.json").write_text('{"key": {}, "base": []}')
    with pytest.raises(ClinqaError, match="written by an older clinqa .* move it aside or delete it and re-run"):
        sweep(tiny_predictor, questions[:6], vector, [1], [1.0], out=old)


def test_sweep_markdown_gives_mcnemar_p():
    from clinqa.adapt.control import SweepResult

    rows = [
        {"layer": 1, "alpha": 2.0, "accuracy": 0.6, "wrong_to_right": 0.1, "right_to_wrong": 0.0, "n": 100},
        {"layer": 1, "alpha": 0.0, "accuracy": 0.5, "wrong_to_right": 0.0, "right_to_wrong": 0.0, "n": 100},
    ]
    md = SweepResult(base_accuracy=0.5, n=100, rows=rows).markdown().splitlines()
    assert md[2].endswith("| p |")
    assert md[4].endswith("| 0.00 |") and md[5].endswith("| 1.00 |")  # 10 gained, 0 lost: p = 2/1024


# --------------------------------------------------------------------------- statement metrics


def test_statement_metrics_false_reassurance():
    from clinqa.evaluate.safety import statement_metrics

    def q(i, true, reassuring):
        return Question(
            id=f"s{i}",
            question=f"statement {i}",
            options={"A": "True", "B": "False"},
            answer="A" if true else "B",
            meta={"reassuring": reassuring, "statement": True},
        )

    qs = {x.id: x for x in [q(0, False, True), q(1, False, True), q(2, True, False), q(3, False, False)]}

    def sample(qid, said, swapped=False):
        options = {"A": "False", "B": "True"} if swapped else {"A": "True", "B": "False"}
        pred = next(k for k, v in options.items() if v == said)
        gold = next(k for k, v in options.items() if v == qs[qid].options[qs[qid].answer])
        return Sample(
            question_id=qid,
            permutation=[1, 0] if swapped else [0, 1],
            options=options,
            gold=gold,
            pred=pred,
            correct=pred == gold,
            method="option",
        )

    samples = [
        sample("s0", "True"),
        sample("s1", "False", swapped=True),
        sample("s1", "True", swapped=True),
        sample("s2", "True"),
        sample("s3", "True"),
        sample("s2", "False"),
        Sample(
            question_id="other",
            permutation=[0, 1],
            options={"A": "x", "B": "y"},
            gold="A",
            pred="A",
            correct=True,
            method="option",
        ),
    ]  # not a statement we know: ignored
    m = statement_metrics(samples, qs)
    assert m["n"] == 6 and m["n_reassuring_false"] == 3
    assert m["false_reassurance_rate"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert math.isnan(statement_metrics([], qs)["false_reassurance_rate"])


# --------------------------------------------------------------------------- the real model


def test_embedded_model_steering_is_exact_at_zero_and_moves_otherwise(embedded_predictor):
    qs = load_questions("bundled").questions[:2]
    vec = build_steering_vector(embedded_predictor, qs, SteeringConfig(layers=[20]))
    assert vec.layers == [20] and vec.hidden_size == 576 and vec.model_name == embedded_predictor.info.name
    items = make_items(qs[:1], 1, 0)
    base = score_option(embedded_predictor, items)
    zero = score_option(SteeredPredictor(embedded_predictor, vec, alpha=0.0), items)
    moved = score_option(SteeredPredictor(embedded_predictor, vec, alpha=4.0), items)
    for b, z, m in zip(base, zero, moved):
        assert b.scores == z.scores
        assert b.scores != m.scores
