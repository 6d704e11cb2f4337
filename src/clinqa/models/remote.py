"""OpenAI-compatible backend (vLLM, llama.cpp server, hosted chat APIs) at cluster speed.

Requests run concurrently on a thread pool sharing one httpx.Client: at most ``concurrency`` in
flight (default 32; ``openai:URL#MODEL@concurrency=8``, or the CLINQA_OPENAI_CONCURRENCY environment
variable, which leaves the spec -- and so a run's identity -- unchanged). Results come back in input
order. 429, 5xx, timeouts and dropped connections are retried with exponential backoff and jitter
(``tries`` in all, default 6), then a one-line error names the server and the last status.

What the server offers is probed once, on first use, and logged (logger ``clinqa.models``):

- completions with a list of prompts: several prompts per ``/v1/completions`` request (``batch``
  prompts, default 16), e.g. all options of a question in one request;
- ``echo`` + ``logprobs`` (vLLM, llama.cpp): option log-likelihoods; else vLLM's ``prompt_logprobs``;
  a one-time check refuses servers that shift echoed log-probs by a token (llama-cpp-python without BOS);
- chat only (hosted APIs): ``generate`` works; log-probability methods raise a one-line error, and
  ``logprobs_available`` is False so callers (the judge, the specialty annotator) switch to generation.

Hidden states never leave a server, so steering needs a local backend.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import httpx
import numpy as np

from clinqa.errors import ClinqaError
from clinqa.models.base import ContinuationScore, GenerationConfig, ModelInfo

log = logging.getLogger("clinqa.models")

TOP_LOGPROBS = 20
# next_token_logprobs' value for a candidate outside the server's top-20: "practically zero", but finite,
# because run files are JSON (no infinities) and a -inf score made samples.jsonl unreadable.
ABSENT_LOGPROB = -1e4
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# Set (to a threading.Event) by a caller that may abandon a call (the service): once the event is set no
# new request starts, retries stop, and the call raises RemoteCancelled at once.
CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("clinqa_remote_cancel", default=None)
T = TypeVar("T")


class RemoteCancelled(ClinqaError):
    """The caller abandoned the call (see CANCEL)."""


@dataclass(frozen=True)
class RemoteConfig:
    """Throughput knobs of the backend (none changes a result): the spec's @key=value parameters."""

    concurrency: int = 32  # requests in flight
    batch: int = 16  # prompts per /v1/completions request where the server takes a list
    tries: int = 6  # attempts per request (429, 5xx, timeouts, dropped connections are retried)
    backoff: float = 0.5  # first retry delay in seconds, doubled each try (+-50% jitter), at most 30 s
    timeout: float = 120.0  # seconds per request

    @classmethod
    def from_params(cls, params: dict[str, str], where: str = "openai:") -> RemoteConfig:
        kinds = {"concurrency": int, "batch": int, "tries": int, "backoff": float, "timeout": float}
        values: dict[str, Any] = {}
        env = os.environ.get("CLINQA_OPENAI_CONCURRENCY")
        if env and "concurrency" not in params:
            params = {**params, "concurrency": env}
        for key, raw in params.items():
            if key not in kinds:
                raise ClinqaError(
                    f"unknown parameter {key!r} in {where!r}: use {', '.join(kinds)} (e.g. @concurrency=8)"
                )
            try:
                values[key] = kinds[key](raw)
            except ValueError:
                raise ClinqaError(f"parameter {key}={raw!r} in {where!r} is not a number") from None
            if values[key] <= 0 or (key == "backoff" and values[key] < 0):
                raise ClinqaError(f"parameter {key}={raw!r} in {where!r} must be positive")
        return cls(**values)


@dataclass
class Capabilities:
    completions: bool = True  # /v1/completions answers
    list_prompts: bool = False  # a list of prompts in one completions request
    echo: bool = False  # echo + logprobs gives prompt-token log-probabilities
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs extension
    next_token: bool = False  # top log-probabilities of a generated token

    def summary(self) -> str:
        if not self.completions:
            return "chat only (/chat/completions): generation works; letter/option scoring does not"
        option = "echo+logprobs" if self.echo else "prompt_logprobs" if self.prompt_logprobs else "unavailable"
        return (
            f"completions ({'lists of prompts' if self.list_prompts else 'one prompt per request'}); "
            f"option scoring: {option}; letter scoring: {'top logprobs' if self.next_token else 'unavailable'}"
        )


