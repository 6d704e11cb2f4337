"""Dynamic batching of a local model's calls (clinqa.serve.coalesce, ModelRunner with local_batching): concurrent
callers get exactly what separate calls give, in fewer and larger model calls; configs and candidate sets are
never mixed; errors reach every caller; a cancelled caller is dropped without stopping the others."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from clinqa.models.base import (
    Annotates,
    FormatsChat,
    GenerationConfig,
    HasContextLimit,
    HasTokenizer,
    ModelInfo,
    SharesPrefix,
)
from clinqa.models.truncation import watch_truncation
from clinqa.serve.coalesce import Coalescer, RequestCancelled
from clinqa.serve.runner import ModelRunner, _abort_if_cancelled, _cancel_scope, _CancellablePredictor

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = 60.0  # a window no test waits out: batches are due once max_batch inputs wait


class Recorder:
    """A fake local model: answers are a pure function of each input, and every call is recorded."""

    def __init__(self, fail_on: str | None = None, extra: dict | None = None):
        self.info = ModelInfo(spec="fake", backend="fake", name="fake", extra=extra or {})
        self.calls: list[tuple[str, object, list]] = []
        self.fail_on = fail_on
        self._lock = threading.Lock()

    def _record(self, method, arg, items):
        with self._lock:
            self.calls.append((method, arg, list(items)))
        if self.fail_on and any(self.fail_on in str(x) for x in items):
            raise ValueError(f"cannot read {self.fail_on!r}")

    def generate(self, prompts, config=None):
        self._record("generate", config, prompts)
        n = (config or GenerationConfig()).max_new_tokens
        return [f"{p[::-1]}/{n}" for p in prompts]

    def next_token_logprobs(self, contexts, candidates):
        self._record("next_token_logprobs", tuple(candidates), contexts)
        return np.array([[-float(len(c) + len(k)) for k in candidates] for c in contexts])

    def score_continuations(self, groups):
        self._record("score_continuations", None, groups)
        return [[float(len(ctx) * 10 + len(c)) for c in conts] for ctx, conts in groups]

    def hidden_states(self, texts, layers):
        self._record("hidden_states", tuple(layers), texts)
        return [np.zeros((len(layers), 1, 2)) for _ in texts]


def concurrently(fns):
    """Run the callables on threads at once; their results (or exceptions) in order."""
    with ThreadPoolExecutor(len(fns)) as pool:
        futures = [pool.submit(fn) for fn in fns]
        out = []
        for f in futures:
            try:
                out.append(f.result(timeout=120))
            except Exception as e:  # noqa: BLE001 - the test compares them
                out.append(e)
        return out


def wait_until(cond, what: str):
    for _ in range(2400):
        if cond():
            return
        time.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


# -- the coalescer with a fake model ---------------------------------------------------------------


def test_concurrent_calls_become_one_batch_with_each_callers_own_results():
    inner, reference = Recorder(), Recorder()
    co = Coalescer(inner, window_s=LONG, max_batch=12)
    config = GenerationConfig(max_new_tokens=7)
    asks = [[f"question {i}"] if i % 2 else [f"question {i}", f"again {i}"] for i in range(8)]  # 12 prompts
    got = concurrently([lambda a=a: co.generate(a, config) for a in asks])
    assert got == [reference.generate(a, config) for a in asks]  # each caller alone, computed independently
    assert len(inner.calls) == 1 and len(inner.calls[0][2]) == 12  # one model call for 8 callers
    co.close()


def test_logprobs_and_continuations_are_sliced_per_caller():
    inner, reference = Recorder(), Recorder()
    co = Coalescer(inner, window_s=LONG, max_batch=6)
    contexts = [[f"ctx {'x' * i}"] for i in range(6)]
    got = concurrently([lambda c=c: co.next_token_logprobs(c, [" A", " BB"]) for c in contexts])
    for c, g in zip(contexts, got):
        np.testing.assert_allclose(g, reference.next_token_logprobs(c, [" A", " BB"]))
    groups = [[(f"context {i}", ["a", "bb" * i])] for i in range(6)]
    got = concurrently([lambda g=g: co.score_continuations(g) for g in groups])
    assert got == [reference.score_continuations(g) for g in groups]
    assert [len(items) for _, _, items in inner.calls] == [6, 6]
    co.close()


def test_different_configs_and_candidates_are_never_mixed():
    inner, reference = Recorder(), Recorder()
    co = Coalescer(inner, window_s=0.2, max_batch=64)
    short, long_ = GenerationConfig(max_new_tokens=3), GenerationConfig(max_new_tokens=9)
    jobs = []
    for i in range(8):
        config = short if i % 2 else long_
        jobs.append(lambda i=i, c=config: co.generate([f"p{i}-{c.max_new_tokens}"], c))
        cands = [" A", " B"] if i % 2 else [" Yes", " No"]
        jobs.append(lambda i=i, k=cands: co.next_token_logprobs([f"c{i}-{len(k[0])}"], k))
    got = concurrently(jobs)
    for i in range(8):
        config = short if i % 2 else long_
        assert got[2 * i] == reference.generate([f"p{i}-{config.max_new_tokens}"], config)
        cands = [" A", " B"] if i % 2 else [" Yes", " No"]
        np.testing.assert_allclose(got[2 * i + 1], reference.next_token_logprobs([f"c{i}-{len(cands[0])}"], cands))
    for method, arg, items in inner.calls:  # each model call holds only inputs asked with its own config
        if method == "generate":
            assert all(p.endswith(f"-{arg.max_new_tokens}") for p in items)
        else:
            assert all(c.endswith(f"-{len(arg[0])}") for c in items)
    assert sum(len(items) for _, _, items in inner.calls) == 16
    co.close()


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_works():
    inner = Recorder(fail_on="boom")
    co = Coalescer(inner, window_s=LONG, max_batch=4)
    got = concurrently([lambda i=i: co.generate([f"boom {i}" if i == 2 else f"fine {i}"]) for i in range(4)])
    assert all(isinstance(g, ValueError) and "boom" in str(g) for g in got)
    got = concurrently([lambda i=i: co.generate([f"fine {i}"]) for i in range(4)])
    assert got == [[f"{i} enif/256"] for i in range(4)]
    co.close()


def test_a_cancelled_caller_is_dropped_and_the_others_get_their_results():
    inner = Recorder()
    co = Coalescer(inner, window_s=LONG, max_batch=3)
    flag = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(co.generate, ["keep 0"], None)
        doomed = pool.submit(co.generate, ["dropped"], None, cancel=flag)
        wait_until(lambda: co.waiting() == 2, "two calls queued")
        flag.set()
        co.drop_cancelled()
        with pytest.raises(RequestCancelled):
            doomed.result(timeout=60)
        rest = [pool.submit(co.generate, [f"keep {i}"], None) for i in (1, 2)]
        assert [f.result(timeout=60) for f in [first, *rest]] == [[f"{i} peek/256"] for i in range(3)]
    assert [items for _, _, items in inner.calls] == [["keep 0", "keep 1", "keep 2"]]
    co.close()


class Stepper(Recorder):
    """Generation runs torch forward passes (where the runner's abort hook sits), held at the first until `go`."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(2, 2)
        self.model.register_forward_pre_hook(_abort_if_cancelled)
        self.started, self.go = threading.Event(), threading.Event()
        self.steps = 0

    def generate(self, prompts, config=None):
        self.started.set()
        assert self.go.wait(60)
        for _ in range(5):
            self.model(torch.zeros(1, 2))
            self.steps += 1
        return super().generate(prompts, config)


def test_one_cancelled_member_does_not_abort_its_batch_but_all_cancelled_do():
    inner = Stepper()
    co = Coalescer(inner, window_s=LONG, max_batch=2, cancel_scope=_cancel_scope)
    flags = [threading.Event(), threading.Event()]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(co.generate, [f"q{i}"], None, cancel=flags[i]) for i in range(2)]
        assert inner.started.wait(60)
        flags[0].set()  # abandoned while its batch runs
        inner.go.set()
        assert [f.result(timeout=60) for f in futures] == [["0q/256"], ["1q/256"]]
    assert inner.steps == 5  # ran to the end for the member still waiting
    inner.started.clear()
    inner.go.clear()
    inner.steps = 0
    flags = [threading.Event(), threading.Event()]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(co.generate, [f"q{i}"], None, cancel=flags[i]) for i in range(2)]
        assert inner.started.wait(60)
        for f in flags:
            f.set()
        inner.go.set()
        for f in futures:
            with pytest.raises(RequestCancelled):
                f.result(timeout=60)
    assert inner.steps == 0  # every member gone: stopped at the first forward pass
    co.close()


