"""Device and dtype plumbing on the CPU: runtime resolution, bf16 end to end, run identity, the
flash-attention fallback, memory-scaled batches and the out-of-memory back-off (simulated)."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from clinqa.errors import ClinqaError
from clinqa.models import runtime as rt_mod
from clinqa.models.base import GenerationConfig
from clinqa.models.batching import bytes_per_token, device_budget, gpu_budget, run_batches
from clinqa.models.local import LocalModel
from clinqa.models.runtime import Runtime, RuntimeConfig, resolve_runtime

CONTEXTS = [
    (
        "Question: Which drug reverses opioid overdose?\nAnswer:",
        [" Naloxone", " Flumazenil", " Atropine sulfate injection", " Vitamin K"],
    ),
    ("Question: A short one?\nAnswer:", [" yes", " no"]),
]


def direct_loglikelihood(pred, context, continuation):
    """One plain forward of context + continuation (lm-eval's way)."""
    ctx, cont = pred.encode_pair(context, continuation)
    with torch.no_grad():
        logits = pred.model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))), len(cont)


def direct_next_token(pred, context, candidates):
    with torch.no_grad():
        lp = torch.log_softmax(pred.model(input_ids=torch.tensor([pred.encode(context)])).logits[0, -1].float(), -1)
    return [float(lp[pred.encode_pair(context, c)[1][0]]) for c in candidates]


pytestmark = pytest.mark.usefixtures("one_thread")

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@pytest.fixture(autouse=True)
def _clean_runtime(monkeypatch):
    for var in ("CLINQA_DEVICE", "CLINQA_DTYPE", "CLINQA_DEVICE_MAP"):
        monkeypatch.delenv(var, raising=False)
    rt_mod.reset_runtime()
    yield
    rt_mod.reset_runtime()


# --------------------------------------------------------------------------- runtime resolution


def test_auto_on_a_cpu_machine_is_cpu_float32(monkeypatch):
    monkeypatch.setattr(rt_mod, "_cuda_count", lambda: 0)
    monkeypatch.setattr(rt_mod, "_mps_available", lambda: False)
    r = resolve_runtime(RuntimeConfig())
    assert (r.device, r.dtype, r.device_map) == (torch.device("cpu"), torch.float32, None)
    assert r.identity() == {"device": "cpu", "dtype": "float32"}


def test_auto_prefers_cuda_then_bf16_and_a_device_map_with_several_gpus(monkeypatch):
    monkeypatch.setattr(rt_mod, "_cuda_count", lambda: 1)
    monkeypatch.setattr(rt_mod, "_bf16_ok", lambda d: True)
    r = resolve_runtime(RuntimeConfig())
    assert (r.device, r.dtype, r.device_map) == (torch.device("cuda", 0), torch.bfloat16, None)
    monkeypatch.setattr(rt_mod, "_bf16_ok", lambda d: False)  # e.g. a V100: fp16
    assert resolve_runtime(RuntimeConfig()).dtype == torch.float16
    monkeypatch.setattr(rt_mod, "_cuda_count", lambda: 4)
    assert resolve_runtime(RuntimeConfig()).device_map == "auto"
    assert resolve_runtime(RuntimeConfig(device="cuda:3", dtype="fp32")).device == torch.device("cuda", 3)
    with pytest.raises(ClinqaError, match="cuda:0..cuda:3"):
        resolve_runtime(RuntimeConfig(device="cuda:4"))
    monkeypatch.setattr(rt_mod, "_cuda_count", lambda: 0)
    monkeypatch.setattr(rt_mod, "_mps_available", lambda: True)
    assert resolve_runtime(RuntimeConfig()).device == torch.device("mps")


