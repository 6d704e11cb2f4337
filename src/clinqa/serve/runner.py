"""The service's model calls: where they run, how many at once, and how they are stopped.

- A local model is not thread-safe: its calls run one at a time (a lock) in arrival order -- on the
  CPU, and wherever ``batching`` is off. With batching (ServeConfig.local_batching: ``auto`` = when the
  model is on a GPU, ``on``, ``off``) up to ``concurrency`` requests run at once and their model calls
  meet in a Coalescer (clinqa.serve.coalesce): calls arriving within ``batch_window_s`` become one
  batched call of the model, still one batch on the model at a time. A fine-tuned stage-1 selector
  (``adapters``) calls its own adapter view outside the coalescer; LoRA views serialise their calls on
  the shared model's lock (clinqa.models.local), so that stays one call on the model at a time too.
- A remote backend (``openai:``, e.g. a vLLM cluster) runs up to ``concurrency`` calls at once
  (ServeConfig.model_concurrency, default 8), each of which may itself send several requests.
- At most ``max_pending`` calls wait or run; more are refused (503 ``busy``).
- A call is abandoned when the request's time budget runs out (504 ``timeout``) or the client closes
  the connection (``cancelled``). An abandoned call that is still queued never runs; a running one
  gets its cancel flag set, which makes the next model call it makes raise, aborts a local model's
  generation at the next forward pass (a pre-hook), and stops a remote backend from starting
  further requests or retries (clinqa.models.remote.CANCEL) -- a request already on the wire is
  left to finish and its answer discarded.

``load_models`` loads what a config names: the model, and with ``adapters`` (a ``records finetune``
folder) the fine-tuned stages -- stage 2 answers, stage 1 is the LLM selector with its tuned threshold.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal, Optional

from clinqa.models.base import (
    Annotates,
    Encodes,
    FormatsChat,
    HasContextLimit,
    Predictor,
    ReportsLogprobs,
    SharesPrefix,
    forward_capabilities,
    tokenizer_of,
)
from clinqa.serve.coalesce import Coalescer, RequestCancelled

__all__ = ["ModelRunner", "RequestCancelled", "RunnerRefused", "is_remote", "load_models", "on_gpu"]

_worker_state = threading.local()
log = logging.getLogger("clinqa.serve")


class RunnerRefused(Exception):
    """The runner's answer instead of a result: the service turns it into an error response."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        outcome: Optional[str] = None,
        detail: str = "",
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.outcome, self.detail, self.headers = outcome, detail, headers


def _abort_if_cancelled(*_: Any) -> None:
    """Forward pre-hook on torch models: raise in the model thread once the current request is abandoned."""
    cancel = getattr(_worker_state, "cancel", None)
    if cancel is not None and cancel.is_set():
        raise RequestCancelled("the request was abandoned")


