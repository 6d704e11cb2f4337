"""Where and in what precision local models run: a small config, its resolution, and the process-wide setting.

    --device auto|cpu|cuda|cuda:N|mps     (env CLINQA_DEVICE)
    --dtype auto|float32|bfloat16|float16 (env CLINQA_DTYPE)
    --device-map auto                     (env CLINQA_DEVICE_MAP): accelerate spreads a model over all GPUs

`auto` picks CUDA if present, then MPS, then the CPU; bf16 on a GPU that supports it (fp16 otherwise)
and fp32 on the CPU. `--device auto` with several GPUs also picks device_map="auto". Model loading
(`clinqa.models.load_base_model`) reads `current_runtime()`; the CLI sets it once per command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from clinqa.errors import ClinqaError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


@dataclass(frozen=True)
class RuntimeConfig:
    """What the user asked for (strings, as typed); `resolve_runtime` turns it into a Runtime."""

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None  # None | "auto"

    @classmethod
    def from_env(cls) -> RuntimeConfig:
        return cls(
            device=os.environ.get("CLINQA_DEVICE") or "auto",
            dtype=os.environ.get("CLINQA_DTYPE") or "auto",
            device_map=os.environ.get("CLINQA_DEVICE_MAP") or None,
        )


@dataclass(frozen=True)
class Runtime:
    """A resolved runtime: the torch device the inputs go to, the weights' dtype, and accelerate's device map."""

    device: torch.device
    dtype: torch.dtype
    device_map: str | None = None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def identity(self) -> dict[str, str]:
        """What changes results: the device type (not its index) and the dtype."""
        return {"device": self.device.type, "dtype": self.dtype_name}


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return False


def resolve_runtime(config: RuntimeConfig | None = None) -> Runtime:
    """Check a RuntimeConfig against this machine; a device it lacks is a ClinqaError (one line, exit 2)."""
    config = config or RuntimeConfig.from_env()
    name = (config.device or "auto").strip().lower()
    device_map = (config.device_map or "").strip().lower() or None
    if device_map not in (None, "auto"):
        raise ClinqaError(
            f"--device-map {config.device_map!r}: use 'auto' (accelerate spreads the model over the GPUs)"
        )
    n_cuda = _cuda_count()
    if name == "auto":
        if n_cuda:
            device = torch.device("cuda", 0)
            if n_cuda > 1:
                device_map = "auto"
        elif _mps_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise ClinqaError(f"--device {config.device!r}: use one of auto, cpu, cuda, cuda:N, mps") from None
        if device.type not in ("cpu", "cuda", "mps"):
            raise ClinqaError(f"--device {config.device!r}: use one of auto, cpu, cuda, cuda:N, mps")
        if device.type == "cuda":
            if not n_cuda:
                raise ClinqaError(
                    f"--device {config.device}: CUDA is not available on this machine "
                    f"(torch {torch.__version__}); use --device cpu or auto"
                )
            index = 0 if device.index is None else device.index
            if index >= n_cuda:
                raise ClinqaError(
                    f"--device {config.device}: this machine has {n_cuda} CUDA device(s), cuda:0..cuda:{n_cuda - 1}"
                )
            device = torch.device("cuda", index)
        if device.type == "mps" and not _mps_available():
            raise ClinqaError(
                f"--device {config.device}: MPS (Apple GPU) is not available on this machine; use --device cpu or auto"
            )
    dname = _ALIASES.get((config.dtype or "auto").strip().lower(), (config.dtype or "auto").strip().lower())
    if dname == "auto":
        if device.type == "cpu":
            dtype = torch.float32
        elif device.type == "cuda":
            dtype = torch.bfloat16 if _bf16_ok(device) else torch.float16
        else:  # mps: fp16 works on every macOS release that has MPS
            dtype = torch.float16
    elif dname in DTYPES:
        dtype = DTYPES[dname]
    else:
        raise ClinqaError(f"--dtype {config.dtype!r}: use one of auto, {', '.join(DTYPES)}")
    return Runtime(device=device, dtype=dtype, device_map=device_map)


_current: RuntimeConfig | None = None


def set_runtime(device: str | None = None, dtype: str | None = None, device_map: str | None = None) -> Runtime:
    """Set the process-wide runtime (None: the CLINQA_* environment variable, else auto) and return it resolved.

    Raises ClinqaError at once for a device this machine lacks, before any data or model is loaded."""
    global _current
    env = RuntimeConfig.from_env()
    cfg = RuntimeConfig(device=device or env.device, dtype=dtype or env.dtype, device_map=device_map or env.device_map)
    resolved = resolve_runtime(cfg)
    _current = cfg
    return resolved


def update_runtime(**fields: str | None) -> RuntimeConfig:
    """Change some fields of the process-wide runtime (None: the environment's), keeping the others.

    The CLI's option callbacks call this one option at a time, so nothing is checked here: the
    combination is checked when it is first used (`current_runtime()`, before a model loads)."""
    global _current
    cur = _current or RuntimeConfig.from_env()
    env = RuntimeConfig.from_env()
    merged = {"device": cur.device, "dtype": cur.dtype, "device_map": cur.device_map}
    for key, value in fields.items():
        if key not in merged:
            raise TypeError(f"unknown runtime field {key!r}")
        merged[key] = value if value is not None else getattr(env, key)
    _current = RuntimeConfig(**merged)
    return _current


def reset_runtime() -> None:
    """Back to the environment's (or auto) settings."""
    global _current
    _current = None


def requested_runtime() -> RuntimeConfig:
    """What the user asked for (the CLI's --device/--dtype, else CLINQA_*, else auto), unresolved: for
    code that places models itself (LoRA training) and must follow the same choice."""
    return _current or RuntimeConfig.from_env()


def current_runtime() -> Runtime:
    """The runtime model loading uses now: the one set by `set_runtime`, else the environment's, else auto."""
    return resolve_runtime(_current)


def model_device(model) -> torch.device:
    """The device a model's inputs go to (its input embeddings' device; under a device map the first GPU)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None elsewhere: the CPU keeps the fixed, cache-sized budget)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of any accelerator (CUDA raises torch.OutOfMemoryError; MPS a RuntimeError)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "MPS backend out of memory" in str(exc)


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and _mps_available():
        torch.mps.empty_cache()