def test_sampled_generation_and_other_methods_run_alone():
    inner = Recorder()
    co = Coalescer(inner, window_s=LONG, max_batch=64)
    sampled = GenerationConfig(temperature=0.7, max_new_tokens=4)
    got = concurrently([lambda i=i: co.generate([f"s{i}"], sampled) for i in range(3)])
    assert got == [[f"{i}s/4"] for i in range(3)]
    assert [len(items) for _, _, items in inner.calls] == [1, 1, 1]  # no batch waited for the window
    co.close()


# -- the runner: when it batches, and what the wrapped predictor exposes ------------------------------


def test_auto_batches_only_on_a_gpu_and_off_keeps_one_call_at_a_time():
    cases = [("auto", {"device": "cpu"}, False), ("auto", {"device": "cuda"}, True), ("on", {"device": "cpu"}, True)]
    cases += [("off", {"device": "cuda"}, False)]
    for mode, extra, batches in cases:
        runner = ModelRunner(concurrency=6, batching=mode)
        runner.set_predictor(Recorder(extra=extra))
        assert (runner.coalescer is not None, runner.parallel) == (batches, 6 if batches else 1), (mode, extra)
        runner.close()
    with pytest.raises(ValueError):
        ModelRunner(batching="sometimes")


def test_the_wrapped_predictor_declares_what_it_forwards(tiny_predictor):
    wrapped = _CancellablePredictor(tiny_predictor, threading.Event())
    assert wrapped.tokenizer is tiny_predictor.tokenizer and wrapped.max_length == tiny_predictor.max_length
    config = GenerationConfig()
    assert wrapped.format_prompt("hi", config) == tiny_predictor.format_prompt("hi", config)
    np.testing.assert_allclose(
        wrapped.next_token_logprobs_shared("Q: ", ["a", "b"], [" A"]),
        tiny_predictor.next_token_logprobs_shared("Q: ", ["a", "b"], [" A"]),
        atol=1e-5,
    )
    assert isinstance(wrapped, FormatsChat) and isinstance(wrapped, HasTokenizer) and isinstance(wrapped, SharesPrefix)
    bare = _CancellablePredictor(Recorder(), threading.Event())
    for capability in (HasTokenizer, FormatsChat, SharesPrefix, Annotates, HasContextLimit):
        assert not isinstance(bare, capability), capability  # absent, not present as None
    with pytest.raises(AttributeError):
        bare.calls  # noqa: B018 - nothing is forwarded that is not declared


