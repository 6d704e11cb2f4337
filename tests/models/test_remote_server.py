"""The OpenAI-compatible backend against a real HTTP fake server on loopback (tests/fake_openai.py):
concurrency, order, list batching, retries, clear errors, chat-only servers, resumable runs."""

import importlib.util
import sys
from pathlib import Path

import pytest

from clinqa.errors import ClinqaError
from clinqa.models.base import GenerationConfig
from clinqa.models.remote import OpenAIModel, RemoteConfig
from clinqa.models.spec import parse_spec


def load_fake():
    path = Path(__file__).resolve().parents[1] / "fake_openai.py"
    if "fake_openai" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fake_openai", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["fake_openai"] = module
        spec.loader.exec_module(module)
    return sys.modules["fake_openai"]


fake = load_fake()


def model_for(server, **config) -> OpenAIModel:
    m = OpenAIModel(server.url, "fake", config=RemoteConfig(backoff=0.001, **config))
    m.capabilities()  # the probe's requests happen before the counters are reset
    server.reset_counters()
    return m


def completions(server) -> list[dict]:
    return [body for path, body in server.requests if path.endswith("/completions") and "chat" not in path]


def test_spec_parameters():
    ms = parse_spec("openai:http://h:8000/v1#llama@concurrency=4,batch=2")
    assert ms.model_name == "llama" and dict(ms.params) == {"concurrency": "4", "batch": "2"}
    assert parse_spec(str(ms)) == ms
    assert RemoteConfig.from_params(dict(ms.params)) == RemoteConfig(concurrency=4, batch=2)
    with pytest.raises(ClinqaError, match="unknown parameter 'speed'"):
        RemoteConfig.from_params({"speed": "9"})
    with pytest.raises(ClinqaError, match="must be positive"):
        RemoteConfig.from_params({"concurrency": "0"})


def test_concurrent_requests_keep_order():
    contexts = [f"Question {i}?\nAnswer:" for i in range(24)]
    with fake.FakeOpenAI(latency=0.05) as server:
        m = model_for(server, concurrency=6, batch=1)
        lp = m.next_token_logprobs(contexts, [" A", " B", " C", " D"])
        assert len(completions(server)) == 24
        assert 1 < server.max_in_flight <= 6
    for row, ctx in zip(lp, contexts):  # every row is its own context's distribution
        top = fake.letter_top(ctx)
        assert list(row) == pytest.approx([top[f" {c}"] for c in "ABCD"])


def test_serial_at_concurrency_one():
    with fake.FakeOpenAI(latency=0.01) as server:
        m = model_for(server, concurrency=1, batch=1)
        m.next_token_logprobs([f"q{i}" for i in range(6)], [" A"])
        assert server.max_in_flight == 1 and len(completions(server)) == 6


def test_list_prompts_batch_requests():
    contexts = [f"Q{i}\nAnswer:" for i in range(10)]
    with fake.FakeOpenAI() as server:
        m = model_for(server, batch=4)
        lp = m.next_token_logprobs(contexts, [" A", " B"])
        sent = completions(server)
        assert sorted(len(b["prompt"]) if isinstance(b["prompt"], list) else 1 for b in sent) == [2, 4, 4]
    assert lp[7, 1] == pytest.approx(fake.letter_top(contexts[7])[" B"])


def _expected(context: str, cont: str) -> float:
    """The fake's echo log-likelihood of `cont` after `context`, computed from its token rule."""
    toks = fake.tokens(context + cont)
    total, pos = 0.0, 0
    for j, t in enumerate(toks):
        if j > 0 and pos >= len(context):
            total += fake.token_logprob("".join(toks[:j]), t)
        pos += len(t)
    return total