def test_unavailable_or_unknown_devices_and_dtypes_are_one_line_errors(monkeypatch):
    monkeypatch.setattr(rt_mod, "_cuda_count", lambda: 0)
    monkeypatch.setattr(rt_mod, "_mps_available", lambda: False)
    for device, pattern in (
        ("cuda", "CUDA is not available"),
        ("cuda:1", "CUDA is not available"),
        ("mps", "MPS"),
        ("tpu", "use one of"),
        ("gpu!", "use one of"),
    ):
        with pytest.raises(ClinqaError, match=pattern) as exc:
            resolve_runtime(RuntimeConfig(device=device))
        assert "\n" not in str(exc.value)
    with pytest.raises(ClinqaError, match="--dtype"):
        resolve_runtime(RuntimeConfig(dtype="int8"))
    with pytest.raises(ClinqaError, match="--device-map"):
        resolve_runtime(RuntimeConfig(device_map="balanced"))
    assert resolve_runtime(RuntimeConfig(device="cpu", dtype="bf16")).dtype == torch.bfloat16


def test_environment_then_cli_options_set_the_runtime(monkeypatch):
    monkeypatch.setenv("CLINQA_DTYPE", "bfloat16")
    assert rt_mod.current_runtime().dtype == torch.bfloat16
    rt_mod.update_runtime(dtype="float16")  # an option beats the environment
    rt_mod.update_runtime(device="cpu")  # other fields are kept
    assert rt_mod.current_runtime().dtype == torch.float16
    rt_mod.update_runtime(dtype=None)  # an option not given falls back to the environment
    assert rt_mod.current_runtime().dtype == torch.bfloat16


def test_cli_device_cuda_without_cuda_is_exit_2_one_line(tmp_path):
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "clinqa.cli",
            "eval",
            "default",
            "bundled",
            "--device",
            "cuda",
            "--limit",
            "1",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "CUDA is not available" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- bf16 end to end


@pytest.fixture()
def pair(tiny_predictor, tokenizer):
    """The same tiny random model in float32 and in bfloat16."""
    import copy

    bf16 = copy.deepcopy(tiny_predictor.model).to(torch.bfloat16)
    return tiny_predictor, LocalModel.from_objects(bf16, tokenizer, spec="tiny", name="tiny-bf16")


def test_bf16_runs_every_path_and_stays_close_to_fp32(pair):
    fp32, bf16 = pair
    assert bf16.info.extra["dtype"] == "bfloat16" and fp32.info.extra == {"device": "cpu", "dtype": "float32"}
    a, b = fp32.score_continuations(CONTEXTS), bf16.score_continuations(CONTEXTS)
    for ra, rb in zip(a, b):
        for sa, sb in zip(ra, rb):
            assert sa.n_tokens == sb.n_tokens and np.isfinite(sb.logprob)
            assert sb.logprob == pytest.approx(sa.logprob, rel=0.05, abs=0.5)  # bf16 keeps ~3 significant digits
    ctxs = [c for c, _ in CONTEXTS]
    la, lb = fp32.next_token_logprobs(ctxs, [" A", " B", " C"]), bf16.next_token_logprobs(ctxs, [" A", " B", " C"])
    assert lb.dtype == np.float64 and np.isfinite(lb).all()
    np.testing.assert_allclose(lb, la, rtol=0.05, atol=0.5)
    sa = fp32.next_token_logprobs_shared("Question: x?\nLine:", [" a>>> Answer:", " bb>>> Answer:"], [" yes", " no"])
    sb = bf16.next_token_logprobs_shared("Question: x?\nLine:", [" a>>> Answer:", " bb>>> Answer:"], [" yes", " no"])
    np.testing.assert_allclose(sb, sa, rtol=0.05, atol=0.5)
    hs = bf16.hidden_states(["Question: a?"], [0, 2])
    assert hs[0].dtype == np.float32 and np.isfinite(hs[0]).all()
    tl = bf16.token_logprobs(["Question: a b c"])[0]
    assert np.isnan(tl["logprobs"][0]) and np.isfinite(tl["logprobs"][1:]).all()
    assert len(bf16.generate(["Hi"], GenerationConfig(max_new_tokens=3, chat=False))) == 1