# -- the tiny model: batched answers equal separate calls ---------------------------------------------


class Counting:
    """Counts the calls that reach a real model, passing them on."""

    def __init__(self, inner):
        self.inner, self.info, self.sizes = inner, inner.info, []

    def generate(self, prompts, config=None):
        self.sizes.append(len(prompts))
        return self.inner.generate(prompts, config)

    def next_token_logprobs(self, contexts, candidates):
        self.sizes.append(len(contexts))
        return self.inner.next_token_logprobs(contexts, candidates)

    def score_continuations(self, groups):
        self.sizes.append(len(groups))
        return self.inner.score_continuations(groups)


QUESTIONS = [
    "Which drug is a direct thrombin inhibitor?",
    "What is the first-line treatment for anaphylaxis in adults presenting to the emergency room?",
    "Name a loop diuretic.",
    "Which vitamin deficiency causes scurvy?",
    "What does an elevated troponin suggest?",
    "Which electrolyte is low in a patient with tetany and a prolonged QT interval?",
]


def test_the_tiny_model_batched_equals_one_call_per_prompt(tiny_predictor):
    counted = Counting(tiny_predictor)
    co = Coalescer(counted, window_s=LONG, max_batch=len(QUESTIONS))
    config = GenerationConfig(max_new_tokens=6, chat=False)
    got = concurrently([lambda q=q: co.generate([q], config) for q in QUESTIONS])
    assert got == [tiny_predictor.generate([q], config) for q in QUESTIONS]
    cands = [" A", " B", " C", " D"]
    got = concurrently([lambda q=q: co.next_token_logprobs([q], cands) for q in QUESTIONS])
    for q, g in zip(QUESTIONS, got):
        np.testing.assert_allclose(g, tiny_predictor.next_token_logprobs([q], cands), atol=1e-4)
    groups = [(q, [" yes", " no, never"]) for q in QUESTIONS]
    got = concurrently([lambda g=g: co.score_continuations([g]) for g in groups])
    for g, scores in zip(groups, got):
        (alone,) = tiny_predictor.score_continuations([g])
        assert [s.n_tokens for s in scores[0]] == [s.n_tokens for s in alone]
        np.testing.assert_allclose([s.logprob for s in scores[0]], [s.logprob for s in alone], atol=1e-4)
    assert counted.sizes == [len(QUESTIONS)] * 3  # 18 callers, 3 model calls
    co.close()


