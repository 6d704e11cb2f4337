"""The local backend's fast paths agree with a direct, obviously-correct computation."""

import numpy as np
import pytest
import torch

from clinqa.models import loglikelihood
from clinqa.models.base import GenerationConfig


def direct_loglikelihood(pred, context, continuation):
    ctx, cont = pred.encode_pair(context, continuation)
    ids = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        logits = pred.model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))), len(cont)


def direct_next_token(pred, context, candidates):
    ids = torch.tensor([pred.encode(context)])
    with torch.no_grad():
        lp = torch.log_softmax(pred.model(input_ids=ids).logits[0, -1].float(), -1)
    return [float(lp[pred.encode_pair(context, c)[1][0]]) for c in candidates]


CONTEXTS = [
    (
        "Question: Which drug reverses opioid overdose?\nAnswer:",
        [" Naloxone", " Flumazenil", " Atropine sulfate injection", " Vitamin K"],
    ),
    ("Question: A short one?\nAnswer:", [" yes", " no"]),
    (
        "Question: A much longer question about the management of a patient with chest pain radiating to the jaw, diaphoresis and ST elevation in leads II, III and aVF?\nAnswer:",
        [" Primary PCI", " Discharge home", " Oral antacids", " Reassurance only"],
    ),
]


def test_score_continuations_matches_direct(tiny_predictor):
    scored = tiny_predictor.score_continuations(CONTEXTS)
    for (ctx, conts), row in zip(CONTEXTS, scored):
        for cont, s in zip(conts, row):
            lp, n = direct_loglikelihood(tiny_predictor, ctx, cont)
            assert s.n_tokens == n
            assert s.logprob == pytest.approx(lp, abs=1e-3)


def test_loglikelihood_groups_pairs_and_keeps_order(tiny_predictor):
    pairs = [(CONTEXTS[0][0], " Naloxone"), (CONTEXTS[1][0], " no"), (CONTEXTS[0][0], " Vitamin K")]
    got = loglikelihood(tiny_predictor, pairs)
    for (ctx, cont), s in zip(pairs, got):
        assert s.logprob == pytest.approx(direct_loglikelihood(tiny_predictor, ctx, cont)[0], abs=1e-3)


def test_next_token_logprobs_matches_direct(tiny_predictor):
    contexts = [
        "Q1\nA. x\nB. y\nAnswer:",
        "A longer question with more words\nA. x\nB. y\nC. z\nAnswer:",
        "Short\nAnswer:",
    ]
    cands = [" A", " B", " C"]
    got = tiny_predictor.next_token_logprobs(contexts, cands)
    assert got.shape == (3, 3)
    for row, ctx in zip(got, contexts):
        np.testing.assert_allclose(row, direct_next_token(tiny_predictor, ctx, cands), atol=1e-3)


def test_shared_prefix_next_token_matches_direct(tiny_predictor, monkeypatch):
    from clinqa.models import local

    prefix = "Question: What was the latest heart rate?\nPatient record entry:\n"
    suffixes = [
        f"<<<Observation {i}: heart rate {60 + 7 * i} /min{' (final)' * (i % 3)}>>>\nNeeded? Answer:" for i in range(11)
    ]
    cands = [" yes", " no"]
    monkeypatch.setattr(local, "MAX_BATCH_TOKENS", 96)  # several batches
    got = tiny_predictor.next_token_logprobs_shared(prefix, suffixes, cands)
    assert got.shape == (11, 2)
    for row, suf in zip(got, suffixes):
        np.testing.assert_allclose(row, direct_next_token(tiny_predictor, prefix + suf, cands), atol=1e-3)
    # a prefix that does not tokenise on its own (no clean boundary) takes the unshared path, same answers
    unshared = []
    plain = tiny_predictor._next_token_logprobs
    monkeypatch.setattr(tiny_predictor, "_next_token_logprobs", lambda ctxs, c: unshared.append(ctxs) or plain(ctxs, c))
    odd = tiny_predictor.next_token_logprobs_shared("Question: hea", ["rt rate?", "lth?"], cands)
    assert unshared == [["Question: heart rate?", "Question: health?"]]
    np.testing.assert_allclose(odd, plain(["Question: heart rate?", "Question: health?"], cands), atol=1e-5)
    tiny_predictor.next_token_logprobs_shared(prefix, suffixes[:2], cands)
    assert len(unshared) == 1  # a clean boundary is shared
    assert tiny_predictor.next_token_logprobs_shared(prefix, [], cands).shape == (0, 2)


def test_shared_prefix_passes_the_cache_by_the_installed_transformers_name(tiny_predictor):
    import warnings

    from clinqa.models.local import _cache_keyword

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    assert _cache_keyword(Old()) == "past_key_values"  # transformers before the rename
    decoder = tiny_predictor._decoder
    wrapped = type(decoder)(decoder.config)
    wrapped.forward = lambda *a, **k: None  # a spy or hook on the instance hides the signature
    assert _cache_keyword(wrapped) == _cache_keyword(decoder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_predictor.next_token_logprobs_shared(
            "Question: heart rate?\nEntry:\n", [" HR 60\nA:", " BP\nA:"], [" yes"]
        )
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_encode_pair_moves_trailing_space(tiny_predictor):
    ctx, cont = tiny_predictor.encode_pair("Answer: ", "A")
    ctx2, cont2 = tiny_predictor.encode_pair("Answer:", " A")
    assert (ctx, cont) == (ctx2, cont2)


def test_multi_token_candidate_is_refused(tiny_predictor):
    from clinqa.errors import ClinqaError

    with pytest.raises(ClinqaError, match="next-token scoring needs one"):
        tiny_predictor.next_token_logprobs(["Answer:"], [" Naloxone hydrochloride"])


def test_hidden_states_shape_and_range(tiny_predictor):
    from clinqa.errors import ClinqaError

    hs = tiny_predictor.hidden_states(["hello world", "a b c d"], [0, 2])
    assert hs[0].shape[0] == 2 and hs[0].shape[2] == 32
    assert hs[1].shape[1] == len(tiny_predictor.encode("a b c d"))
    with pytest.raises(ClinqaError, match="out of range"):
        tiny_predictor.hidden_states(["x"], [3])


def test_greedy_generation_is_deterministic_and_batch_independent(tiny_predictor):
    cfg = GenerationConfig(max_new_tokens=6, chat=False)
    a = tiny_predictor.generate(["The heart has", "Insulin is made in the"], cfg)
    b = tiny_predictor.generate(["Insulin is made in the"], cfg)
    assert a[1] == b[0]
    assert a == tiny_predictor.generate(["The heart has", "Insulin is made in the"], cfg)


def test_split_modules_keep_the_old_import_paths():
    from clinqa.models import continuations, local, steer_start

    assert local.STEER_START is steer_start.STEER_START  # adapt.control imports it from clinqa.models.local
    assert issubclass(local.LocalModel, continuations.ContinuationScoring)
    assert local.LocalModel._pack is continuations.ContinuationScoring._pack