class OpenAIModel:
    def __init__(
        self,
        base_url: str,
        model: str = "",
        *,
        spec: str | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        client: httpx.Client | None = None,
        config: RemoteConfig | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.config = config or RemoteConfig.from_params({})
        if timeout is not None:
            self.config = RemoteConfig(**{**self.config.__dict__, "timeout": timeout})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(
            max_connections=self.config.concurrency + 4, max_keepalive_connections=self.config.concurrency + 4
        )
        self.client = client or httpx.Client(
            base_url=self.base_url, timeout=self.config.timeout, headers=headers, limits=limits
        )
        served = self._served_models(required=not model)
        self.model = model or served[0]
        self._echo_checked = False
        self._caps: Capabilities | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.info = ModelInfo(spec=spec or f"openai:{self.base_url}#{self.model}", backend="openai", name=self.model)

    # ------------------------------------------------------------------ transport

    def _post(self, path: str, payload: dict, *, probe: bool = False) -> dict:
        """POST with retries; a probe (2 tries) returns {"_status": code} for an HTTP error instead of raising."""
        url = f"{self.base_url}{path}"
        cancel = CANCEL.get()
        last = ""
        tries = min(self.config.tries, 2) if probe else self.config.tries
        status = 0
        for attempt in range(tries):
            if cancel is not None and cancel.is_set():
                raise RemoteCancelled(f"{url}: the call was cancelled")
            retry_after = None
            try:
                r = self.client.post(url, json=payload)
            except httpx.HTTPError as exc:  # timeouts, refused or dropped connections
                last = exc.__class__.__name__
                if probe and attempt == 0 and isinstance(exc, httpx.ConnectError):
                    raise ClinqaError(f"cannot reach {url} ({last}): is the server running?") from None
            else:
                if r.status_code < 400:
                    try:
                        data = r.json()
                    except ValueError:
                        raise ClinqaError(
                            f"{url} answered HTTP {r.status_code} with invalid JSON: {_one_line(r.text)[:120]!r}"
                        ) from None
                    if not isinstance(data, dict):
                        raise ClinqaError(f"{url} answered HTTP {r.status_code} with JSON that is not an object")
                    return data
                last = f"HTTP {r.status_code}: {_one_line(r.text)[:200]}"
                status = r.status_code
                retry_after = r.headers.get("retry-after")
                if r.status_code not in RETRY_STATUS:
                    if probe:
                        return {"_status": r.status_code}
                    raise ClinqaError(f"{url} answered {last}")
            if attempt + 1 < tries:
                delay = min(30.0, self.config.backoff * 2**attempt) * random.uniform(0.5, 1.5)
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, min(float(retry_after), 60.0))
                if cancel is not None:
                    if cancel.wait(delay):
                        raise RemoteCancelled(f"{url}: the call was cancelled")
                else:
                    time.sleep(delay)
        if probe and status:  # e.g. a server that fails with 500 on a list of prompts: not supported
            return {"_status": status}
        raise ClinqaError(f"{url} failed after {tries} tries; last: {last}")

    def _map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """fn over items with at most `concurrency` in flight; results in input order; the first error wins."""
        if len(items) <= 1 or self.config.concurrency == 1:
            return [fn(x) for x in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="clinqa-remote")
        cancel = CANCEL.get()
        futures: list[Future] = [self._pool.submit(contextvars.copy_context().run, fn, x) for x in items]
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.1 if cancel is not None else None, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        raise f.exception()  # type: ignore[misc]
                if cancel is not None and cancel.is_set():
                    raise RemoteCancelled(f"{self.base_url}: the call was cancelled")
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _served_models(self, required: bool) -> list[str]:
        """Check the server answers (fail fast, before any run folder is written) and list its models."""
        try:
            r = self.client.get(f"{self.base_url}/models")
        except httpx.HTTPError as exc:
            raise ClinqaError(
                f"cannot reach {self.base_url} ({exc.__class__.__name__}): is the server running?"
            ) from exc
        try:
            r.raise_for_status()
            models = [m["id"] for m in r.json()["data"]]
            if models or not required:
                return models
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            if not required:
                return []
        raise ClinqaError(
            f"cannot list models at {self.base_url}/models: name the model explicitly with openai:URL#MODEL"
        )

    # ------------------------------------------------------------------ what the server offers

    def capabilities(self) -> Capabilities:
        """Probe the server once (a few tiny requests) and log what will be used."""
        with self._lock:
            if self._caps is None:
                self._caps = self._probe()
                log.info(
                    "%s (%s): %s; %d requests in flight, %d prompts per request",
                    self.base_url,
                    self.model,
                    self._caps.summary(),
                    self.config.concurrency,
                    self.config.batch if self._caps.list_prompts else 1,
                )
            return self._caps

    @property
    def logprobs_available(self) -> bool:
        """False for a chat-only server: next_token_logprobs and score_continuations cannot work there."""
        caps = self.capabilities()
        return caps.completions and (caps.next_token or caps.echo or caps.prompt_logprobs)

    def _probe(self) -> Capabilities:
        base = {"model": self.model, "max_tokens": 1, "temperature": 0, "logprobs": 1}
        caps = Capabilities()
        data = self._post("/completions", {**base, "prompt": ["Hello", "Hi"], "echo": True}, probe=True)
        if "_status" not in data:
            caps.list_prompts, caps.echo = len(data.get("choices") or []) == 2, _echoed(data)
        else:  # no lists, or no echo: find out which
            plain = self._post("/completions", {**base, "prompt": ["Hello", "Hi"]}, probe=True)
            caps.list_prompts = "_status" not in plain and len(plain.get("choices") or []) == 2
            data = self._post("/completions", {**base, "prompt": "Hello", "echo": True}, probe=True)
            if "_status" not in data:
                caps.echo = _echoed(data)
            elif "_status" not in plain:
                data = plain
            else:
                data = self._post("/completions", {**base, "prompt": "Hello"}, probe=True)
                if "_status" in data:
                    return Capabilities(completions=False)
        choices = data.get("choices") or []
        caps.next_token = any(
            (c.get("logprobs") or {}).get("top_logprobs") or (c.get("logprobs") or {}).get("token_logprobs")
            for c in choices
        )
        if not caps.echo:
            pl = self._post("/completions", {**base, "prompt": "Hello", "prompt_logprobs": 0}, probe=True)
            caps.prompt_logprobs = isinstance(((pl.get("choices") or [{}])[0]).get("prompt_logprobs"), list)
        return caps

    def _requests(self, n: int, sizes: Sequence[int] | None = None) -> list[list[int]]:
        """Indices 0..n-1 cut into requests of at most `batch` prompts (one each if lists are not accepted);
        `sizes` keeps groups of consecutive prompts (a question's options) in one request."""
        per = self.config.batch if self.capabilities().list_prompts else 1
        sizes = sizes or [1] * n
        out: list[list[int]] = []
        i = 0
        for size in sizes:
            members = list(range(i, i + size))
            i += size
            if per == 1:
                out.extend([m] for m in members)
            elif out and len(out[-1]) + size <= per:
                out[-1].extend(members)
            else:
                out.append(members)
        return out

    def _completions(self, prompts: Sequence[str], payload: dict) -> list[dict]:
        """One choice per prompt, `prompts` sent as a list when there are several."""
        data = self._post("/completions", {**payload, "prompt": prompts[0] if len(prompts) == 1 else list(prompts)})
        choices = data.get("choices")
        if (
            not isinstance(choices, list)
            or len(choices) != len(prompts)
            or not all(isinstance(c, dict) for c in choices)
        ):
            raise ClinqaError(
                f"{self.base_url}/completions answered {len(choices or [])} choices for {len(prompts)} prompts"
            )
        if len(prompts) > 1:
            choices = sorted(choices, key=lambda c: c.get("index", 0))
        return choices

    def _need_completions(self, what: str) -> Capabilities:
        caps = self.capabilities()
        if not caps.completions:
            raise ClinqaError(
                f"{self.base_url} offers only /chat/completions, which gives no {what}: use --method generate "
                "with this server (the judge and the annotator switch to generation by themselves)"
            )
        return caps

    # ------------------------------------------------------------------ the Predictor protocol

    def score_continuations(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[ContinuationScore]]:
        caps = self._need_completions("prompt log-probabilities")
        if not caps.echo and not caps.prompt_logprobs:
            raise ClinqaError(
                f"{self.base_url} does not return prompt log-probabilities (echo+logprobs): "
                "use --method generate with this server, or a vLLM server"
            )
        flat = [(ctx, cont) for ctx, conts in groups for cont in conts]
        if not flat:
            return [[] for _ in groups]
        if caps.echo and not self._echo_checked:
            with self._lock:
                if not self._echo_checked:
                    first = self._completions([flat[0][0] + flat[0][1]], self._echo_payload())[0]
                    self._check_echo_alignment(flat[0][0], first.get("logprobs") or {})

        def run(idx: list[int]) -> list[ContinuationScore]:
            payload = (
                self._echo_payload()
                if caps.echo
                else {"model": self.model, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
            )
            choices = self._completions([flat[i][0] + flat[i][1] for i in idx], payload)
            return [self._score(flat[i][0], flat[i][1], c, caps.echo) for i, c in zip(idx, choices)]

        requests = self._requests(len(flat), [len(conts) for _, conts in groups])
        scores = [s for part in self._map(run, requests) for s in part]
        out, k = [], 0
        for _, conts in groups:
            out.append(scores[k : k + len(conts)])
            k += len(conts)
        return out

    def _echo_payload(self) -> dict:
        return {"model": self.model, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}

    def _score(self, context: str, cont: str, choice: dict, echo: bool) -> ContinuationScore:
        if echo:
            lp = choice.get("logprobs") or {}
            offsets, token_lps, top = lp.get("text_offset"), lp.get("token_logprobs"), lp.get("top_logprobs")
            if not offsets or token_lps is None:
                raise ClinqaError(
                    f"{self.base_url} does not return prompt log-probabilities (echo+logprobs): "
                    "use --method generate with this server, or a vLLM server"
                )
        else:  # vLLM prompt_logprobs: per prompt token {token_id: {logprob, rank, decoded_token}}, the prompt token only
            entries = choice.get("prompt_logprobs")
            if not isinstance(entries, list):
                raise ClinqaError(
                    f"{self.base_url} returned no prompt_logprobs: use --method generate with this server"
                )
            # offsets from the end of the prompt: the first token has no entry (None), so its length is unknown
            offsets, token_lps, top, pos = [], [], None, len(context) + len(cont)
            for e in reversed(entries):
                if not e:
                    offsets.append(0)
                    token_lps.append(None)
                    continue
                tok = next(iter(e.values()))
                pos -= len(tok.get("decoded_token") or "")
                offsets.append(pos)
                token_lps.append(float(tok["logprob"]))
            offsets.reverse()
            token_lps.reverse()
        start, end = len(context), len(context) + len(cont)
        total, n, greedy = 0.0, 0, True
        for k, (off, tlp) in enumerate(zip(offsets, token_lps)):
            if off < start or off >= end or tlp is None:
                continue
            total += tlp
            n += 1
            if top and k < len(top) and top[k]:
                greedy = greedy and max(top[k].values()) <= tlp + 1e-6
        return ContinuationScore(total, n, len(cont), greedy)

    def _check_echo_alignment(self, context: str, echo: dict) -> None:
        """Refuse a server whose prompt log-probabilities are shifted by one token, as llama-cpp-python's
        are for models without a BOS token (abetlen/llama-cpp-python#1983): the echoed distribution at the
        first continuation token must match the plain next-token distribution after the context."""
        self._echo_checked = True
        tops = echo.get("top_logprobs") or []
        offsets = echo.get("text_offset") or []
        k = next((i for i, off in enumerate(offsets) if off >= len(context)), len(tops))
        payload = {"model": self.model, "max_tokens": 1, "temperature": 0, "logprobs": TOP_LOGPROBS}
        plain = ((self._completions([context], payload)[0].get("logprobs") or {}).get("top_logprobs") or [None])[0]
        if k >= len(tops) or not tops[k] or not plain:
            return  # nothing to compare: trust the server
        tok, lp = echo["tokens"][k], echo["token_logprobs"][k]
        same_top = abs(max(tops[k].values()) - max(plain.values())) <= 0.1
        if not same_top or (tok in plain and lp is not None and abs(plain[tok] - lp) > 0.1):
            raise ClinqaError(
                f"{self.base_url} returns prompt log-probabilities shifted by one token (llama-cpp-python does this "
                "for models without a BOS token): use --method letter or generate, or start the server with "
                "--kv_overrides tokenizer.ggml.add_bos_token=bool:true"
            )

    def next_token_logprobs(self, contexts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Candidates absent from the server's top-20 get ABSENT_LOGPROB: an approximation, documented."""
        self._need_completions("next-token log-probabilities")
        payload = {"model": self.model, "max_tokens": 1, "temperature": 0, "logprobs": TOP_LOGPROBS}

        def run(idx: list[int]) -> list[dict]:
            tops = []
            for i, choice in zip(idx, self._completions([contexts[i] for i in idx], payload)):
                top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
                if not top and not choice.get("text"):
                    # stopped at end-of-sequence, which llama-cpp-python reports without log-probs: force one token
                    choice = self._completions([contexts[i]], {**payload, "min_tokens": 1})[0]
                    top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
                if not top:
                    raise ClinqaError(
                        f"{self.base_url} returned no top log-probabilities: use --method generate with this server"
                    )
                tops.append(top)
            return tops

        tops = [t for part in self._map(run, self._requests(len(contexts))) for t in part]
        out = np.full((len(contexts), len(candidates)), ABSENT_LOGPROB)
        for i, top in enumerate(tops):
            for j, cand in enumerate(candidates):
                for tok, lp in top.items():
                    if tok == cand or tok.strip() == cand.strip():
                        out[i, j] = max(out[i, j], lp)
        return out

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
        """Chat prompts go one per /chat/completions request, concurrently; plain prompts go to /completions
        in lists of `batch` (or, on a chat-only server, as a chat message)."""
        config = config or GenerationConfig()
        common = {
            "model": self.model,
            "max_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "seed": config.seed,
        }
        if config.stop:
            common["stop"] = list(config.stop)
        chat = config.chat or not self.capabilities().completions

        def ask_chat(prompt: str) -> str:
            messages = ([{"role": "system", "content": config.system}] if config.system else []) + [
                {"role": "user", "content": prompt}
            ]
            data = self._post("/chat/completions", {**common, "messages": messages})
            try:
                return (data["choices"][0]["message"]["content"] or "").strip()
            except (KeyError, IndexError, TypeError):
                raise ClinqaError(
                    f"{self.base_url}/chat/completions answered without choices[0].message.content"
                ) from None

        if chat:
            return self._map(ask_chat, list(prompts))

        def complete(idx: list[int]) -> list[str]:
            return [str(c.get("text") or "").strip() for c in self._completions([prompts[i] for i in idx], common)]

        return [t for part in self._map(complete, self._requests(len(prompts))) for t in part]

    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[np.ndarray]:
        raise ClinqaError(
            "hidden states are not supported by the OpenAI-compatible backend: use a local model for steering"
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _echoed(data: dict) -> bool:
    """Whether a completions answer to an echo request holds prompt-token log-probabilities."""
    choices = data.get("choices") or []
    if not choices:
        return False
    lp = choices[0].get("logprobs") or {}
    return bool(lp.get("text_offset")) and isinstance(lp.get("token_logprobs"), list) and len(lp["token_logprobs"]) > 1


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