def test_truncation_notes_reach_the_caller_whose_prompt_was_cut(tiny_predictor):
    co = Coalescer(tiny_predictor, window_s=LONG, max_batch=3)
    long_prompt = "word " * 600  # over the tiny model's 512-token window

    def ask(prompt):
        with watch_truncation() as notes:
            co.next_token_logprobs([prompt], [" A"])
        return [i for i, _ in notes]

    got = concurrently([lambda p=p: ask(p) for p in ["short one", long_prompt, "short two"]])
    assert got == [[], [0], []]
    co.close()


# -- the service end to end, batching forced on the CPU ----------------------------------------------


def test_the_service_batches_concurrent_requests_and_audits_each_once(tmp_path, tiny_predictor):
    from clinqa.data.schema import Question
    from clinqa.evaluate.methods import make_items, score_letter
    from clinqa.records.fhir import load_records
    from clinqa.records.synth import synthesize_patients, write_patients
    from clinqa.serve.app import create_app
    from clinqa.serve.audit import AuditLog
    from clinqa.serve.auth import KeyStore
    from clinqa.serve.config import ServeConfig

    write_patients(tmp_path / "bundles", synthesize_patients(1, seed=3))
    records = load_records(tmp_path / "bundles")
    key = KeyStore(tmp_path / "keys.sqlite").create("all", scopes="patient/*.read patient/*.ask")[1]
    counted = Counting(tiny_predictor)
    counted.tokenizer, counted.max_length = tiny_predictor.tokenizer, tiny_predictor.max_length
    counted.format_prompt = tiny_predictor.format_prompt
    n_mcq, n_ask = 6, 2
    config = ServeConfig(
        keys_db=tmp_path / "keys.sqlite",
        audit_db=tmp_path / "audit.sqlite",
        local_batching="on",
        batch_window_ms=2000,
        max_batch=n_mcq,
        model_concurrency=n_mcq + n_ask,
        max_new_tokens=8,
    )
    app = create_app(config, predictor=counted, records=records)
    runner = app.state.service.runner
    assert runner.coalescer is not None and runner.parallel == n_mcq + n_ask
    options = {"A": "aspirin", "B": "heparin", "C": "warfarin", "D": "alteplase"}
    headers = {"Authorization": f"Bearer {key}"}
    patient = records[0].patient_id

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            mcq = [
                c.post("/api/mcq", json={"question": q, "options": options, "method": "letter"}, headers=headers)
                for q in QUESTIONS[:n_mcq]
            ]
            ask = [
                c.post(
                    f"/api/patients/{patient}/ask", json={"question": f"Latest blood pressure? ({i})"}, headers=headers
                )
                for i in range(n_ask)
            ]
            return await asyncio.gather(*mcq, *ask)

    try:
        responses = asyncio.run(go())
    finally:
        app.state.service.close()
    assert [r.status_code for r in responses] == [200] * (n_mcq + n_ask), [r.text for r in responses]
    for q, r in zip(QUESTIONS, responses[:n_mcq]):  # each request's own answer, as if asked alone
        item = make_items([Question(id="api", question=q, options=options, answer="A")], shuffles=1, seed=0)[0]
        (alone,) = score_letter(tiny_predictor, [item])
        body = r.json()
        assert body["prediction"] == item.to_original[alone.pred]
        for letter, p in alone.probs.items():
            assert body["probabilities"][item.to_original[letter]] == pytest.approx(p, abs=1e-4)
    assert len(counted.sizes) < n_mcq + n_ask and max(counted.sizes) == n_mcq  # the MCQs went as one call
    with AuditLog(tmp_path / "audit.sqlite") as log:
        entries = log.entries()
    assert len(entries) == n_mcq + n_ask and {e.outcome for e in entries} == {"ok"}
    assert sorted(e.action for e in entries) == ["ask"] * n_ask + ["mcq"] * n_mcq