def test_option_scores_one_request_per_question():
    groups = [(f"Question {q}: which?\nAnswer:", [" alpha", " beta", " gamma", " delta"]) for q in range(5)]
    with fake.FakeOpenAI() as server:
        m = model_for(server, batch=4)
        m._echo_checked = True
        scored = m.score_continuations(groups)
        assert len(completions(server)) == 5  # 4 options of one question per request
    for (ctx, conts), row in zip(groups, scored):
        assert [s.logprob for s in row] == pytest.approx([_expected(ctx, c) for c in conts])
        assert all(s.n_tokens == 1 for s in row)


def test_servers_without_lists_get_one_prompt_per_request():
    with fake.FakeOpenAI(list_prompts=False) as server:
        m = model_for(server, batch=8)
        assert not m.capabilities().list_prompts and m.capabilities().echo
        m.next_token_logprobs(["a", "b", "c"], [" A"])
        assert [isinstance(b["prompt"], str) for b in completions(server)] == [True] * 3


def test_retries_on_429_and_500_then_success():
    with fake.FakeOpenAI() as server:
        m = model_for(server, tries=3)
        server.fail = [429, 500]
        lp = m.next_token_logprobs(["ctx"], [" A"])
        assert server.statuses == [429, 500, 200]
    assert lp[0, 0] == pytest.approx(fake.letter_top("ctx")[" A"])


def test_retries_a_dropped_connection():
    with fake.FakeOpenAI() as server:
        m = model_for(server, tries=2)
        server.fail = ["drop"]
        assert m.generate(["q"], GenerationConfig()) == [fake.chat_reply([{"content": "q"}])]


def test_clear_error_after_the_last_try():
    with fake.FakeOpenAI() as server:
        m = model_for(server, tries=3)
        server.fail = [503, 503, 503]
        with pytest.raises(ClinqaError) as exc:
            m.next_token_logprobs(["ctx"], [" A"])
        assert server.statuses == [503, 503, 503]
    message = str(exc.value)
    assert "\n" not in message and server.url in message and "failed after 3 tries; last: HTTP 503" in message


def test_invalid_json_is_one_line_error():
    with fake.FakeOpenAI() as server:
        m = model_for(server)
        server.fail = ["badjson"]
        with pytest.raises(ClinqaError, match="invalid JSON") as exc:
            m.next_token_logprobs(["ctx"], [" A"])
    assert "\n" not in str(exc.value)


def test_chat_only_server():
    with fake.FakeOpenAI(chat_only=True) as server:
        m = OpenAIModel(server.url, "fake", config=RemoteConfig(concurrency=4))
        assert not m.capabilities().completions and not m.logprobs_available
        prompts = [f"question {i}" for i in range(8)]
        assert m.generate(prompts) == [fake.chat_reply([{"content": p}]) for p in prompts]
        # a plain (non-chat) prompt goes as a chat message too
        assert m.generate(["plain"], GenerationConfig(chat=False)) == [fake.chat_reply([{"content": "plain"}])]
        with pytest.raises(ClinqaError, match="offers only /chat/completions"):
            m.next_token_logprobs(["x"], [" A"])
        with pytest.raises(ClinqaError, match="offers only /chat/completions"):
            m.score_continuations([("x", [" y"])])


def test_capabilities_are_probed_once_and_logged(caplog):
    with fake.FakeOpenAI() as server:
        m = OpenAIModel(server.url, "fake")
        with caplog.at_level("INFO", logger="clinqa.models"):
            m.capabilities()
            n = len(server.requests)
            m.capabilities()
        assert len(server.requests) == n
    assert any(
        "option scoring: echo+logprobs" in r.getMessage() and "32 requests in flight" in r.getMessage()
        for r in caplog.records
    )


