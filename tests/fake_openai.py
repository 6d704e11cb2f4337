"""A fake OpenAI-compatible server on 127.0.0.1 (a random free port) for tests and benchmarks.

Deterministic answers computed from the prompt text, a fixed latency per request, scripted failures,
and counters: requests served, and the most requests that were in flight at the same time.

    with FakeOpenAI(latency=0.05, fail=[429, 500]) as server:   # the first two requests fail
        model = OpenAIModel(server.url, "fake")

Loaded by path (tests use --import-mode=importlib): see load_fake() in the tests that use it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

LETTERS = "ABCDE"


def _h(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def letter_top(prompt: str) -> dict[str, float]:
    """The fake next-token distribution after a prompt: ' A'..' E' with prompt-dependent log-probs."""
    return {f" {c}": -((_h(prompt + c) % 1000) / 200.0) - 0.01 * i for i, c in enumerate(LETTERS)}


def tokens(text: str) -> list[str]:
    """Whitespace-led words: ' yes', ':' stay separate tokens; concatenating gives the text back."""
    out, cur = [], ""
    for ch in text:
        if cur and (ch.isspace() or not cur[-1].isspace()) and (ch.isspace() or ch in ":.?,"):
            out.append(cur)
            cur = ""
        cur += ch
    if cur:
        out.append(cur)
    return out


def token_logprob(prefix: str, token: str) -> float:
    return -((_h(prefix + "|" + token) % 1000) / 250.0)


def chat_reply(messages: list[dict]) -> str:
    """'Answer: X' with X from the last user message's hash; a grade '3' for judge prompts."""
    text = messages[-1]["content"]
    if "Grade" in text or "grade" in text:
        return str(_h(text) % 5)
    return f"Answer: {LETTERS[_h(text) % 4]}"


class FakeOpenAI:
    def __init__(
        self,
        *,
        latency: float = 0.0,
        fail: Sequence[int | str] = (),
        chat_only: bool = False,
        list_prompts: bool = True,
        echo: bool = True,
        prompt_logprobs: bool = False,
        model: str = "fake",
        reply: Callable[[list[dict]], str] = chat_reply,
    ):
        self.latency = latency
        self.fail = list(fail)  # statuses (or "drop", "badjson") for the next requests, in order
        self.chat_only, self.list_prompts, self.echo, self.model, self.reply = (
            chat_only,
            list_prompts,
            echo,
            model,
            reply,
        )
        self.prompt_logprobs = (
            prompt_logprobs  # vLLM's extension: per prompt token {id: {logprob, rank, decoded_token}}
        )
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[tuple[str, dict]] = []
        self.statuses: list[int] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeOpenAI:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset_counters(self) -> None:
        with self.lock:
            self.max_in_flight = 0
            self.requests.clear()
            self.statuses.clear()

    # ------------------------------------------------------------------ answers

    def completion(self, body: dict) -> tuple[int, dict]:
        if self.chat_only:
            return 404, {"error": {"message": "only /v1/chat/completions"}}
        prompts = body.get("prompt")
        if isinstance(prompts, list) and not self.list_prompts:
            return 400, {"error": {"message": "prompt must be a string"}}
        if body.get("echo") and not self.echo:
            return 400, {"error": {"message": "echo is not supported"}}
        choices = []
        for i, prompt in enumerate(prompts if isinstance(prompts, list) else [prompts]):
            top = letter_top(prompt)
            gen = max(top, key=top.get)
            k = body.get("logprobs")
            if body.get("echo"):
                toks = tokens(prompt) + [gen]
                offs, pos = [], 0
                for t in toks:
                    offs.append(pos)
                    pos += len(t)
                lps = [None] + [token_logprob("".join(toks[:j]), toks[j]) for j in range(1, len(toks) - 1)] + [top[gen]]
                tops = [None] + [{t: lp} for t, lp in zip(toks[1:], lps[1:])]
                logprobs = {"tokens": toks, "text_offset": offs, "token_logprobs": lps, "top_logprobs": tops}
                text = prompt + gen
            else:
                logprobs = (
                    {
                        "tokens": [gen],
                        "text_offset": [len(prompt)],
                        "token_logprobs": [top[gen]],
                        "top_logprobs": [dict(sorted(top.items(), key=lambda kv: -kv[1])[:k])],
                    }
                    if k
                    else None
                )
                text = gen if body.get("max_tokens", 16) <= 1 else f"{gen} is the answer"
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": "length"}
            if self.prompt_logprobs and body.get("prompt_logprobs") is not None:
                toks = tokens(prompt)
                choice["prompt_logprobs"] = [None] + [
                    {
                        str(_h(t) % 50000): {
                            "logprob": token_logprob("".join(toks[:j]), t),
                            "rank": 1,
                            "decoded_token": t,
                        }
                    }
                    for j, t in enumerate(toks)
                    if j > 0
                ]
            choices.append(choice)
        return 200, {"id": "cmpl", "object": "text_completion", "model": self.model, "choices": choices}

    def chat(self, body: dict) -> tuple[int, dict]:
        text = self.reply(body["messages"])
        return 200, {
            "id": "chat",
            "object": "chat.completion",
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        }

    # ------------------------------------------------------------------ HTTP

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict | bytes) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with fake.lock:
                    fake.statuses.append(status)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": fake.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with fake.lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.requests.append((self.path, body))
                    failure = fake.fail.pop(0) if fake.fail else None
                try:
                    if fake.latency:
                        time.sleep(fake.latency)
                    if failure == "drop":  # close the connection without an answer
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if failure == "badjson":
                        self._send(200, b"<html>not json")
                        return
                    if failure is not None:
                        self._send(int(failure), {"error": {"message": f"scripted {failure}"}})
                        return
                    if self.path.endswith("/chat/completions"):
                        self._send(*fake.chat(body))
                    elif self.path.endswith("/completions"):
                        self._send(*fake.completion(body))
                    else:
                        self._send(404, {"error": {"message": "not found"}})
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        return Handler
