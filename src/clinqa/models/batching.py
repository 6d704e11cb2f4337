"""Batch sizes for a device, and the out-of-memory back-off.

On the CPU a batch holds a fixed, cache-sized number of padded tokens. On a GPU the budget scales
with the free device memory, estimated from the model's shape: the activations of one decoder
layer (inference frees the others), the attention scores, and the full-vocabulary logits at the
positions that are scored. If a batch still runs out of memory, `run_batches` halves it and retries
both halves (each sample is computed exactly once: a batch's results are kept only when it finishes),
and caps later batches at the size that failed.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

import torch

from clinqa.errors import ClinqaError
from clinqa.models.runtime import empty_cache, free_memory, is_oom

# Share of the free device memory a batch may use (the rest: allocator fragmentation, the KV copies
# of the shared-prefix path, generation's cache growth).
MEMORY_SHARE = 0.5
GPU_MIN_TOKENS, GPU_MAX_TOKENS = 1024, 1 << 18
GPU_MAX_SIZE = 512


def bytes_per_token(config, dtype: torch.dtype, width: int, logit_share: float = 1.0, cache: bool = False) -> int:
    """Peak bytes one padded token of a `width`-token batch costs in a forward pass.

    hidden: residual, norm, q/k/v/o (6 x hidden) and the MLP's gate/up/act (3 x intermediate) in `dtype`;
    attention: one float32 score per head and key (the eager/masked worst case);
    logits: `logit_share` of the positions get full-vocabulary float32 logits and log-softmax (x2);
    cache: keys and values of every layer (generation, the shared-prefix path)."""
    h = int(getattr(config, "hidden_size", 1024) or 1024)
    inter = int(getattr(config, "intermediate_size", 4 * h) or 4 * h)
    heads = int(getattr(config, "num_attention_heads", 16) or 16)
    kv_heads = int(getattr(config, "num_key_value_heads", heads) or heads)
    layers = int(getattr(config, "num_hidden_layers", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    vocab = int(getattr(config, "vocab_size", 32000) or 32000)
    size = torch.finfo(dtype).bits // 8
    kv = 2 * layers * kv_heads * head_dim * size if cache else 0
    return int((6 * h + 3 * inter) * size + heads * width * 4 + logit_share * vocab * 4 * 2 + kv)


def gpu_budget(
    free_bytes: int, config, dtype: torch.dtype, width: int, logit_share: float = 1.0, cache: bool = False
) -> tuple[int, int]:
    """(max padded tokens, max rows) of a batch given the free device memory."""
    per = bytes_per_token(config, dtype, max(1, width), logit_share, cache)
    tokens = int(MEMORY_SHARE * free_bytes // per)
    tokens = max(GPU_MIN_TOKENS, min(GPU_MAX_TOKENS, tokens))
    return tokens, GPU_MAX_SIZE


def device_budget(
    device: torch.device,
    config,
    dtype: torch.dtype,
    width: int,
    cpu_budget: tuple[int, int],
    logit_share: float = 1.0,
    cache: bool = False,
) -> tuple[int, int]:
    """The CPU's fixed budget, or on CUDA one scaled to the free memory right now."""
    free = free_memory(device)
    if free is None:
        return cpu_budget
    return gpu_budget(free, config, dtype, width, logit_share, cache)


def run_batches(
    batches: Sequence[Sequence[int]],
    lengths: Sequence[int],
    step: Callable[[list[int]], None],
    device: torch.device | None = None,
) -> int:
    """Call `step(batch)` for every batch; on an out-of-memory error split that batch in half and
    retry both halves (and split later batches above the size that failed). `step` must store its
    results only once it has computed them all. Returns the number of out-of-memory retries."""
    queue = deque(list(b) for b in batches)
    cap: int | None = None  # padded tokens of the smallest batch that ran out of memory, minus one
    retries = 0
    while queue:
        batch = queue.popleft()
        width = max(lengths[i] for i in batch)
        if cap is not None and len(batch) > 1 and len(batch) * width > cap:
            half = (len(batch) + 1) // 2
            queue.extendleft([batch[half:], batch[:half]])
            continue
        try:
            step(batch)
        except Exception as exc:
            if not is_oom(exc):
                raise
            del exc  # drop the traceback's references to the failed batch's tensors before freeing
            if device is not None:
                empty_cache(device)
            if len(batch) == 1:
                raise ClinqaError(
                    f"out of device memory on a single sequence of {width} tokens: use a smaller "
                    "--dtype (bfloat16), --device-map auto to spread the model over GPUs, or a smaller model"
                ) from None
            retries += 1
            tokens = len(batch) * width
            cap = tokens - 1 if cap is None else min(cap, tokens - 1)
            half = (len(batch) + 1) // 2
            queue.extendleft([batch[half:], batch[:half]])
    return retries