def test_eval_run_resumes_after_a_crash(tmp_path):
    """Concurrency changes nothing in a run: a run broken mid-way (the server fails) resumes to the same
    predictions as an uninterrupted serial run."""
    from clinqa.evaluate import EvalConfig, evaluate, load_data

    with fake.FakeOpenAI() as server:
        spec = f"openai:{server.url}#fake"
        config = EvalConfig(model=spec, data="bundled", method="letter", limit=40)
        questions, _ = load_data(config)
        serial = OpenAIModel(server.url, "fake", config=RemoteConfig(concurrency=1, batch=1))
        want = {
            s.question_id: s.pred
            for s in evaluate(serial, questions, config, tmp_path / "serial", batch_size=8).samples()
        }

        fast = model_for(server, concurrency=8, batch=2, tries=1)
        calls = {"n": 0}
        original = fast._completions

        def dying(prompts, payload):
            calls["n"] += 1
            if calls["n"] == 9:  # a batch in the middle of the run fails for good
                raise ClinqaError("server went away")
            return original(prompts, payload)

        fast._completions = dying
        with pytest.raises(ClinqaError, match="went away"):
            evaluate(fast, questions, config, tmp_path / "fast", batch_size=8)
        saved = (tmp_path / "fast" / "samples.jsonl").read_text().splitlines()
        assert 0 < len(saved) < 40
        fast._completions = original
        got = {
            s.question_id: s.pred for s in evaluate(fast, questions, config, tmp_path / "fast", batch_size=8).samples()
        }
    assert got == want and len(got) == 40 and not any(p is None for p in got.values())


# ----------------------------------------------------------------------------------- chat-only: judge and annotator


