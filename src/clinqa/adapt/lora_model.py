"""The model a LoRA training trains: where it runs and in what precision, a fresh copy of the base
(never the caller's), QLoRA's 4-bit loading, the modules to adapt, and the memory fixes."""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from clinqa.adapt.lora_config import LoraTrainConfig
from clinqa.errors import ClinqaError
from clinqa.models.local import quiet_peft_deprecations


def fix_mmap_threshold(nbytes: int = 1 << 16) -> bool:
    """Keep glibc's mmap threshold at ``nbytes`` for the rest of the process; True if it was set.

    glibc raises the threshold after large blocks are freed, so the activation buffers a training
    step frees afterwards land in the heap, fragment it and are never returned: resident memory
    then grows far beyond what is live. A fixed threshold maps large buffers separately and gives
    them back when freed. Measured on checkpointed LoRA training with PubMedQA-length examples:
    peak 7.9 -> 2.2 GB, about 10% slower (benchmarks/lora_train.py). Applied with gradient
    checkpointing, the setting chosen for memory; a no-op off Linux/glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


# --------------------------------------------------------------------------------------------------
# Device, precision, quantization
# (the lead may route these through clinqa.models.runtime once it exists: same meaning, None = auto)


def resolve_device(device: str | None) -> str:
    """ "cpu", "cuda" or "mps" for a LoraTrainConfig.device (None: what --device / CLINQA_DEVICE asked
    for; "auto": CUDA, then MPS, then CPU)."""
    if device is None:
        from clinqa.models.runtime import requested_runtime

        device = requested_runtime().device
    want = (device or "auto").lower()
    if want == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    kind, _, index = want.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ClinqaError(f"device {device!r}: no CUDA GPU is available here (use 'auto' or 'cpu')")
        if index and int(index) != 0 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise ClinqaError(
                f"device {device!r}: to train on GPU {index}, run with CUDA_VISIBLE_DEVICES={index} and device 'cuda'"
            )
        return "cuda"
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ClinqaError(f"device {device!r}: MPS is not available here (use 'auto' or 'cpu')")
        return "mps"
    return "cpu"


def resolve_precision(dtype: str | None, device: str) -> str:
    """ "float32", "bfloat16" or "float16": the compute precision on `device` (None/"auto": bf16 on a
    GPU that supports it, fp16 on one that does not, fp32 elsewhere; None follows --dtype / CLINQA_DTYPE)."""
    if dtype is None:
        from clinqa.models.runtime import requested_runtime

        dtype = requested_runtime().dtype
    if dtype in (None, "auto"):
        if device == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype == "float16" and device != "cuda":
        raise ClinqaError(
            f"dtype 'float16' (mixed precision with loss scaling) needs a CUDA GPU; training runs on {device}: "
            "use 'bfloat16' or 'float32'"
        )
    if dtype == "bfloat16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ClinqaError("dtype 'bfloat16': this GPU does not support bfloat16 (use 'float16' or 'auto')")
    return dtype


def resolve_quantization(requested: str, device: str = "cuda") -> str:
    """ "4bit" (QLoRA) or "none": "auto" is 4-bit when training runs on CUDA with bitsandbytes installed."""
    available = device == "cuda" and torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    if requested == "4bit" and not available:
        raise ClinqaError(
            "quantization='4bit' (QLoRA) needs a CUDA GPU and the bitsandbytes package "
            "(pip install 'clinqa[gpu]'): use 'auto' or 'none'"
        )
    if requested == "auto":
        return "4bit" if available else "none"
    return requested


# --------------------------------------------------------------------------------------------------
# The base model


def find_target_modules(model) -> list[str]:
    """Names (last component) of every linear layer inside the decoder blocks: for Llama q_proj,
    k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj. lm_head and embeddings are never included."""
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style projections

        linear_types += (Conv1D,)
    except ImportError:  # pragma: no cover
        pass
    blocks = None
    try:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        blocks = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    except (AttributeError, NotImplementedError):
        blocks = None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        BaseTunerLayer = ()  # type: ignore[assignment]
    names, tuned = [], []
    for n, m in (blocks if blocks is not None else model).named_modules():
        if any(n.startswith(t + ".") for t in tuned):
            continue  # inside a LoRA layer already injected (lora_A, base_layer, ...): its wrapper counts
        if isinstance(m, BaseTunerLayer):
            tuned.append(n)
        elif not isinstance(m, linear_types) or m is head:
            continue
        names.append(n.rsplit(".", 1)[-1])
    names = sorted(set(names))
    if not names:
        raise ClinqaError("found no linear layers in the model's decoder blocks: pass target_modules explicitly")
    return names


def _spec_folder(spec: str) -> tuple[str, str]:
    """(folder or cached HF id, display name) that a model spec string loads from."""
    from clinqa.models.spec import parse_spec

    ms = parse_spec(spec)
    if ms.modifiers:
        raise ClinqaError(
            f"train a LoRA adapter on a base model, not on {spec!r}: drop the +{ms.modifiers[0].kind}: part"
        )
    if ms.kind == "openai":
        raise ClinqaError(
            "LoRA training needs local weights; an openai: endpoint has none (use a model folder, a .gguf file or 'default')"
        )
    from clinqa.models.embedded import (
        EMBEDDED_NAME,
        converted_gguf_dir,
        embedded_model_dir,
    )

    if ms.kind == "default":
        return str(embedded_model_dir()), EMBEDDED_NAME
    if ms.kind == "gguf":
        path = Path(ms.target)
        if not path.is_file():
            raise ClinqaError(f"no such GGUF file: {path}")
        return str(converted_gguf_dir(path)), path.stem
    path = Path(ms.target).expanduser()
    if ms.target.startswith((".", "/", "~")) and not path.exists():
        raise ClinqaError(f"no such model folder: {ms.target}")
    return (str(path) if path.exists() else ms.target), Path(ms.target).name


def _weights_dtype(device: str, precision: str) -> torch.dtype:
    """Base weights on a GPU are loaded in the compute dtype (half the memory of fp32; the LoRA
    weights stay fp32); elsewhere they stay fp32 and mixed precision autocasts."""
    return getattr(torch, precision) if device == "cuda" else torch.float32


def _load_weights(source: str, quantization: str, device: str, precision: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": _weights_dtype(device, precision)}
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision == "bfloat16" else torch.float16
        # under accelerate launch / torchrun every process holds its own quantized copy on its own GPU
        kwargs = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            ),
            "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))},
            "dtype": compute,
        }
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError as exc:
        raise ClinqaError(f"could not load base model weights from {source}: {exc}") from exc
    if quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer


def _strip_clinqa_hooks(model) -> None:
    """Drop forward hooks clinqa registered (steering) from a copied model; transformers' own stay."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                owner = (
                    getattr(hook, "__module__", "") or getattr(getattr(hook, "__func__", None), "__module__", "") or ""
                )
                if owner.startswith("clinqa."):
                    del hooks[key]


