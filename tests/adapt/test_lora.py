"""LoRA training (clinqa.adapt.lora) on the tiny random Llama: examples, training, checkpoints and
resume, the finished-folder and wrong-config rules, and the +lora: modifier on a LocalModel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clinqa.adapt import lora
from clinqa.adapt.lora import (
    LoraTrainConfig,
    apply_modifier,
    balance_by_specialty,
    build_examples,
    finetune,
    split_train_val,
)
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate.prompts import cloze_prompt, letter_prompt
from clinqa.models.spec import Modifier

pytestmark = [pytest.mark.usefixtures("one_thread")]

DRUGS = ["Aspirin", "Heparin", "Atropine", "Adenosine", "Amiodarone", "Digoxin", "Furosemide", "Metoprolol"]


def make_questions(n: int = 16, prefix: str = "q") -> list[Question]:
    out = []
    for i in range(n):
        opts = {k: DRUGS[(i + j) % len(DRUGS)] for j, k in enumerate("ABCD")}
        out.append(
            Question(
                id=f"{prefix}{i:02d}",
                question=f"Case {i}: which drug is first line for finding {i}?",
                options=opts,
                answer="ABCD"[i % 4],
                specialties=["cardiology" if i % 2 else "neurology"],
            )
        )
    return out


# tiny and fast; a high rate because the adapter starts at zero and we only take a few steps
FAST = dict(
    rank=8,
    alpha=16,
    dropout=0.1,
    learning_rate=3e-2,
    batch_size=4,
    max_length=48,
    val_fraction=0.25,
    warmup_fraction=0.0,
)


_TRAINED: dict[str, object] = {}


@pytest.fixture()
def adapters(tiny_predictor, tmp_path_factory):
    """Two adapters on the same tiny base, trained once per session: A from the plain base, B (another
    seed) from a predictor that already has A loaded, which must not leak into B or change A."""
    if not _TRAINED:
        root = tmp_path_factory.mktemp("adapters")
        weights = {k: v.clone() for k, v in tiny_predictor.model.state_dict().items()}
        a = finetune(
            tiny_predictor,
            make_questions(),
            LoraTrainConfig(epochs=4, patience=None, **FAST),
            root / "a",
            metadata={"control": True, "note": "test"},
        )
        _TRAINED["base_unchanged"] = all(
            torch.equal(v, weights[k]) for k, v in tiny_predictor.model.state_dict().items()
        )
        with_a = tiny_predictor.load_adapter(a.path)
        before = with_a.score_continuations(GROUPS)
        b = finetune(with_a, make_questions(), LoraTrainConfig(epochs=2, seed=1, **FAST), root / "b")
        _TRAINED.update(a=a, b=b, a_scores_before_b=before, a_scores_after_b=with_a.score_continuations(GROUPS))
    return _TRAINED


GROUPS = [(cloze_prompt(q), [" " + v for v in q.options.values()]) for q in make_questions(4, prefix="s")]


def logprobs(pred) -> np.ndarray:
    return np.array([[s.logprob for s in row] for row in pred.score_continuations(GROUPS)])


# -- examples, splits, config ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["cloze", "letter"])
def test_labels_mask_exactly_the_prompt(tiny_predictor, tokenizer, fmt):
    qs = make_questions(3)
    examples = build_examples(tokenizer, qs, LoraTrainConfig(prompt_format=fmt))
    for q, ex in zip(qs, examples):
        prompt, answer = (
            (cloze_prompt(q), " " + q.options[q.answer])
            if fmt == "cloze"
            else (letter_prompt(q, q.options), " " + q.answer)
        )
        ctx, cont = tiny_predictor.encode_pair(prompt, answer)  # the scoring path's tokenisation
        assert ex["input_ids"] == ctx + cont + [tokenizer.eos_token_id]
        assert ex["labels"] == [-100] * len(ctx) + cont + [tokenizer.eos_token_id]
        if fmt == "letter":
            assert len(cont) == 1


def test_long_prompt_is_cut_from_the_left(tokenizer):
    q = make_questions(1)[0]
    full = build_examples(tokenizer, [q], LoraTrainConfig())[0]
    cut = build_examples(tokenizer, [q], LoraTrainConfig(max_length=12))[0]
    assert len(cut["input_ids"]) == 12
    assert cut["input_ids"] == full["input_ids"][-12:] and cut["labels"] == full["labels"][-12:]
    assert cut["labels"][0] == -100


def test_split_is_deterministic_and_order_free():
    qs = make_questions(20)
    train, val = split_train_val(qs, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18 and not {q.id for q in train} & {q.id for q in val}
    train2, val2 = split_train_val(list(reversed(qs)), 0.1, seed=3)
    assert {q.id for q in val2} == {q.id for q in val}
    assert split_train_val(qs[:5], 0.01, 0)[1] and split_train_val(qs, 0.0, 0)[1] == []


def test_balance_subsamples_to_the_smallest():
    qs = make_questions(20)
    groups = {"cardiology": qs[:9], "neurology": qs[9:13], "pediatrics": qs[13:]}
    out = balance_by_specialty(groups, seed=0)
    assert {k: len(v) for k, v in out.items()} == {"cardiology": 4, "neurology": 4, "pediatrics": 4}
    assert out == balance_by_specialty(groups, seed=0)
    assert out["neurology"] == qs[9:13]
    assert all(set(q.id for q in out[k]) <= set(q.id for q in groups[k]) for k in groups)


def test_bad_config_names_the_field():
    with pytest.raises(ClinqaError, match="prompt_format"):
        LoraTrainConfig(prompt_format="chat")
    with pytest.raises(ClinqaError, match="val_fraction"):
        LoraTrainConfig(val_fraction=1.0)
    with pytest.raises(ClinqaError, match="quantization"):
        LoraTrainConfig(quantization="8bit")


def test_target_modules_are_all_block_projections(tiny_predictor):
    assert lora.find_target_modules(tiny_predictor.model) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def test_early_stopping_stops_where_counted_by_hand(tiny_predictor, tmp_path, monkeypatch):
    # the Trainer path with a scripted validation loss: the initial one, then one per epoch
    from clinqa.adapt import lora_trainer

    script = iter([6.0, 5.0, 4.0, 4.5, 3.9, 4.2, 4.1, 3.0, 2.0])
    monkeypatch.setattr(lora_trainer, "mean_answer_loss", lambda *a, **k: next(script))  # reads `script` when called
    # by hand, patience 2: best 5.0 (1), 4.0 (2), 4.5 worse (1 bad), 3.9 best (4), 4.2 (1 bad), 4.1 (2 bad): stop after
    # epoch 6 with epoch 4's adapter; 12 training questions in batches of 4 are 3 steps an epoch
    cfg = LoraTrainConfig(epochs=9, patience=2, **FAST)
    res = finetune(tiny_predictor, make_questions(), cfg, tmp_path / "es", keep_checkpoint=True)
    m = res.metadata
    assert [h["val_loss"] for h in m["history"]] == [5.0, 4.0, 4.5, 3.9, 4.2, 4.1]
    assert m["initial_val_loss"] == 6.0 and m["stopped_early"] and m["epochs_run"] == 6
    assert m["best_epoch"] == 4 and m["best_val_loss"] == 3.9 and m["steps"] == 18 and m["total_steps"] == 27
    # the adapter written is the one checkpointed at the end of epoch 4 (step 12), not the last one (step 18)
    final = load_file(str(res.path / "adapter_model.safetensors"))
    at = {
        s: load_file(str(res.path / "checkpoint" / f"checkpoint-{s}" / "adapter_model.safetensors")) for s in (12, 18)
    }
    assert all(torch.equal(final[k], at[12][k]) for k in final)
    assert any(not torch.equal(final[k], at[18][k]) for k in final)

    # killed in epoch 6 (one bad epoch counted so far), resumed from the end of epoch 5: the restored patience
    # counter stops it after epoch 6 again (a fresh counter would train on to epoch 7's 3.0), with the same adapter
    script = iter([6.0, 5.0, 4.0, 4.5, 3.9, 4.2, 4.1, 3.0, 2.0])

    def kill_at_16(step, total, loss):
        if step == 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_predictor, make_questions(), cfg, tmp_path / "killed", progress=kill_at_16)
    script = iter([4.1, 3.0, 2.0])
    resumed = finetune(tiny_predictor, make_questions(), cfg, tmp_path / "killed")
    assert resumed.resumed_from == 15 and resumed.metadata["resumes"] == 1
    assert resumed.history == m["history"] and resumed.metadata["best_epoch"] == 4 and resumed.metadata["steps"] == 18
    again = load_file(str(resumed.path / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_answer_loss_matches_a_computation_by_hand(tiny_predictor, tokenizer):
    from clinqa.adapt.lora_data import AnswerCollator, answer_loss_sum

    examples = build_examples(tokenizer, make_questions(3), LoraTrainConfig())
    batch = AnswerCollator(tokenizer.pad_token_id)(examples)
    model = tiny_predictor.model
    with torch.no_grad():
        got, n = answer_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        want, count = 0.0, 0
        for ex in examples:  # one unpadded example at a time, full logits, the answer tokens picked out by hand
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for pos, label in enumerate(ex["labels"]):
                if label != -100:
                    want -= float(logp[pos - 1, label])
                    count += 1
    assert n == count == sum(len(ex["labels"]) - ex["labels"].count(-100) for ex in examples)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_first_step_loss_is_the_base_models_answer_loss_on_its_batches(tiny_predictor, tokenizer, tmp_path):
    # what the Trainer trains on in step 1 (grad_accum 2: two batches of this seed's epoch order, answer
    # tokens only, one mean over both) is what the untouched base model scores by hand on those examples
    from clinqa.adapt.lora_data import epoch_batches

    cfg = LoraTrainConfig(
        epochs=1, patience=None, grad_accum=2, **{**FAST, "dropout": 0.0, "batch_size": 3, "val_fraction": 0.0}
    )
    qs = make_questions()
    losses = []
    finetune(tiny_predictor, qs, cfg, tmp_path / "one", progress=lambda s, t, loss: losses.append(loss))
    examples = build_examples(tokenizer, qs, cfg)
    first = [examples[i] for b in epoch_batches([len(e["input_ids"]) for e in examples], 3, cfg.seed, 0)[:2] for i in b]
    assert len(losses) == 1 + 3 and losses[0] is None
    assert losses[1] == pytest.approx(
        lora.answer_loss(tiny_predictor, [q for q in qs if q.id in {e["id"] for e in first}], cfg), rel=1e-5
    )


def test_epoch_order_is_seeded_grouped_by_length_and_covers_every_example():
    from clinqa.adapt.lora_data import EpochSampler, epoch_batches

    lengths = [(7 * i) % 13 + 1 for i in range(39)]
    b0 = epoch_batches(lengths, 4, seed=1, epoch=0)  # 39 = 9 full batches of 4 and a short one of 3, which stays last
    assert sorted(i for b in b0 for i in b) == list(range(39)) and [len(b) for b in b0] == [4] * 9 + [3]
    assert all(lengths[b[j]] >= lengths[b[j + 1]] for b in b0 for j in range(len(b) - 1))  # sorted within a batch
    assert b0 == epoch_batches(lengths, 4, seed=1, epoch=0) and b0 != epoch_batches(lengths, 4, seed=1, epoch=1)
    assert b0 != epoch_batches(lengths, 4, seed=2, epoch=0)
    sampler = EpochSampler(lengths, 4, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) == [i for b in epoch_batches(lengths, 4, seed=1, epoch=1) for i in b] and len(sampler) == 39


# -- training --------------------------------------------------------------------------------------
def test_training_lowers_loss_and_writes_metadata(adapters, tiny_predictor):
    a = adapters["a"]
    for f in ("adapter_config.json", "adapter_model.safetensors", "clinqa_adapter.json"):
        assert (a.path / f).is_file()
    assert not (a.path / "checkpoint").exists() and not (a.path / "clinqa_train.json").exists()
    meta = json.loads((a.path / "clinqa_adapter.json").read_text())
    assert meta == lora.load_adapter_metadata(a.path) == a.metadata
    hist = meta["history"]
    assert len(hist) == 4 and hist[-1]["train_loss"] < hist[0]["train_loss"] - 1.0
    assert meta["best_val_loss"] < meta["initial_val_loss"]
    assert meta["n_train"] == 12 and meta["n_val"] == 4 and meta["steps"] == meta["total_steps"] == 12
    assert meta["config"]["rank"] == 8 and meta["quantization"] == "none" and meta["control"] is True
    assert meta["extra"] == {"control": True, "note": "test"}
    assert set(meta["specialties"]) == {"cardiology", "neurology"}
    assert meta["base"]["spec"] == "tiny" and meta["base"]["name"] == "tiny-llama"
    assert meta["trainable_params"] > 0 and meta["tokens_per_second"] > 0 and meta["peak_memory_mb"] > 0
    assert meta["target_modules"] == lora.find_target_modules(tiny_predictor.model)
    assert meta["best_epoch"] == min(hist, key=lambda h: h["val_loss"])["epoch"]
    # the adapter raises the likelihood of the answers it was trained on, scored the `option` way
    train = [q for q in make_questions() if q.id in meta["train_ids"]]
    groups = [(cloze_prompt(q), [" " + q.options[q.answer]]) for q in train]
    base_lp = sum(r[0].logprob for r in tiny_predictor.score_continuations(groups))
    tuned_lp = sum(r[0].logprob for r in tiny_predictor.load_adapter(a.path).score_continuations(groups))
    assert tuned_lp > base_lp + 5


def test_training_leaves_the_base_model_alone(adapters, tiny_predictor):
    assert adapters["base_unchanged"]  # training A trained a copy
    # training B from a predictor with A loaded changed neither A's view nor the shared model
    assert all(
        x.logprob == y.logprob
        for r1, r2 in zip(adapters["a_scores_before_b"], adapters["a_scores_after_b"])
        for x, y in zip(r1, r2)
    )
    assert adapters["b"].metadata["base"]["n_params"] == adapters["a"].metadata["base"]["n_params"]
    keys = load_file(str(adapters["b"].path / "adapter_model.safetensors")).keys()
    assert all("lora_A.weight" in k or "lora_B.weight" in k for k in keys) and len(keys) == 2 * 7 * 2


def test_finished_folder_returns_without_training(adapters, tiny_predictor):
    a = adapters["a"]

    def boom(*_):
        raise AssertionError("a finished adapter must not train again")

    again = finetune(
        tiny_predictor, make_questions(), LoraTrainConfig(epochs=4, patience=None, **FAST), a.path, progress=boom
    )
    assert again.cached and again.metadata == a.metadata


def test_different_config_is_refused(adapters, tiny_predictor, tmp_path):
    a = adapters["a"]
    with pytest.raises(ClinqaError, match=r"rank: 8 -> 4"):
        finetune(
            tiny_predictor, make_questions(), LoraTrainConfig(epochs=4, patience=None, **{**FAST, "rank": 4}), a.path
        )
    with pytest.raises(ClinqaError, match="1 training questions missing, first: q15"):
        finetune(tiny_predictor, make_questions(15), LoraTrainConfig(epochs=4, patience=None, **FAST), a.path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ClinqaError, match="not a clinqa adapter folder"):
        finetune(tiny_predictor, make_questions(), LoraTrainConfig(**FAST), tmp_path / "other")


def test_early_stopping_keeps_the_best_adapter(tiny_predictor, tmp_path):
    # validation questions ask the training questions again with another answer: the better the
    # adapter learns the training answers, the worse the validation loss after the first epoch
    ids = [f"e{i:02d}" for i in range(12)]
    placeholder = [Question(id=i, question="x", options={"A": "a", "B": "b"}, answer="A") for i in ids]
    _, val = split_train_val(placeholder, 0.25, 0)
    val_ids = {q.id for q in val}
    qs = [
        Question(
            id=i,
            question=f"Which drug for case {k % 3}?",
            options={"A": "Aspirin", "B": "Heparin"},
            answer="B" if i in val_ids else "A",
        )
        for k, i in enumerate(ids)
    ]
    cfg = LoraTrainConfig(epochs=8, patience=2, **{**FAST, "learning_rate": 5e-2})
    res = finetune(tiny_predictor, qs, cfg, tmp_path / "es")
    m = res.metadata
    assert m["stopped_early"] and m["epochs_run"] < 8 and m["steps"] < m["total_steps"]
    vals = [h["val_loss"] for h in m["history"]]
    assert m["best_epoch"] == 1 + int(np.argmin(vals)) and m["epochs_run"] == m["best_epoch"] + 2
    # the saved adapter is the best epoch's, not the last one's
    tuned = tiny_predictor.load_adapter(res.path)
    loss = lora.answer_loss(tuned, [q for q in qs if q.id in val_ids], cfg)
    assert loss == pytest.approx(m["best_val_loss"], rel=1e-4)
    assert loss != pytest.approx(vals[-1], rel=1e-4)


def test_resume_after_kill_matches_uninterrupted_run(tiny_predictor, tmp_path):
    cfg = LoraTrainConfig(epochs=2, patience=None, **FAST)  # 3 steps per epoch, dropout on
    qs = make_questions()
    whole = finetune(tiny_predictor, qs, cfg, tmp_path / "whole", checkpoint_every=2)

    calls = []

    def kill_at_5(step, total, loss):
        calls.append((step, loss))
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_predictor, qs, cfg, tmp_path / "killed", checkpoint_every=2, progress=kill_at_5)
    assert (
        tmp_path / "killed" / "checkpoint" / "checkpoint-4" / "clinqa_state.json"
    ).is_file()  # the Trainer's checkpoint
    assert not (tmp_path / "killed" / "clinqa_adapter.json").exists()
    with pytest.raises(ClinqaError, match="learning_rate"):
        finetune(
            tiny_predictor,
            qs,
            LoraTrainConfig(epochs=2, patience=None, **{**FAST, "learning_rate": 1e-3}),
            tmp_path / "killed",
        )

    calls.clear()
    resumed = finetune(
        tiny_predictor, qs, cfg, tmp_path / "killed", checkpoint_every=2, progress=lambda s, t, l: calls.append((s, l))
    )
    assert resumed.resumed_from == 4 and calls[0] == (4, None) and [s for s, _ in calls[1:]] == [5, 6]
    assert resumed.metadata["steps"] == whole.metadata["steps"] == 6 and resumed.metadata["resumes"] == 1
    for h1, h2 in zip(resumed.history, whole.history):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-5)
        assert h1["val_loss"] == pytest.approx(h2["val_loss"], rel=1e-5)
    w1 = load_file(str(whole.path / "adapter_model.safetensors"))
    w2 = load_file(str(resumed.path / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_weights_and_is_not_identity(tiny_predictor, tmp_path):
    cfg = LoraTrainConfig(epochs=1, patience=None, **FAST)  # dropout on: its masks must be replayed
    qs = make_questions()
    plain = finetune(tiny_predictor, qs, cfg, tmp_path / "plain")
    ckpt_cfg = LoraTrainConfig(epochs=1, patience=None, gradient_checkpointing=True, **FAST)
    ckpt = finetune(tiny_predictor, qs, ckpt_cfg, tmp_path / "ckpt")
    assert ckpt.metadata["config"]["gradient_checkpointing"] is True
    base_model = tiny_predictor.model  # the shared base is left as it was (the property's newer name where it has one)
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(base_model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    assert not getattr(base_model, flag, False)
    import platform

    assert lora.fix_mmap_threshold() == (platform.libc_ver()[0] == "glibc")
    w1 = load_file(str(plain.path / "adapter_model.safetensors"))
    w2 = load_file(str(ckpt.path / "adapter_model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-6)
    # a memory knob: the finished plain adapter is returned as is when asked with checkpointing on
    assert finetune(tiny_predictor, qs, ckpt_cfg, tmp_path / "plain").cached


# -- the +lora: modifier --------------------------------------------------------------------------
def test_apply_modifier_loads_the_adapter(adapters, tiny_predictor):
    base = logprobs(tiny_predictor)
    tuned = apply_modifier(tiny_predictor, Modifier("lora", str(adapters["a"].path)))
    assert tuned.adapter is not None and tuned.info.extra["adapter"] == tuned.adapter
    assert not np.allclose(logprobs(tuned), base, atol=1e-3)
    assert np.array_equal(logprobs(tuned.with_adapter(None)), base)
    assert np.array_equal(logprobs(tiny_predictor), base)
    # a view made in code names its adapter as the +lora: spec does, and its base view names none
    spec = f"tiny+lora:{adapters['a'].path}"
    assert tuned.info.spec == tiny_predictor.load_adapter(adapters["a"].path).info.spec == spec
    assert tuned.with_adapter(tuned.adapter).info.spec == spec.replace(
        str(adapters["a"].path), str(adapters["a"].path.resolve())
    )
    assert tuned.with_adapter(None).info.spec == tiny_predictor.info.spec == "tiny"


def test_two_adapters_on_one_base_switch_without_reloading(adapters, tiny_predictor, tokenizer):
    va = apply_modifier(tiny_predictor, Modifier("lora", str(adapters["a"].path)))
    vb = apply_modifier(tiny_predictor, Modifier("lora", str(adapters["b"].path), {"name": "bee"}))
    assert vb.adapter == "bee" and va.model is vb.model
    sa, sb, sa2 = logprobs(va), logprobs(vb), logprobs(va)
    assert not np.allclose(sa, sb, atol=1e-3)
    assert np.array_equal(sa, sa2)
    # each equals the same adapter loaded alone on a fresh copy of the base
    for key, got in (("a", sa), ("b", sb)):
        fresh_base = _fresh_tiny(tiny_predictor, tokenizer)
        np.testing.assert_allclose(logprobs(fresh_base.load_adapter(adapters[key].path)), got, rtol=0, atol=1e-5)


def test_loading_an_adapter_shows_no_peft_deprecation_warning(adapters, tiny_predictor, tokenizer):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fresh_tiny(tiny_predictor, tokenizer).load_adapter(adapters["a"].path)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def _fresh_tiny(pred, tokenizer):
    """A new LocalModel with the tiny base's weights (without any LoRA layers)."""
    import copy

    from clinqa.models.local import LocalModel

    peft = pred._shared["peft"]
    model = copy.deepcopy(peft).unload() if peft is not None else copy.deepcopy(pred.model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return LocalModel.from_objects(model, tokenizer, spec="tiny", name="tiny-llama")


def test_apply_modifier_errors(adapters, tiny_predictor, tmp_path):
    with pytest.raises(ClinqaError, match="no such LoRA adapter folder"):
        apply_modifier(tiny_predictor, Modifier("lora", str(tmp_path / "missing")))
    with pytest.raises(ClinqaError, match="not a LoRA adapter folder"):
        apply_modifier(tiny_predictor, Modifier("lora", str(tmp_path)))

    class Remote:
        info = type("I", (), {"backend": "openai"})()

    with pytest.raises(ClinqaError, match="LoRA adapters need a local model backend"):
        apply_modifier(Remote(), Modifier("lora", str(adapters["a"].path)))
    with pytest.raises(ClinqaError, match="only @name"):
        apply_modifier(tiny_predictor, Modifier("lora", str(adapters["a"].path), {"alpha": "2"}))
    tiny_predictor.info.hidden_size = 64
    with pytest.raises(ClinqaError, match="hidden_size 32"):
        apply_modifier(tiny_predictor, Modifier("lora", str(adapters["a"].path)))
    with pytest.raises(ClinqaError, match="no clinqa_adapter.json"):
        lora.load_adapter_metadata(tmp_path)


def test_spec_string_base_trains_like_the_loaded_model(tiny_predictor, tokenizer, tmp_path):
    # a spec string is loaded afresh from its folder; the result equals training on the LocalModel.
    # Also covers gradient accumulation and training without a validation set.
    folder = tmp_path / "tiny-model"
    tiny_predictor.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = LoraTrainConfig(epochs=1, patience=None, grad_accum=2, **{**FAST, "batch_size": 3, "val_fraction": 0.0})
    from_obj = finetune(tiny_predictor, make_questions(), cfg, tmp_path / "obj")
    from_spec = finetune(str(folder), make_questions(), LoraTrainConfig(**cfg.to_dict()), tmp_path / "spec")
    for res in (from_obj, from_spec):
        m = res.metadata
        assert m["n_val"] == 0 and m["initial_val_loss"] is None and m["best_epoch"] == 1
        assert m["steps"] == 3  # 16 questions / batch 3 = 6 batches, 2 per step
    assert from_spec.metadata["base"]["source"] == str(folder)
    w1 = load_file(str(from_obj.path / "adapter_model.safetensors"))
    w2 = load_file(str(from_spec.path / "adapter_model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-6)


# -- generic (prompt, target) examples and sequential training ----------------------------------------
def yes_no_examples(n: int = 16) -> list[lora.TextExample]:
    """A task a tiny model can learn: the answer is " yes" exactly when the entry names the asked drug."""
    out = []
    for i in range(n):
        asked, shown = DRUGS[i % 4], DRUGS[(i // 2) % 4] if i % 2 else DRUGS[i % 4]
        out.append(
            lora.TextExample(
                id=f"t{i:02d}",
                prompt=f"Is {asked} in the entry <<<{shown} 5 mg>>>? Answer:",
                target=" yes" if asked == shown else " no",
                label="stage1",
            )
        )
    return out


def test_text_examples_mask_the_prompt_and_use_the_chat_template(tiny_predictor, tokenizer):
    from clinqa.models.base import GenerationConfig

    plain, chat = (
        lora.TextExample("p", "Question: x? Answer:", " yes"),
        lora.TextExample("c", "What is x?", "x is 5.", system="Be brief.", chat=True),
    )
    ex_plain, ex_chat = build_examples(tokenizer, [plain, chat], LoraTrainConfig(max_length=256))
    ctx, cont = tiny_predictor.encode_pair(plain.prompt, plain.target)
    assert ex_plain["input_ids"] == ctx + cont + [tokenizer.eos_token_id]
    formatted = tiny_predictor.format_prompt(chat.prompt, GenerationConfig(system="Be brief."))  # what generate() feeds
    assert formatted != chat.prompt and "Be brief." in formatted
    ctx, cont = tiny_predictor.encode_pair(formatted, chat.target)
    assert ex_chat["input_ids"] == ctx + cont + [tokenizer.eos_token_id]
    assert ex_chat["labels"] == [-100] * len(ctx) + cont + [tokenizer.eos_token_id]
    with pytest.raises(ClinqaError, match="empty target"):
        lora.TextExample("e", "prompt", "")


def test_text_examples_train_a_yes_no_classifier(tiny_predictor, tmp_path):
    from sklearn.metrics import roc_auc_score

    examples = yes_no_examples()
    res = finetune(
        tiny_predictor,
        examples,
        LoraTrainConfig(epochs=15, patience=None, **{**FAST, "learning_rate": 1e-2}),
        tmp_path / "yn",
    )
    assert res.metadata["specialties"] == ["stage1"]
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]

    def auc(
        pred,
    ) -> float:  # how well log P(yes) - log P(no) ranks the yes examples first (a selector tunes its threshold)
        lp = pred.next_token_logprobs([e.prompt for e in examples], [" yes", " no"])
        return roc_auc_score([e.target == " yes" for e in examples], lp[:, 0] - lp[:, 1])

    assert auc(tiny_predictor.load_adapter(res.path)) > max(0.9, auc(tiny_predictor))


def test_init_adapter_continues_from_its_weights(adapters, tiny_predictor, tmp_path):
    a = adapters["a"]
    # a negligible learning rate: the continued adapter must still be A's weights, not a fresh init
    cfg = LoraTrainConfig(**{**FAST, "learning_rate": 1e-12}, epochs=1)
    seq = finetune(tiny_predictor, yes_no_examples(8), cfg, tmp_path / "seq", init_adapter=a.path)
    assert seq.metadata["init_adapter"]["path"] == str(a.path)
    assert finetune(
        tiny_predictor, yes_no_examples(8), cfg, tmp_path / "seq", init_adapter=a.path
    ).cached  # same start: done
    wa, ws = (
        load_file(str(a.path / "adapter_model.safetensors")),
        load_file(str(seq.path / "adapter_model.safetensors")),
    )
    assert wa.keys() == ws.keys() and all(torch.allclose(wa[k], ws[k], atol=1e-6) for k in wa)
    fresh = load_file(
        str(finetune(tiny_predictor, yes_no_examples(8), cfg, tmp_path / "fresh").path / "adapter_model.safetensors")
    )
    assert any(not torch.allclose(fresh[k], wa[k]) for k in wa)
    # the starting adapter is part of the folder's identity; a rank mismatch is refused up front
    with pytest.raises(ClinqaError, match=r"starting_adapter: '[0-9a-f]{16}' -> None"):
        finetune(tiny_predictor, yes_no_examples(8), cfg, tmp_path / "seq")
    with pytest.raises(ClinqaError, match="rank 8; this training uses rank 4"):
        finetune(
            tiny_predictor,
            yes_no_examples(8),
            LoraTrainConfig(**{**FAST, "rank": 4}),
            tmp_path / "r4",
            init_adapter=a.path,
        )


# -- precision and several processes --------------------------------------------------------------
def test_bf16_mixed_precision_on_cpu_and_the_metadata_records_it(tiny_predictor, tmp_path):
    # the dtype plumbing a GPU uses (autocast, fp32 LoRA weights and optimizer), exercised on the CPU
    cfg = LoraTrainConfig(epochs=2, patience=None, dtype="bf16", device="cpu", **FAST)
    assert cfg.dtype == "bfloat16" and "dtype" in cfg.identity() and "device" not in cfg.identity()
    res = finetune(tiny_predictor, make_questions(), cfg, tmp_path / "bf16")
    m = res.metadata
    assert (
        m["precision"] == "bfloat16"
        and m["device"] == "cpu"
        and m["world_size"] == 1
        and m["trainer"] == "transformers.Trainer"
    )
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]
    weights = load_file(str(res.path / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())
    fp32 = finetune(
        tiny_predictor,
        make_questions(),
        LoraTrainConfig(epochs=2, patience=None, device="cpu", **FAST),
        tmp_path / "fp32",
    )
    assert fp32.metadata["precision"] == "float32"
    other = load_file(str(fp32.path / "adapter_model.safetensors"))
    assert any(not torch.equal(weights[k], other[k]) for k in weights)  # bf16 arithmetic did run
    # an explicit dtype is part of the identity: the bf16 folder is not handed out as an fp32 one
    with pytest.raises(ClinqaError, match="dtype: 'bfloat16' -> 'float32'"):
        finetune(
            tiny_predictor,
            make_questions(),
            LoraTrainConfig(epochs=2, patience=None, dtype="float32", **FAST),
            tmp_path / "bf16",
        )
    # ... while the default (auto) matches a folder trained before the field existed
    assert "dtype" not in LoraTrainConfig().identity()
    with pytest.raises(ClinqaError, match="float16.*needs a CUDA GPU"):
        finetune(
            tiny_predictor, make_questions(), LoraTrainConfig(dtype="float16", device="cpu", **FAST), tmp_path / "fp16"
        )
    with pytest.raises(ClinqaError, match="device"):
        LoraTrainConfig(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) variant; GPUs are covered by the gpu check")
def test_two_processes_under_torchrun_train_like_one_with_accumulation(tiny_predictor, tokenizer, tmp_path):
    # `torchrun --nproc_per_node 2` on the CPU (gloo): each process takes every other batch of the same epoch
    # order, and the loss is divided by the answer tokens of the whole step across processes, so without dropout
    # the weights equal one process accumulating the same two batches per step, also after a kill and resume
    # mid-epoch. The folder is written once.
    import os
    import subprocess
    import sys

    folder = tmp_path / "tiny-model"
    tiny_predictor.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from test_lora import FAST, make_questions\n"
        "from clinqa.adapt.lora import LoraTrainConfig, finetune\n"
        "cfg = LoraTrainConfig(epochs=2, patience=None, grad_accum=int(sys.argv[4]), device='cpu', **{**FAST, 'dropout': 0.0, 'batch_size': 2})\n"
        "def kill(step, total, loss):\n"
        "    if step == int(sys.argv[5]):\n"
        "        raise KeyboardInterrupt\n"
        "res = finetune(sys.argv[1], make_questions(), cfg, sys.argv[2], progress=kill, checkpoint_every=2)\n"
        "import json, os\n"  # one file per process: two processes printing to one pipe can interleave their lines
        "open(sys.argv[2] + '.rank' + os.environ['RANK'], 'a').write(json.dumps([res.metadata['world_size'], res.metadata['steps'], res.cached]) + '\\n')\n"
    )

    def reports(run: str) -> list[list]:
        return sorted(
            json.loads(line) for r in (0, 1) for line in (tmp_path / f"{run}.rank{r}").read_text().splitlines()
        )

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p
            for p in [str(__import__("clinqa").__path__[0].rsplit("/clinqa", 1)[0]), os.environ.get("PYTHONPATH", "")]
            if p
        ),
        "OMP_NUM_THREADS": "1",
    }
    here = str(__import__("pathlib").Path(__file__).parent)

    def launch(kill_at: int):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                str(script),
                str(folder),
                str(tmp_path / "ddp"),
                here,
                "1",
                str(kill_at),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    killed = launch(5)  # the main process stops at step 5, torchrun ends the other; the checkpoint of step 4 stays
    assert killed.returncode != 0 and (tmp_path / "ddp" / "checkpoint" / "checkpoint-4" / "clinqa_state.json").is_file()
    ddp = launch(-1)  # resumes mid-epoch 2 on both processes
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    assert reports("ddp") == [[2, 6, False]] * 2  # 12 questions, 2 per batch, 2 processes: 3 steps an epoch
    m = lora.load_adapter_metadata(tmp_path / "ddp")
    assert (
        m["world_size"] == 2
        and m["steps"] == 6
        and sorted(p.name for p in (tmp_path / "ddp").iterdir())
        == ["adapter_config.json", "adapter_model.safetensors", "clinqa_adapter.json", "run.json", "samples.jsonl"]
    )
    # the run store's files, written by the main process alone: each epoch once, also across the kill
    epochs = [json.loads(line) for line in (tmp_path / "ddp" / "samples.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2] and [e["val_loss"] for e in epochs] == [
        h["val_loss"] for h in m["history"]
    ]
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["counts"]["steps"] == 6
    single = finetune(
        str(folder),
        make_questions(),
        LoraTrainConfig(
            epochs=2, patience=None, grad_accum=2, device="cpu", **{**FAST, "dropout": 0.0, "batch_size": 2}
        ),
        tmp_path / "one",
    )
    assert [h["val_loss"] for h in single.history] == pytest.approx([h["val_loss"] for h in m["history"]], rel=1e-5)
    w1 = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    w2 = load_file(str(single.path / "adapter_model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-7)
    assert m["resumes"] == 1
    again = launch(-1)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert reports("ddp") == [[2, 6, False]] * 2 + [[2, 6, True]] * 2  # the finished folder, returned on both processes
