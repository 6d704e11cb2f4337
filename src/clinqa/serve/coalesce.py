"""Dynamic batching: concurrent requests' calls to one local model become one larger model call.

    coalescer = Coalescer(predictor, window_s=0.005, max_batch=16)
    texts = coalescer.generate(["prompt"], config, cancel=event)   # from any number of threads at once

Request threads call ``generate(prompts, config)``, ``next_token_logprobs(contexts, candidates)`` or
``score_continuations(groups)``. The calls that arrive within ``window_s`` of the oldest waiting one (or
until ``max_batch`` inputs wait) and ask the same thing -- the same GenerationConfig, the same
candidates -- run as ONE call of the inner predictor on a batching thread; each caller gets its own
slice of the result, in order, as if it had called alone (the backend already batches the inputs of
one call, sorted by length, so a GPU's idle width gets used). Calls that have waited longer than the
window while the model was busy go together at once.

- One batch (or one unbatched call, ``direct``) is on the model at a time: ``lock``.
- An exception of the batch's model call is raised in every caller of that batch.
- A caller whose cancel flag (a ``threading.Event``) is set before its batch starts is dropped from it
  (``RequestCancelled``); the batch runs under a flag that is set only once EVERY member is cancelled,
  so one abandoned request never aborts the others' answers (``cancel_scope`` installs that flag
  where the model's abort hook reads it).
- Sampled generation (temperature > 0) is not batched: its draws are seeded per call, so a batch would
  change them; it runs alone (``direct``). Other methods (hidden states, ...) also run ``direct``.
- Truncation notes (clinqa.models.truncation) made during a batch reach the caller whose input was cut,
  with that caller's own input index.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from clinqa.models.truncation import note_truncated, watch_truncation

__all__ = ["Coalescer", "RequestCancelled"]


class RequestCancelled(Exception):
    """Raised inside the model worker when the request was abandoned (time budget, client gone)."""


@dataclass(eq=False)
class _Call:
    method: str  # generate | next_token_logprobs | score_continuations
    key: Hashable  # what must be equal to share a batch: method plus config / candidates
    arg: Any  # the config or the candidates, passed to the inner call
    items: list
    cancel: Optional[threading.Event]
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: Optional[BaseException] = None
    notes: list = field(default_factory=list)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


class _AllCancelled:
    """A cancel flag (``is_set``) for a batch: set once every member's own flag is set."""

    def __init__(self, flags: Sequence[Optional[threading.Event]]):
        self.flags = list(flags)

    def is_set(self) -> bool:
        return all(f is not None and f.is_set() for f in self.flags)