def fresh_model(base, quantization: str, requested: str, device: str = "cpu", precision: str = "float32"):
    """(model to train, tokenizer, base description, quantization used), never touching `base`.

    A spec string is loaded afresh from the folder it resolves to; a `LocalModel` is deep-copied
    (any LoRA adapters already loaded into it are stripped from the copy)."""
    from clinqa.models.local import LocalModel

    if isinstance(base, (str, Path)):
        spec = str(base)
        source, name = _spec_folder(spec)
        model, tokenizer = _load_weights(source, quantization, device, precision)
        return model, tokenizer, {"spec": spec, "name": name, "source": source}, quantization
    if not isinstance(base, LocalModel):
        raise ClinqaError(
            f"LoRA training needs a local transformers model (a LocalModel or a spec string), not {type(base).__name__}"
        )
    info = {"spec": base.info.spec, "name": base.info.name}
    if quantization == "4bit":
        # 4-bit weights are loaded from the folder the model came from; an in-memory model has none
        try:
            source, _ = _spec_folder(base.info.spec)
            if not Path(source).is_dir():
                raise ClinqaError(source)
        except ClinqaError:
            if requested == "4bit":
                raise ClinqaError(
                    f"quantization='4bit' needs the base model's folder; {base.info.spec!r} is not one "
                    "(pass the model spec string instead, or use quantization='none')"
                ) from None
            quantization = "none"
        else:
            model, tokenizer = _load_weights(source, quantization, device, precision)
            return model, tokenizer, {**info, "source": source}, quantization
    peft = base._shared.get("peft")
    with base._shared["lock"], torch.inference_mode(False):  # no adapter switch mid-copy
        # a LocalModel with adapters loaded has LoRA layers injected into its modules: copy the
        # PeftModel and unload them from the copy, leaving the shared model as it is
        model = copy.deepcopy(peft).unload() if peft is not None else copy.deepcopy(base.model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    _strip_clinqa_hooks(model)
    return (
        model.to(_weights_dtype(device, precision)),
        base.tokenizer,
        {**info, "source": "in-memory copy"},
        quantization,
    )


def attach_lora(model, config: LoraTrainConfig, targets: list[str], init_weights: dict | None, init_path) -> Any:
    """The PEFT model: LoRA layers on `targets`, initialised from torch's RNG (seed it first) or from
    a starting adapter's weights."""
    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(
        r=int(config.rank),
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with quiet_peft_deprecations():
            peft_model = get_peft_model(model, lora_cfg)
    except ValueError as exc:
        raise ClinqaError(f"could not attach LoRA to modules {targets}: {exc}") from exc
    if init_weights is not None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(peft_model, init_weights)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing:
            raise ClinqaError(
                f"starting adapter {init_path} does not cover this model's LoRA layers "
                f"(e.g. {missing[0]}): was it trained on another base model or target modules?"
            )
    return peft_model
