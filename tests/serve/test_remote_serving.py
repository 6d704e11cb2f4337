"""The service in front of a remote (OpenAI-compatible) backend: concurrent model calls, one audit entry per
request; a client that disconnects has its model call cancelled (audited `cancelled`); fine-tuned stages."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from clinqa.models.base import ModelInfo
from clinqa.models.remote import OpenAIModel, RemoteConfig
from clinqa.records.fhir import load_records
from clinqa.records.synth import synthesize_patients, write_patients
from clinqa.serve.app import create_app
from clinqa.serve.audit import AuditLog
from clinqa.serve.auth import KeyStore
from clinqa.serve.config import ServeConfig


def load_fake():
    if "fake_openai" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "fake_openai", Path(__file__).resolve().parents[1] / "fake_openai.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["fake_openai"] = module
        spec.loader.exec_module(module)
    return sys.modules["fake_openai"]


fake = load_fake()
OPTIONS = {"A": "aspirin", "B": "heparin", "C": "warfarin", "D": "alteplase"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_serve")
    write_patients(root / "bundles", synthesize_patients(2, seed=3))
    records = load_records(root / "bundles")
    store = KeyStore(root / "keys.sqlite")
    key = store.create("all", scopes="patient/*.read patient/*.ask")[1]
    return {
        "records": records,
        "keys_db": root / "keys.sqlite",
        "key": {"Authorization": f"Bearer {key}"},
        "patient": records[0].patient_id,
    }


def make_app(world, tmp_path, predictor, **kw):
    config = ServeConfig(keys_db=world["keys_db"], audit_db=tmp_path / "audit.sqlite", **kw)
    return create_app(config, predictor=predictor, records=world["records"])


def audit_entries(tmp_path):
    with AuditLog(tmp_path / "audit.sqlite") as log:
        return log.entries()


def gather(app, requests):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            return await asyncio.gather(*[c.post(url, json=body, headers=headers) for url, body, headers in requests])

    try:
        return asyncio.run(go())
    finally:
        app.state.service.close()


def test_concurrent_requests_through_a_remote_backend(world, tmp_path):
    questions = [f"Which drug is a direct thrombin inhibitor? (case {i})" for i in range(8)]
    with fake.FakeOpenAI(latency=0.3) as server:
        model = OpenAIModel(server.url, "fake", config=RemoteConfig(concurrency=8))
        model.capabilities()
        server.reset_counters()
        app = make_app(world, tmp_path, model, model_concurrency=4)
        assert app.state.service.runner.parallel == 4
        responses = gather(
            app,
            [("/api/mcq", {"question": q, "options": OPTIONS, "method": "letter"}, world["key"]) for q in questions],
        )
        assert 1 < server.max_in_flight <= 4  # calls overlapped, within the service's bound
    assert [r.status_code for r in responses] == [200] * 8
    from clinqa.data.schema import Question
    from clinqa.evaluate import prompts
    from clinqa.evaluate.methods import make_items

    for q, r in zip(questions, responses):  # each answer is its own question's (no mix-up between concurrent calls)
        item = make_items([Question(id="api", question=q, options=OPTIONS, answer="A")], shuffles=1, seed=0)[0]
        top = fake.letter_top(prompts.letter_prompt(item.question, item.options))
        shown = max("ABCD", key=lambda c: top[f" {c}"])
        assert r.json()["prediction"] == item.to_original[shown]
    entries = audit_entries(tmp_path)
    assert len(entries) == 8 and {e.outcome for e in entries} == {"ok"} and {e.action for e in entries} == {"mcq"}


def test_ask_through_a_chat_only_server(world, tmp_path):
    with fake.FakeOpenAI(chat_only=True) as server:
        app = make_app(world, tmp_path, OpenAIModel(server.url, "fake"))
        [r] = gather(
            app, [(f"/api/patients/{world['patient']}/ask", {"question": "What medications are active?"}, world["key"])]
        )
    assert r.status_code == 200, r.text
    assert r.json()["answer"].startswith("Answer:")  # the fake chat server's reply, through /chat/completions
    assert [e.outcome for e in audit_entries(tmp_path)] == ["ok"]


class SlowLocal:
    """A local-model stand-in: every generation step runs a torch module (the runner can abort it)."""

    def __init__(self, steps: int = 400):
        self.info = ModelInfo(spec="slow", backend="local", name="slow")
        self.model = torch.nn.Linear(2, 2)
        self.steps = steps
        self.steps_done: list[int] = []
        self.started = threading.Event()

    def generate(self, prompts, config=None):
        done = 0
        self.started.set()
        try:
            for _ in range(self.steps):
                self.model(torch.zeros(1, 2))
                time.sleep(0.05)
                done += 1
        finally:
            self.steps_done.append(done)
        return ["no answer" for _ in prompts]

    def next_token_logprobs(self, contexts, candidates):
        return np.zeros((len(contexts), len(candidates)))

    def score_continuations(self, groups):
        raise NotImplementedError

    def hidden_states(self, texts, layers):
        raise NotImplementedError


def _uvicorn(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.025)
    return server, thread, port


def test_client_disconnect_cancels_the_model_call(world, tmp_path):
    predictor = SlowLocal()
    app = make_app(world, tmp_path, predictor, request_timeout_s=600)
    server, thread, port = _uvicorn(app)
    try:
        body = json.dumps({"question": "What was the last blood pressure?"}).encode()
        head = (
            f"POST /api/patients/{world['patient']}/ask HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: {world['key']['Authorization']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + body)
            assert predictor.started.wait(30)  # the model call is running ...
        # ... and the client has gone: the call is stopped and audited as cancelled
        for _ in range(600):
            if predictor.steps_done and audit_entries(tmp_path):
                break
            time.sleep(0.05)
        (entry,) = audit_entries(tmp_path)
        assert entry.outcome == "cancelled" and entry.action == "ask"
        assert predictor.steps_done[0] < predictor.steps  # generation was aborted, not run to the end
        # the worker is free again: the next request is answered
        r = httpx.get(f"http://127.0.0.1:{port}/api/patients", headers=world["key"], timeout=30)
        assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_local_model_keeps_one_call_at_a_time(world, tmp_path):
    app = make_app(world, tmp_path, SlowLocal(steps=1), model_concurrency=8)
    assert app.state.service.runner.parallel == 1
    app.state.service.close()


def test_serve_settings_for_concurrency_and_adapters(tmp_path):
    (tmp_path / "serve.toml").write_text('model_concurrency = 16\nadapters = "stages"\n')
    config = ServeConfig.load(tmp_path / "serve.toml", env={})
    assert config.model_concurrency == 16 and config.adapters == tmp_path / "stages"
    with pytest.raises(Exception, match="model_concurrency"):
        ServeConfig.load(env={"CLINQA_MODEL_CONCURRENCY": "0"})


def test_adapters_deploy_the_fine_tuned_selector(tmp_path, monkeypatch):
    """`serve --adapters DIR` reads stages.json like `records eval --adapters`: stage 2 answers, stage 1 is the
    LLM selector on the stage-1 adapter with the tuned threshold."""
    from clinqa.records.pipeline import LLMSelector
    from clinqa.serve import runner

    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "stages.json").write_text(
        json.dumps({"base": "default", "stage1": "/old/place/s1", "stage2": "/old/place/s2", "threshold": 0.37})
    )
    loaded = []

    def fake_load(spec):
        loaded.append(spec)
        return SlowLocal(steps=1)

    monkeypatch.setattr("clinqa.adapt.load_predictor", fake_load)
    predictor, selector = runner.load_models(ServeConfig(model="default", adapters=tmp_path / "st"))
    assert loaded == [f"default+lora:{tmp_path / 'st' / 's2'}", f"default+lora:{tmp_path / 'st' / 's1'}"]
    assert isinstance(selector, LLMSelector) and selector.threshold == pytest.approx(0.37)
    predictor, selector = runner.load_models(ServeConfig(model="default"))
    assert selector is None and loaded[-1] == "default"
