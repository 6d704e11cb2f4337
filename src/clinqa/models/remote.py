"""OpenAI-compatible backend (vLLM, llama.cpp server, any /v1/completions server).

Log-likelihoods come from the completions API with `echo` and `logprobs` where the server gives them
(vLLM does; a one-time check refuses servers that shift them by a token, as llama-cpp-python does for
models without a BOS token); next-token scoring reads the top log-probabilities of one generated
token. Hidden states never leave a server, so steering needs a local backend.
"""

from __future__ import annotations

from typing import Sequence

import httpx
import numpy as np

from clinqa.errors import ClinqaError
from clinqa.models.base import ContinuationScore, GenerationConfig, ModelInfo

TOP_LOGPROBS = 20
# next_token_logprobs' value for a candidate outside the server's top-20: "practically zero", but finite,
# because run files are JSON (no infinities) and a -inf score made samples.jsonl unreadable.
ABSENT_LOGPROB = -1e4


class OpenAIModel:
    def __init__(self, base_url: str, model: str = "", *, spec: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, client: httpx.Client | None = None):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        served = self._served_models(required=not model)
        self.model = model or served[0]
        self._echo_checked = False
        self.info = ModelInfo(spec=spec or f"openai:{self.base_url}#{self.model}", backend="openai", name=self.model)

    def _post(self, path: str, payload: dict) -> dict:
        try:
            r = self.client.post(f"{self.base_url}{path}", json=payload)
        except httpx.HTTPError as exc:
            raise ClinqaError(f"cannot reach {self.base_url}{path} ({exc.__class__.__name__}): is the server running?") from exc
        if r.status_code >= 400:
            raise ClinqaError(f"{self.base_url}{path} answered HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def _served_models(self, required: bool) -> list[str]:
        """Check the server answers (fail fast, before any run folder is written) and list its models."""
        try:
            r = self.client.get(f"{self.base_url}/models")
        except httpx.HTTPError as exc:
            raise ClinqaError(f"cannot reach {self.base_url} ({exc.__class__.__name__}): is the server running?") from exc
        try:
            r.raise_for_status()
            models = [m["id"] for m in r.json()["data"]]
            if models or not required:
                return models
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            if not required:
                return []
        raise ClinqaError(f"cannot list models at {self.base_url}/models: name the model explicitly with openai:URL#MODEL")

    def score_continuations(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[ContinuationScore]]:
        out = []
        for context, conts in groups:
            scores = []
            for cont in conts:
                payload = {"model": self.model, "prompt": context + cont, "max_tokens": 1, "temperature": 0,
                           "echo": True, "logprobs": 1}
                choice = self._post("/completions", payload)["choices"][0]
                lp = choice.get("logprobs") or {}
                offsets, token_lps, tokens = lp.get("text_offset"), lp.get("token_logprobs"), lp.get("tokens")
                top = lp.get("top_logprobs")
                if not offsets or token_lps is None:
                    raise ClinqaError(
                        f"{self.base_url} does not return prompt log-probabilities (echo+logprobs): "
                        "use --method generate with this server, or a vLLM server"
                    )
                start, end = len(context), len(context) + len(cont)
                if not self._echo_checked:
                    self._check_echo_alignment(context, lp)
                total, n, greedy = 0.0, 0, True
                for k, (off, tlp) in enumerate(zip(offsets, token_lps)):
                    if off < start or off >= end or tlp is None:
                        continue
                    total += tlp
                    n += 1
                    if top and top[k]:
                        greedy = greedy and max(top[k].values()) <= tlp + 1e-6
                scores.append(ContinuationScore(total, n, len(cont), greedy))
            out.append(scores)
        return out

    def _check_echo_alignment(self, context: str, echo: dict) -> None:
        """Refuse a server whose prompt log-probabilities are shifted by one token, as llama-cpp-python's
        are for models without a BOS token (abetlen/llama-cpp-python#1983): the echoed distribution at the
        first continuation token must match the plain next-token distribution after the context."""
        self._echo_checked = True
        tops = echo.get("top_logprobs") or []
        k = next((i for i, off in enumerate(echo["text_offset"]) if off >= len(context)), len(tops))
        payload = {"model": self.model, "prompt": context, "max_tokens": 1, "temperature": 0, "logprobs": TOP_LOGPROBS}
        plain = ((self._post("/completions", payload)["choices"][0].get("logprobs") or {}).get("top_logprobs") or [None])[0]
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
        out = np.full((len(contexts), len(candidates)), ABSENT_LOGPROB)
        for i, ctx in enumerate(contexts):
            payload = {"model": self.model, "prompt": ctx, "max_tokens": 1, "temperature": 0, "logprobs": TOP_LOGPROBS}
            choice = self._post("/completions", payload)["choices"][0]
            top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
            if not top and not choice.get("text"):
                # stopped at end-of-sequence, which llama-cpp-python reports without log-probs: force one token
                choice = self._post("/completions", {**payload, "min_tokens": 1})["choices"][0]
                top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
            if not top:
                raise ClinqaError(f"{self.base_url} returned no top log-probabilities: use --method generate with this server")
            for j, cand in enumerate(candidates):
                for tok, lp in top.items():
                    if tok == cand or tok.strip() == cand.strip():
                        out[i, j] = max(out[i, j], lp)
        return out

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
        config = config or GenerationConfig()
        outs = []
        for prompt in prompts:
            common = {"model": self.model, "max_tokens": config.max_new_tokens, "temperature": config.temperature,
                      "top_p": config.top_p, "seed": config.seed}
            if config.stop:
                common["stop"] = list(config.stop)
            if config.chat:
                messages = ([{"role": "system", "content": config.system}] if config.system else []) + [{"role": "user", "content": prompt}]
                data = self._post("/chat/completions", {**common, "messages": messages})
                outs.append((data["choices"][0]["message"]["content"] or "").strip())
            else:
                data = self._post("/completions", {**common, "prompt": prompt})
                outs.append(data["choices"][0]["text"].strip())
        return outs

    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[np.ndarray]:
        raise ClinqaError("hidden states are not supported by the OpenAI-compatible backend: use a local model for steering")
