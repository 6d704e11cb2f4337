"""The openai: backend against a real llama.cpp server (llama-cpp-python) serving the embedded GGUF.

Skipped unless the optional extra is installed: pip install -e '.[llamacpp]'. The server runs the
Q4_1 GGUF with llama.cpp's kernels while `default` dequantises the same file into fp32 torch
weights, so the two agree closely but not bit for bit: we check agreement, not equality.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("llama_cpp.server", reason="needs the llamacpp extra: pip install -e '.[llamacpp]'")

from typer.testing import CliRunner  # noqa: E402

from clinqa.adapt import load_predictor  # noqa: E402
from clinqa.cli import app  # noqa: E402
from clinqa.errors import ClinqaError  # noqa: E402
from clinqa.evaluate import EvalConfig, evaluate, load_data  # noqa: E402
from clinqa.models.base import GenerationConfig  # noqa: E402
from clinqa.models.embedded import embedded_gguf  # noqa: E402
from clinqa.models.remote import ABSENT_LOGPROB, OpenAIModel  # noqa: E402

pytestmark = pytest.mark.embedded
ALIAS = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server(log: Path, *extra: str):
    """`python -m llama_cpp.server` with the embedded GGUF on a free loopback port; yields its openai: spec."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(embedded_gguf()),
        "--model_alias",
        ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        "1",
        "--n_threads_batch",
        "1",
        *extra,
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server did not answer within 120 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"openai:{url}#{ALIAS}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    with llama_server(tmp_path_factory.mktemp("llamacpp") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def remote(spec):
    return load_predictor(spec)


def test_served_model_is_listed(remote):
    assert remote.info.backend == "openai" and remote.model == ALIAS


def test_generate_answers_a_clinical_prompt(remote):
    [text] = remote.generate(
        ["A 60-year-old man has crushing chest pain radiating to his left arm. What is the most likely diagnosis?"],
        GenerationConfig(max_new_tokens=40),
    )
    assert len(text.split()) >= 3


def test_next_token_logprobs_match_local_model(remote, embedded_predictor):
    """The letter method's input: log-probabilities of ' A'..' D' after an MMLU-style prompt."""
    prompt = (
        "Which drug is first-line for anaphylaxis?\nA. Intramuscular adrenaline\nB. Oral cetirizine\n"
        "C. Intravenous hydrocortisone\nD. Nebulised salbutamol\nAnswer:"
    )
    cands = [" A", " B", " C", " D"]
    ours, local = (
        remote.next_token_logprobs([prompt], cands)[0],
        embedded_predictor.next_token_logprobs([prompt], cands)[0],
    )
    seen = ours > ABSENT_LOGPROB  # the server reports its top-20 tokens only
    assert seen.sum() >= 2 and np.argmax(ours) == np.argmax(local)
    np.testing.assert_allclose(ours[seen], local[seen], atol=0.5)  # Q4_1 kernels vs dequantised fp32


def test_option_scoring_refuses_shifted_echo_logprobs(remote):
    """llama-cpp-python shifts echoed prompt log-probs by a token for models without BOS (SmolLM2):
    the backend must refuse rather than score --method option wrongly."""
    with pytest.raises(ClinqaError, match="shifted by one token"):
        remote.score_continuations([("The capital of France is", [" Paris"])])


def test_option_scoring_with_a_bos_token(tmp_path):
    """With the server told to add a BOS token the echoed log-probs line up and option scoring works."""
    with llama_server(tmp_path / "server.log", "--kv_overrides", "tokenizer.ggml.add_bos_token=bool:true") as s:
        model = OpenAIModel(s.split("#")[0][len("openai:") :], ALIAS)
        [[paris, london]] = model.score_continuations([("The capital of France is", [" Paris", " London"])])
    assert paris.greedy and paris.logprob > -1.0 > london.logprob and paris.n_tokens == 1


def test_letter_predictions_agree_with_local_model(spec, remote, embedded_predictor, tmp_path):
    config = EvalConfig(model=spec, data="bundled", method="letter", limit=40)
    questions, _ = load_data(config)
    preds = {}
    for name, predictor in (("remote", remote), ("local", embedded_predictor)):
        run = evaluate(predictor, questions, replace(config, model=predictor.info.spec), tmp_path / name)
        preds[name] = {s.question_id: s.pred for s in run.samples()}
    same = sum(preds["remote"][q] == preds["local"][q] for q in preds["local"])
    print(f"letter predictions identical on {same}/{len(questions)} questions")
    assert same >= 0.9 * len(questions)


def test_cli_eval_writes_a_run_folder(spec, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        ["eval", spec, "bundled", "--method", "letter", "--limit", "20", "--out", str(out)],
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.exit_code == 0, r.output
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 20 and all(s["pred"] in s["options"] for s in samples)
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["model"] == spec and meta["finished_at"]
    assert meta["counts"]["model_info"]["backend"] == "openai" and meta["counts"]["samples"] == 20