class Coalescer:
    """Batches concurrent calls to ``inner`` (see the module docstring). Thread-safe; ``close`` to stop."""

    def __init__(
        self,
        inner: Any,
        *,
        window_s: float = 0.005,
        max_batch: int = 16,
        lock: Optional[threading.Lock] = None,
        cancel_scope: Optional[Callable[[Any], AbstractContextManager]] = None,
    ):
        self.inner = inner
        self.window_s = max(0.0, float(window_s))
        self.max_batch = max(1, int(max_batch))
        self.lock = lock if lock is not None else threading.Lock()
        self._cancel_scope = cancel_scope or (lambda _flag: nullcontext())
        self._cond = threading.Condition()
        self._queue: list[_Call] = []
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        # what ran: model calls made for batches, and the number of caller calls and inputs in them
        self.stats = {"batches": 0, "calls": 0, "inputs": 0, "largest": 0}

    # -- the batched methods ------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], config: Any = None, *, cancel: Optional[threading.Event] = None):
        if config is not None and getattr(config, "temperature", 0) > 0:
            return self.direct(lambda: self.inner.generate(list(prompts), config), cancel=cancel)
        return self._submit("generate", config, list(prompts), cancel)

    def next_token_logprobs(
        self, contexts: Sequence[str], candidates: Sequence[str], *, cancel: Optional[threading.Event] = None
    ):
        return self._submit("next_token_logprobs", tuple(candidates), list(contexts), cancel)

    def score_continuations(self, groups: Sequence[tuple[str, Sequence[str]]], *, cancel=None):
        return self._submit("score_continuations", None, list(groups), cancel)

    def direct(self, fn: Callable[[], Any], *, cancel: Optional[threading.Event] = None) -> Any:
        """``fn()`` on the calling thread, alone on the model (between batches)."""
        if cancel is not None and cancel.is_set():
            raise RequestCancelled("the request was abandoned")
        with self.lock:
            return fn()

    # -- queueing -------------------------------------------------------------------------------
    def _submit(self, method: str, arg: Any, items: list, cancel: Optional[threading.Event]) -> Any:
        try:
            key = (method, arg)
            hash(key)
        except TypeError:  # an unhashable config (e.g. stop as a list): cannot tell its equals, run alone
            return self.direct(lambda: getattr(self.inner, method)(*self._args(method, arg, items)), cancel=cancel)
        if not items:
            return self.direct(lambda: getattr(self.inner, method)(*self._args(method, arg, items)), cancel=cancel)
        if cancel is not None and cancel.is_set():
            raise RequestCancelled("the request was abandoned")
        call = _Call(method, key, arg, items, cancel)
        with self._cond:
            if self._closed:
                raise RequestCancelled("the service is shutting down")
            self._queue.append(call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="clinqa-batch", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        call.done.wait()
        for index, text in call.notes:
            note_truncated(index, text)
        if call.error is not None:
            raise call.error
        return call.result

    def waiting(self) -> int:
        """Inputs queued for a batch now (not counting a batch that runs)."""
        with self._cond:
            return sum(len(c.items) for c in self._queue)

    def drop_cancelled(self) -> None:
        """Answer queued calls whose cancel flag is set with RequestCancelled now (the runner calls this
        after setting a flag, so an abandoned request's thread is freed without waiting for a batch)."""
        with self._cond:
            self._drop_cancelled_locked()
            self._cond.notify_all()

    def _drop_cancelled_locked(self) -> None:
        keep = []
        for call in self._queue:
            if call.cancelled:
                call.error = RequestCancelled("the request was abandoned while it waited for a batch")
                call.done.set()
            else:
                keep.append(call)
        self._queue[:] = keep

    def close(self) -> None:
        """Answer every queued call with RequestCancelled and stop the batching thread (after its batch)."""
        with self._cond:
            self._closed = True
            for call in self._queue:
                call.error = RequestCancelled("the service is shutting down")
                call.done.set()
            self._queue.clear()
            self._cond.notify_all()

    def _take_locked(self) -> Optional[list[_Call]]:
        """Wait (lock held through the condition) until a batch is due, then remove and return it."""
        while True:
            self._drop_cancelled_locked()
            if self._closed:
                return None
            if not self._queue:
                self._cond.wait()
                continue
            waiting: dict[Hashable, int] = {}
            for call in self._queue:
                waiting[call.key] = waiting.get(call.key, 0) + len(call.items)
            full = [c for c in self._queue if waiting[c.key] >= self.max_batch]
            first = full[0] if full else self._queue[0]  # a full batch goes at once, else the oldest call's
            left = first.arrived + self.window_s - time.monotonic()
            if full or left <= 0:
                break
            self._cond.wait(left)
        batch, size, rest, full = [], 0, [], False
        for call in self._queue:
            if call.key == first.key and not full:
                full = bool(batch) and size + len(call.items) > self.max_batch
                if not full:  # later calls of this key wait for the next batch: first come, first served
                    batch.append(call)
                    size += len(call.items)
                    continue
            rest.append(call)
        self._queue[:] = rest
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                batch = self._take_locked()
            if batch is None:
                return
            self._run(batch)

    # -- running a batch --------------------------------------------------------------------------
    @staticmethod
    def _args(method: str, arg: Any, items: list) -> tuple:
        return (items,) if method == "score_continuations" else (items, arg)

    def _run(self, batch: list[_Call]) -> None:
        first = batch[0]
        items = [x for call in batch for x in call.items]
        notes: list = []
        error: Optional[BaseException] = None
        out: Any = None
        try:
            with self.lock, self._cancel_scope(_AllCancelled([c.cancel for c in batch])):
                with watch_truncation() as notes:
                    out = getattr(self.inner, first.method)(*self._args(first.method, first.arg, items))
            if len(out) != len(items):
                raise RuntimeError(f"{first.method} returned {len(out)} results for {len(items)} inputs")
        except BaseException as e:  # handed to every caller; the batching thread goes on
            error = e
        self.stats["batches"] += 1
        self.stats["calls"] += len(batch)
        self.stats["inputs"] += len(items)
        self.stats["largest"] = max(self.stats["largest"], len(items))
        start = 0
        for call in batch:
            end = start + len(call.items)
            if error is not None:
                call.error = error
            elif isinstance(out, np.ndarray):
                call.result = out[start:end].copy()
            else:
                call.result = list(out[start:end])
            call.notes = [(i - start, text) for i, text in notes if start <= i < end]
            start = end
            call.done.set()