def test_bf16_steering_hook_adds_a_float32_vector_to_bf16_activations(pair):
    from clinqa.adapt.control import _ACTIVE, _steering_hook

    _, bf16 = pair
    delta = torch.full((bf16.model.config.hidden_size,), 0.5, dtype=torch.float32)
    key = object()
    hidden = torch.zeros((1, 3, bf16.model.config.hidden_size), dtype=torch.bfloat16)
    token = _ACTIVE.set(frozenset({key}))
    try:
        out = _steering_hook(key, delta)(None, (), hidden)
    finally:
        _ACTIVE.reset(token)
    assert out.dtype == torch.bfloat16 and out.device == hidden.device and torch.all(out == 0.5)


def test_embedded_model_loads_in_bf16_on_the_cpu(embedded_dir):
    from clinqa.models import load_base_model

    m = load_base_model("default", Runtime(torch.device("cpu"), torch.bfloat16))
    assert m.dtype == torch.bfloat16 and m.device == torch.device("cpu") and m.info.extra["dtype"] == "bfloat16"
    assert load_base_model("default", Runtime(torch.device("cpu"), torch.bfloat16)) is m  # cached per runtime
    ctx = "Question: Which drug reverses opioid overdose?\nA. Naloxone\nB. Atropine\nAnswer:"
    got = m.next_token_logprobs([ctx], [" A", " B"])
    np.testing.assert_allclose(got[0], direct_next_token(m, ctx, [" A", " B"]), atol=1e-2)


# --------------------------------------------------------------------------- run identity


def test_device_and_dtype_are_recorded_and_part_of_a_runs_identity(tmp_path, monkeypatch):
    from clinqa.evaluate.runs import EvalConfig, Run

    monkeypatch.setattr(rt_mod, "_cuda_count", lambda: 0)
    monkeypatch.setattr(rt_mod, "_mps_available", lambda: False)
    cpu = EvalConfig(model="default", data="bundled", limit=2)
    assert (cpu.device, cpu.dtype) == ("cpu", "float32")
    # a CPU float32 run hashes as before these fields existed, so old run folders still resume
    old = {k: v for k, v in dataclasses.asdict(cpu).items() if k not in ("device", "dtype")}
    assert cpu.identity() == hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]
    rt_mod.update_runtime(dtype="bfloat16")
    bf = EvalConfig(model="default", data="bundled", limit=2)
    assert (bf.device, bf.dtype) == ("cpu", "bfloat16") and bf.identity() != cpu.identity()
    assert EvalConfig(model="openai:http://h:1/v1#m", data="bundled").dtype == "server"
    run = Run.open(tmp_path / "r", bf)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["dtype"] == "bfloat16"
    with pytest.raises(ClinqaError, match="dtype: 'bfloat16' -> 'float32'"):
        Run.open(tmp_path / "r", cpu)
    assert run.config["device"] == "cpu"


# --------------------------------------------------------------------------- flash-attention fallback


def test_unpacked_option_scoring_equals_the_packed_path_and_direct(tiny_predictor, monkeypatch):
    packed = tiny_predictor.score_continuations(CONTEXTS)
    monkeypatch.setattr(tiny_predictor.model.config, "_attn_implementation", "flash_attention_2")
    assert not tiny_predictor._packed_attention()
    called = []
    plain = tiny_predictor._score_unpacked
    monkeypatch.setattr(tiny_predictor, "_score_unpacked", lambda p: called.append(1) or plain(p))
    # the flash kernel is not on this CPU: run the unpacked sequences through the eager kernel
    monkeypatch.setattr(tiny_predictor.model.config, "_attn_implementation", "eager")
    monkeypatch.setattr(tiny_predictor, "_packed_attention", lambda: False)
    unpacked = tiny_predictor.score_continuations(CONTEXTS)
    assert called == [1]
    for (ctx, conts), rp, ru in zip(CONTEXTS, packed, unpacked):
        for cont, sp, su in zip(conts, rp, ru):
            assert (su.n_tokens, su.n_chars, su.greedy) == (sp.n_tokens, sp.n_chars, sp.greedy)
            assert su.logprob == pytest.approx(sp.logprob, abs=1e-4)
            assert su.logprob == pytest.approx(direct_loglikelihood(tiny_predictor, ctx, cont)[0], abs=1e-3)


