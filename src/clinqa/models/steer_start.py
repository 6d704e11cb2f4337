"""The hook point steering reads: which positions of a decoder forward are on the answer side.

`LocalModel` sets `STEER_START` around every decoder forward (`steer_start(...)`); the steering hooks
(`clinqa.adapt.control`) read it so they never touch the question prefix or padding.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Iterator

import torch

# Set around every decoder forward: a LongTensor [batch] with, per row, the first sequence index
# that belongs to the answer side (the last prompt token onward). Steering hooks read it so they
# never touch the question prefix or padding; a cached decode step (seq len 1) is always answer side.
STEER_START: contextvars.ContextVar = contextvars.ContextVar("clinqa_steer_start", default=None)


@contextmanager
def steer_start(start: torch.Tensor) -> Iterator[None]:
    token = STEER_START.set(start)
    try:
        yield
    finally:
        STEER_START.reset(token)