def _torch_modules(obj: Any, depth: int = 0, seen: Optional[set[int]] = None) -> list[Any]:
    """torch modules held by a predictor or by predictors it wraps (modifiers), up to 3 levels deep."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 3:
        return []
    seen.add(id(obj))
    found = []
    for value in list(getattr(obj, "__dict__", {}).values()):
        if isinstance(value, torch.nn.Module):
            if id(value) not in seen:
                seen.add(id(value))
                found.append(value)
        elif isinstance(value, Predictor):  # a wrapped predictor (a modifier holds one)
            found.extend(_torch_modules(value, depth + 1, seen))
    return found


def is_remote(predictor: Any) -> bool:
    """A predictor whose model runs elsewhere (an OpenAI-compatible server): safe to call from several threads."""
    info = getattr(predictor, "info", None)
    return getattr(info, "backend", None) == "openai"


def on_gpu(predictor: Any) -> bool:
    """Whether a local predictor's model is on an accelerator: ``info.extra["device"]`` where the backend
    records it (clinqa.models.local), else the device of the first torch module it holds."""
    device = (getattr(getattr(predictor, "info", None), "extra", None) or {}).get("device")
    if isinstance(device, str) and device:
        return device.split(":")[0] != "cpu"
    for module in _torch_modules(predictor):
        param = next(module.parameters(), None)
        if param is not None:
            return param.device.type != "cpu"
    return False


@contextmanager
def _cancel_scope(flag: Any) -> Iterator[None]:
    """Install ``flag`` (anything with ``is_set``) as the cancel flag the abort hook reads on this thread."""
    before = getattr(_worker_state, "cancel", None)
    _worker_state.cancel = flag
    try:
        yield
    finally:
        _worker_state.cancel = before


class _CancellablePredictor:
    """The predictor as the pipeline sees it: every model call first checks the request's cancel flag, and
    with batching goes through the Coalescer. No ``__getattr__``: besides the four Predictor calls it has
    exactly the wrapped predictor's declared capabilities (clinqa.models.base) that stay true through it
    -- a tokenizer (also one a modifier's ``base``/``predictor`` holds), the context limit, chat
    formatting, annotations, ``encode`` and whether it scores -- and shared-prefix scoring, which it
    wraps so that it too is cancellable and serialised with the batches."""

    FORWARDED = (HasContextLimit, FormatsChat, Annotates, Encodes, ReportsLogprobs)

    def __init__(self, inner: Any, cancel: threading.Event, coalescer: Optional[Coalescer] = None):
        self._inner = inner
        self._cancel = cancel
        self._coalescer = coalescer
        self.info = inner.info
        forward_capabilities(self, inner, self.FORWARDED)
        tokenizer = tokenizer_of(inner)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if isinstance(inner, SharesPrefix):
            shared = inner.next_token_logprobs_shared
            self.next_token_logprobs_shared = lambda prefix, suffixes, candidates: self._direct(
                lambda: shared(prefix, suffixes, candidates)
            )

    def _check(self) -> None:
        if self._cancel.is_set():
            raise RequestCancelled("the request was abandoned")

    def _direct(self, fn: Callable[[], Any]) -> Any:
        self._check()
        return fn() if self._coalescer is None else self._coalescer.direct(fn, cancel=self._cancel)

    def score_continuations(self, groups):
        self._check()
        if self._coalescer is not None:
            return self._coalescer.score_continuations(groups, cancel=self._cancel)
        return self._inner.score_continuations(groups)

    def next_token_logprobs(self, contexts, candidates):
        self._check()
        if self._coalescer is not None:
            return self._coalescer.next_token_logprobs(contexts, candidates, cancel=self._cancel)
        return self._inner.next_token_logprobs(contexts, candidates)

    def generate(self, prompts, config=None):
        self._check()
        if self._coalescer is not None:
            return self._coalescer.generate(prompts, config, cancel=self._cancel)
        return self._inner.generate(prompts, config)

    def hidden_states(self, texts, layers):
        return self._direct(lambda: self._inner.hidden_states(texts, layers))


class ModelRunner:
    """Runs model calls on worker threads with a time budget (see the module docstring)."""

    def __init__(
        self,
        max_pending: int = 32,
        concurrency: int = 8,
        *,
        batching: Literal["auto", "on", "off"] = "auto",
        batch_window_s: float = 0.005,
        max_batch: int = 16,
    ):
        if batching not in ("auto", "on", "off"):
            raise ValueError(f"batching must be auto, on or off, not {batching!r}")
        self.max_pending = max_pending
        self.concurrency = max(1, int(concurrency))
        self.batching = batching
        self.batch_window_s = float(batch_window_s)
        self.max_batch = int(max_batch)
        self.predictor: Any = None
        self.parallel = 1  # calls at once: set by set_predictor (1 for a local model without batching)
        self.coalescer: Optional[Coalescer] = None  # set by set_predictor when a local model batches
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="clinqa-model")
        self._lock = threading.Lock()  # a local model is not thread-safe
        self._count_lock = threading.Lock()
        self._pending = 0
        self._hooks: list[Any] = []

    @classmethod
    def from_config(cls, config: Any) -> ModelRunner:
        """The runner a ServeConfig asks for (max_pending, model_concurrency, local_batching, ...)."""
        return cls(
            config.max_pending,
            concurrency=config.model_concurrency,
            batching=config.local_batching,
            batch_window_s=config.batch_window_ms / 1000.0,
            max_batch=config.max_batch,
        )

    def set_predictor(self, predictor: Any) -> None:
        if self.coalescer is not None:
            self.coalescer.close()
        self.predictor = predictor
        remote = is_remote(predictor)
        batch = not remote and (self.batching == "on" or (self.batching == "auto" and on_gpu(predictor)))
        self.coalescer = (
            Coalescer(
                predictor,
                window_s=self.batch_window_s,
                max_batch=self.max_batch,
                lock=self._lock,
                cancel_scope=_cancel_scope,
            )
            if batch
            else None
        )
        self.parallel = self.concurrency if remote or batch else 1
        for module in _torch_modules(predictor):
            self._hooks.append(module.register_forward_pre_hook(_abort_if_cancelled))

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on a model thread (used to load the model there)."""
        return self._executor.submit(fn)

    def _done(self, _: Future) -> None:
        with self._count_lock:
            self._pending -= 1

    async def run(
        self, fn: Callable[[Any], Any], budget: float, receive: Optional[Callable[[], Awaitable[dict]]] = None
    ) -> Any:
        """``fn(predictor)`` on a model thread. RunnerRefused: 503 if not ready or too many wait, 504 past
        ``budget`` seconds, 499 ``cancelled`` when ``receive`` (the ASGI channel) reports a disconnect."""
        if self.predictor is None:
            raise RunnerRefused(503, "not_ready", "the model is still loading; try again shortly (see /ready)")
        with self._count_lock:
            if self._pending >= self.max_pending:
                raise RunnerRefused(
                    503,
                    "busy",
                    f"{self._pending} model calls are already waiting; try again shortly",
                    headers={"Retry-After": "5"},
                    outcome="busy",
                )
            self._pending += 1
        cancel = threading.Event()
        coalescer = self.coalescer
        predictor = _CancellablePredictor(self.predictor, cancel, coalescer)
        serial = self.parallel == 1 and coalescer is None  # with a coalescer, it holds the lock per batch

        def job() -> Any:
            from clinqa.models.remote import CANCEL

            if cancel.is_set():
                raise RequestCancelled("the request was abandoned while queued")
            token = CANCEL.set(cancel)
            if serial:
                self._lock.acquire()
            try:
                _worker_state.cancel = cancel
                return fn(predictor)
            finally:
                _worker_state.cancel = None
                CANCEL.reset(token)
                if serial:
                    self._lock.release()

        fut = self._executor.submit(job)
        fut.add_done_callback(self._done)
        result = asyncio.wrap_future(fut)
        watcher = asyncio.ensure_future(_disconnected(receive)) if receive is not None else None
        try:
            if budget <= 0:
                raise TimeoutError
            done, _ = await asyncio.wait(
                [result] + ([watcher] if watcher else []), timeout=budget, return_when=asyncio.FIRST_COMPLETED
            )
            if result in done:
                return result.result()
            if watcher is not None and watcher in done:
                raise RunnerRefused(
                    499,
                    "cancelled",
                    "the client closed the connection; the model call was cancelled",
                    outcome="cancelled",
                    detail="client disconnected",
                )
            raise TimeoutError
        except (asyncio.TimeoutError, TimeoutError):
            raise RunnerRefused(
                504,
                "timeout",
                f"the model did not answer within the {budget:.3g} s left of the request's time budget; "
                "the call was abandoned. Ask again, or a shorter question",
            ) from None
        finally:
            if watcher is not None:
                watcher.cancel()
            if not fut.done():  # timed out, or the client went away: stop the call, discard its result
                cancel.set()
                fut.cancel()
                if coalescer is not None:
                    coalescer.drop_cancelled()  # free the worker if its call still waits for a batch
                result.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" warning

    def close(self) -> None:
        if self.coalescer is not None:
            self.coalescer.close()
            st = self.coalescer.stats
            log.info(
                "batching: %d calls ran as %d model calls (%d inputs, at most %d in one)",
                st["calls"],
                st["batches"],
                st["inputs"],
                st["largest"],
            )
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return once the ASGI server reports that the client went away (the body was read already)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


def load_models(config: Any) -> tuple[Any, Any]:
    """(predictor, selector or None) for a ServeConfig: the model spec, and with ``config.adapters`` the
    stages of ``records finetune`` on it (the same stages.json reading as ``records eval --adapters``)."""
    from clinqa.adapt import load_predictor

    adapters = getattr(config, "adapters", None)
    if adapters is None:
        return load_predictor(config.model), None
    from clinqa.records.selector_factory import make_selector
    from clinqa.records.train import read_stages

    stages = read_stages(adapters)
    predictor = load_predictor(f"{config.model}+lora:{stages['stage2']}")
    return predictor, make_selector("finetuned", base=config.model, adapters=adapters)