# --------------------------------------------------------------------------- batch budget


def test_gpu_budget_follows_free_memory(tiny_predictor, monkeypatch):
    cfg = tiny_predictor.model.config  # hidden 32, intermediate 64, 4 heads, 2 kv heads, 2 layers
    v = cfg.vocab_size
    # by hand: (6*32 + 3*64)*2 bytes + 4 heads*100 keys*4 bytes + 0.5*v*4*2 bytes logits
    assert bytes_per_token(cfg, torch.bfloat16, 100, 0.5) == 768 + 1600 + int(0.5 * v * 8)
    # + keys and values: 2 * 2 layers * 2 kv heads * 8 dims * 4 bytes
    assert bytes_per_token(cfg, torch.float32, 10, 0.0, cache=True) == (6 * 32 + 3 * 64) * 4 + 160 + 256
    per = bytes_per_token(cfg, torch.bfloat16, 100, 0.5)
    assert gpu_budget(40 * 2**30, cfg, torch.bfloat16, 100, 0.5)[0] == min(1 << 18, int(0.5 * 40 * 2**30 // per))
    assert gpu_budget(1000, cfg, torch.bfloat16, 100, 0.5)[0] == 1024  # never below the CPU's budget
    free = {"b": 2 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["b"], 80 * 2**30))
    small = device_budget(torch.device("cuda", 0), cfg, torch.bfloat16, 100, (1024, 64), 0.5)
    free["b"] = 60 * 2**30
    large = device_budget(torch.device("cuda", 0), cfg, torch.bfloat16, 100, (1024, 64), 0.5)
    assert large[0] > small[0] > 1024
    assert device_budget(torch.device("cpu"), cfg, torch.bfloat16, 100, (1024, 64), 0.5) == (1024, 64)


# --------------------------------------------------------------------------- out-of-memory back-off


def test_run_batches_halves_on_oom_and_computes_every_item_once():
    lengths = [5] * 13
    seen, tried = [], []

    def step(batch):
        tried.append(len(batch))
        if len(batch) > 3:
            raise OOM("CUDA out of memory (simulated)")
        seen.extend(batch)

    retries = run_batches([list(range(8)), list(range(8, 13))], lengths, step)
    assert sorted(seen) == list(range(13)) and len(seen) == 13
    # 8 fails -> 4 fails -> 2, 2; the cap then splits 4 (and 5's halves) without trying them
    assert retries == 2 and max(tried[2:]) <= 3

    def always(batch):
        raise OOM("simulated")

    with pytest.raises(ClinqaError, match="single sequence of 5 tokens"):
        run_batches([[0, 1]], lengths, always)
    with pytest.raises(ValueError):  # other errors pass through untouched
        run_batches([[0]], lengths, lambda b: (_ for _ in ()).throw(ValueError("x")))


def _oom_above(predictor, monkeypatch, max_rows):
    """Make the decoder raise CUDA's out-of-memory error on batches of more than `max_rows` rows and
    record the rows of every forward that succeeds."""
    decoder = predictor._decoder
    real = decoder.forward
    rows = []

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[0] > max_rows:
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        out = real(*args, **kwargs)
        if ids is not None:
            rows.extend(tuple(r) for r in ids.tolist())
        return out

    monkeypatch.setattr(decoder, "forward", forward)
    return rows


def test_simulated_oom_halves_batches_without_losing_or_duplicating_samples(tiny_predictor, monkeypatch):
    from clinqa.models import local

    pred = tiny_predictor
    contexts = [f"Question {i}: is finding {'x ' * (i % 4)}relevant?\nAnswer:" for i in range(11)]
    groups = [(c, [" yes", " no", " maybe not"]) for c in contexts]
    monkeypatch.setattr(local, "MAX_BATCH_TOKENS", 10**6)  # one batch per call unless split
    want_letter = pred.next_token_logprobs(contexts, [" yes", " no"])
    want_option = pred.score_continuations(groups)
    want_tokens = pred.token_logprobs(contexts)
    want_gen = pred.generate(contexts[:5], GenerationConfig(max_new_tokens=2, chat=False))
    suffixes = [f" line {i}: heart rate {60 + i} >>> Needed? Answer:" for i in range(7)]
    want_shared = pred.next_token_logprobs_shared("Question: pulse?\nRecord:", suffixes, [" yes", " no"])

    rows = _oom_above(pred, monkeypatch, 2)
    got_letter = pred.next_token_logprobs(contexts, [" yes", " no"])
    assert pred.oom_retries >= 2
    # every context ran exactly once through a successful forward (pads stripped)
    ran = sorted(tuple(t for t in r if t != pred.pad_id) for r in rows)
    assert ran == sorted(tuple(pred.encode(c)) for c in contexts)
    np.testing.assert_allclose(got_letter, want_letter, atol=1e-5)
    for a, b in zip(pred.score_continuations(groups), want_option):
        assert [s.logprob for s in a] == pytest.approx([s.logprob for s in b], abs=1e-4)
    for a, b in zip(pred.token_logprobs(contexts), want_tokens):
        assert a["ids"] == b["ids"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-4)
    before = pred.oom_retries
    got_shared = pred.next_token_logprobs_shared("Question: pulse?\nRecord:", suffixes, [" yes", " no"])
    np.testing.assert_allclose(got_shared, want_shared, atol=1e-5)
    assert pred.oom_retries > before
    before = pred.oom_retries
    assert pred.generate(contexts[:5], GenerationConfig(max_new_tokens=2, chat=False)) == want_gen
    assert pred.oom_retries > before


# --------------------------------------------------------------------------- the GPU benchmark's smoke mode


def test_gpu_speed_benchmark_smoke_mode_runs_on_the_cpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_speed.py"
    out = tmp_path / "speed.json"
    r = subprocess.run(
        [
            sys.executable,
            str(script),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--tiny",
            "--n",
            "6",
            "--models",
            "smollm2-135m",
            "--lora-n",
            "10",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    (row,) = res["scoring"]
    assert row["questions"] == 6 and row["baseline_questions"] == 6
    # clinqa's packed/last-token scoring and lm-eval's full forward per option give the same scores
    assert row["agree_letter"] == 1.0 and row["agree_option"] == 1.0 and row["max_abs_diff_option_logprob"] < 1e-3
    assert row["letter_speedup"] > 0 and row["option_speedup"] > 0 and 0 < row["option_mfu"]
    assert res["lora"]["train_tokens"] > 0 and res["lora"]["tokens_per_s"] > 0


@pytest.mark.embedded
def test_cli_eval_records_dtype_and_refuses_to_mix_precisions(tmp_path):
    from typer.testing import CliRunner

    from clinqa.cli import app

    out = tmp_path / "run"
    args = ["eval", "default", "bundled", "--method", "letter", "--limit", "2", "--out", str(out), "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert (cfg["device"], cfg["dtype"]) == ("cpu", "bfloat16")
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2
    r = CliRunner().invoke(app, [*args, "--dtype", "float32"])  # fp32 results must not be mixed into a bf16 run
    assert isinstance(r.exception, ClinqaError) and "dtype: 'bfloat16' -> 'float32'" in str(r.exception)
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2