def test_chat_only_judge_call_through_generation():
    """The judge on a chat-only server: `logprobs_available` is False, so the judge reads its grades
    from generated text (`reading="generate"`), sent as a chat with the judge's system prompt."""
    from clinqa.records.judge import JUDGE_SYSTEM, Judge, panel_prompt, parse_panel_grades

    prompt = panel_prompt("Last potassium?", "4.1 mmol/L", ["4.1 mmol/L [Observation/k1]", "Not in the record."])

    def reply(messages):
        return "Answer A: 4\nAnswer B: 1"

    with fake.FakeOpenAI(chat_only=True, reply=reply) as server:
        m = OpenAIModel(server.url, "fake")
        assert not m.logprobs_available
        [text] = Judge(m, reading="generate").generate([prompt])
        path, body = server.requests[-1]
    assert path.endswith("/chat/completions") and body["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM}
    assert body["messages"][-1]["content"] == prompt
    assert parse_panel_grades(text, 2) == [4, 1]


def test_chat_only_annotator_votes_by_parsed_labels():
    from clinqa.specialties.annotate import PROMPTS, annotate
    from clinqa.specialties.annotate_generate import count_unparsed

    def reply(messages):  # question 1: cardiology x3, unparseable x2; question 2: two ways, one unparseable
        text = messages[-1]["content"]
        k = next(i for i, t in enumerate(PROMPTS) if text.startswith(t.split("{q}")[0]))
        if "chest" in text:
            return ["Cardiology.", "Specialty: cardiology", "I cannot tell", "Cardiology or neurology", "cardio"][k]
        return ["Neurology", "Dermatology", "Neurology", "neuro", "**Pediatrics**"][k]

    with fake.FakeOpenAI(chat_only=True, reply=reply) as server:
        m = OpenAIModel(server.url, "fake")
        a1, a2 = annotate(m, [("q1", "crushing chest pain"), ("q2", "a seizure at home")], min_votes=3)
    assert a1.votes == {"cardiology": 3} and a1.label == "cardiology"
    assert a1.per_prompt == ["cardiology", "cardiology", "", "", "cardiology"]
    assert a2.votes == {"neurology": 3, "dermatology": 1, "pediatrics": 1} and a2.label == "neurology"
    assert a1.probs[0] == pytest.approx(3 / 5) and sum(a1.probs) == pytest.approx(3 / 5)
    assert count_unparsed([a1, a2]) == 2


def test_parse_label():
    from clinqa.specialties.annotate_generate import parse_label

    assert parse_label("Obstetrics & gynecology") == "obstetrics_gynecology"
    assert parse_label("The specialty is Hematology/oncology.") == "hematology_oncology"
    assert parse_label("Emergency medicine (toxicology)") == "emergency_medicine"
    assert parse_label("either surgery or dermatology") is None
    assert parse_label("") is None and parse_label("no idea") is None


def test_a_server_failing_on_lists_gets_one_prompt_per_request():
    """A server that answers 500 to a list of prompts (not a transient error) is probed without lists."""
    with fake.FakeOpenAI() as server:
        server.fail = [500] * 4  # the probe's list requests (with and without echo), twice each
        m = OpenAIModel(server.url, "fake", config=RemoteConfig(backoff=0.001))
        caps = m.capabilities()
    assert caps.completions and caps.echo and not caps.list_prompts


def test_cancel_stops_further_requests():
    """The service sets CANCEL when a request is abandoned: no new request starts and the call raises."""
    import threading

    from clinqa.models.remote import CANCEL, RemoteCancelled

    with fake.FakeOpenAI(latency=0.2) as server:
        m = model_for(server, concurrency=2, batch=1)
        cancel = threading.Event()
        token = CANCEL.set(cancel)
        threading.Timer(0.3, cancel.set).start()
        try:
            with pytest.raises(RemoteCancelled):
                m.next_token_logprobs([f"q{i}" for i in range(40)], [" A"])
        finally:
            CANCEL.reset(token)
        sent = len(completions(server))
    assert 0 < sent < 40


def test_spec_parameters_reach_the_backend(monkeypatch):
    from clinqa.models import load_base_model

    with fake.FakeOpenAI(latency=0.05) as server:
        m = load_base_model(f"openai:{server.url}#fake@concurrency=3,batch=1,tries=2")
        assert m.config == RemoteConfig(concurrency=3, batch=1, tries=2) and m.info.spec.endswith(
            "#fake@concurrency=3,batch=1,tries=2"
        )
        m.capabilities()
        server.reset_counters()
        m.next_token_logprobs([f"q{i}" for i in range(12)], [" A"])
        assert 1 < server.max_in_flight <= 3
        monkeypatch.setenv("CLINQA_OPENAI_CONCURRENCY", "5")  # the flag that leaves the spec (a run's identity) alone
        assert load_base_model(f"openai:{server.url}#fake@batch=2").config.concurrency == 5


def test_option_scores_from_vllm_prompt_logprobs_when_echo_is_refused():
    groups = [(f"Question {q}: which?\nAnswer:", [" alpha", " beta gamma"]) for q in range(3)]
    with fake.FakeOpenAI(echo=False, prompt_logprobs=True) as server:
        m = model_for(server, batch=2)
        assert not m.capabilities().echo and m.capabilities().prompt_logprobs
        scored = m.score_continuations(groups)
        sent = completions(server)
    assert len(sent) == 3 and all(b.get("prompt_logprobs") == 0 for b in sent)  # one request per question
    for (ctx, conts), row in zip(groups, scored):
        assert [s.logprob for s in row] == pytest.approx([_expected(ctx, c) for c in conts])
        assert [s.n_tokens for s in row] == [1, 2]


@pytest.mark.parametrize(
    "args",
    [
        ["analyze", "token-shift", "{spec}", "adapterA", "bundled", "--out", "{out}"],
        ["experiment", "cross-specialty", "{spec}", "bundled", "--out", "{out}"],
    ],
)
def test_commands_that_switch_adapters_refuse_a_remote_model(args, tmp_path):
    """token-shift and cross-specialty need the LoadsAdapters capability: a server model lacks it."""
    import subprocess

    from clinqa.models.base import LoadsAdapters

    with fake.FakeOpenAI() as server:
        spec = f"openai:{server.url}#fake"
        assert not isinstance(model_for(server), LoadsAdapters)
        argv = [a.format(spec=spec, out=tmp_path / "out") for a in args]
        r = subprocess.run([sys.executable, "-m", "clinqa.cli", *argv], capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "needs a local base model" in lines[0]
