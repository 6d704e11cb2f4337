"""The OpenAI-compatible backend against vLLM-shaped responses (httpx.MockTransport: no network)."""

import json

import httpx
import numpy as np
import pytest

from clinqa.errors import ClinqaError
from clinqa.models.base import GenerationConfig
from clinqa.models.remote import ABSENT_LOGPROB, OpenAIModel


def handler(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content or b"{}")
    if isinstance(body.get("prompt"), list):  # the capability probe's list of prompts: not accepted here
        return httpx.Response(400, json={"error": "prompt must be a string"})
    if request.url.path.endswith("/models"):
        return httpx.Response(200, json={"data": [{"id": "smol"}]})
    if request.url.path.endswith("/chat/completions"):
        return httpx.Response(200, json={"choices": [{"message": {"content": " Answer: B "}}]})
    if body.get("echo"):
        # prompt "Ctx: yes" tokenised as ["Ctx", ":", " yes"] + one generated token
        if body["prompt"] == "Hello":  # the capability probe
            return httpx.Response(
                200,
                json={
                    "choices": [
                        {
                            "text": "Hello!",
                            "logprobs": {
                                "tokens": ["Hello", "!"],
                                "text_offset": [0, 5],
                                "token_logprobs": [None, -1.0],
                                "top_logprobs": [None, {"!": -1.0}],
                            },
                        }
                    ]
                },
            )
        return httpx.Response(
            200,
            json={
                "choices": [
                    {
                        "text": body["prompt"] + "!",
                        "logprobs": {
                            "tokens": ["Ctx", ":", " yes", "!"],
                            "text_offset": [0, 3, 4, 8],
                            "token_logprobs": [None, -1.0, -0.5, -2.0],
                            "top_logprobs": [None, {":": -1.0}, {" yes": -0.5, " no": -1.5}, {"!": -2.0}],
                        },
                    }
                ]
            },
        )
    if body.get("prompt") == "Ctx:":  # the alignment check's plain next-token request
        return httpx.Response(
            200,
            json={
                "choices": [
                    {
                        "text": " yes",
                        "logprobs": {
                            "tokens": [" yes"],
                            "token_logprobs": [-0.5],
                            "top_logprobs": [{" yes": -0.5, " no": -1.5}],
                        },
                    }
                ]
            },
        )
    return httpx.Response(
        200,
        json={
            "choices": [
                {
                    "text": " A",
                    "logprobs": {
                        "tokens": [" A"],
                        "token_logprobs": [-0.2],
                        "top_logprobs": [{" A": -0.2, " B": -1.9, "C": -3.0}],
                    },
                }
            ]
        },
    )


@pytest.fixture()
def model():
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return OpenAIModel("http://server/v1", client=client)


def test_model_name_from_server(model):
    assert model.model == "smol" and model.info.backend == "openai"


def test_continuation_logprob_from_echo(model):
    [[s]] = model.score_continuations([("Ctx:", [" yes"])])
    assert s.logprob == pytest.approx(-0.5) and s.n_tokens == 1 and s.greedy


def test_shifted_echo_logprobs_are_refused():
    """llama-cpp-python without a BOS token reports each prompt token's log-prob one position late."""

    def shifted(request):
        body = json.loads(request.content or b"{}")
        if body.get("echo") and body["prompt"] != "Hello":
            return httpx.Response(
                200,
                json={
                    "choices": [
                        {
                            "text": body["prompt"],
                            "logprobs": {
                                "tokens": ["Ctx", ":", " yes"],
                                "text_offset": [0, 3, 4],
                                "token_logprobs": [None, -7.0, -6.0],
                                "top_logprobs": [None, {" yes": -0.5, ":": -7.0}, {"\n": -0.1, " yes": -6.0}],
                            },
                        }
                    ]
                },
            )
        return handler(request)

    m = OpenAIModel("http://server/v1", "m", client=httpx.Client(transport=httpx.MockTransport(shifted)))
    with pytest.raises(ClinqaError, match="shifted by one token"):
        m.score_continuations([("Ctx:", [" yes"])])


def test_next_token_candidates_from_top_logprobs(model):
    lp = model.next_token_logprobs(["Q\nAnswer:"], [" A", " B", " C", " D"])
    np.testing.assert_allclose(lp[0, :3], [-0.2, -1.9, -3.0])
    assert lp[0, 3] == ABSENT_LOGPROB  # finite: samples.jsonl is JSON


def test_next_token_retries_past_end_of_sequence():
    """llama-cpp-python returns no log-probs when the greedy token is EOS; min_tokens=1 gets them."""

    def eos_first(request):
        body = json.loads(request.content or b"{}")
        if body.get("min_tokens") or body.get("echo") or isinstance(body.get("prompt"), list):
            return handler(request)
        return httpx.Response(
            200,
            json={
                "choices": [
                    {
                        "text": "",
                        "finish_reason": "stop",
                        "logprobs": {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []},
                    }
                ]
            },
        )

    m = OpenAIModel("http://server/v1", "m", client=httpx.Client(transport=httpx.MockTransport(eos_first)))
    assert m.next_token_logprobs(["Q\nAnswer:"], [" A"])[0, 0] == pytest.approx(-0.2)


def test_chat_generation(model):
    assert model.generate(["q"], GenerationConfig()) == ["Answer: B"]


def test_hidden_states_not_supported(model):
    with pytest.raises(ClinqaError, match="not supported by the OpenAI-compatible backend"):
        model.hidden_states(["x"], [1])


def test_http_error_is_clear():
    client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(401, text="bad key")))
    with pytest.raises(ClinqaError, match="answered HTTP 401: bad key"):
        OpenAIModel("http://server/v1", "m", client=client).generate(["q"])