@pytest.mark.gpu
def test_on_a_gpu_auto_batches_and_batched_scores_equal_separate_ones(tokenizer, make_tiny_llama):
    from clinqa.models.local import LocalModel

    model = LocalModel.from_objects(make_tiny_llama(tokenizer).to("cuda"), tokenizer, spec="tiny", name="tiny")
    runner = ModelRunner(concurrency=4)  # batching "auto"
    runner.set_predictor(model)
    assert runner.coalescer is not None and runner.parallel == 4
    runner.close()
    co = Coalescer(model, window_s=LONG, max_batch=len(QUESTIONS))
    cands = [" A", " B", " C", " D"]
    got = concurrently([lambda q=q: co.next_token_logprobs([q], cands) for q in QUESTIONS])
    for q, g in zip(QUESTIONS, got):
        np.testing.assert_allclose(g, model.next_token_logprobs([q], cands), atol=1e-3)
    assert co.stats["batches"] == 1
    co.close()


def test_batching_settings_come_from_the_environment_and_bad_ones_are_one_line_errors(tmp_path):
    import subprocess
    import sys

    from clinqa.errors import ClinqaError
    from clinqa.serve.config import ServeConfig

    config = ServeConfig.load(
        env={"CLINQA_LOCAL_BATCHING": "on", "CLINQA_BATCH_WINDOW_MS": "2.5", "CLINQA_MAX_BATCH": "4"}
    )
    runner = ModelRunner.from_config(config)
    assert (runner.batching, runner.batch_window_s, runner.max_batch) == ("on", 0.0025, 4)
    runner.close()
    with pytest.raises(ClinqaError, match="local_batching"):
        ServeConfig.load(env={"CLINQA_LOCAL_BATCHING": "sometimes"})
    r = subprocess.run(
        [sys.executable, "-m", "clinqa.cli", "serve", "--local-batching", "sometimes", "--max-batch", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "local_batching" in r.stderr + r.stdout and "max_batch" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
