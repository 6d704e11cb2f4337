"""Load a model from a spec string and use it through the Predictor protocol."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from clinqa.errors import ClinqaError
from clinqa.models.base import ContinuationScore, GenerationConfig, ModelInfo, Predictor, loglikelihood
from clinqa.models.runtime import Runtime, RuntimeConfig, current_runtime, set_runtime
from clinqa.models.spec import ModelSpec, Modifier, parse_spec

__all__ = [
    "ContinuationScore",
    "GenerationConfig",
    "ModelInfo",
    "ModelSpec",
    "Modifier",
    "Predictor",
    "Runtime",
    "RuntimeConfig",
    "current_runtime",
    "load_base_model",
    "loglikelihood",
    "parse_spec",
    "set_runtime",
]


def load_base_model(spec: str | ModelSpec, runtime: Runtime | None = None) -> Predictor:
    """The backend a spec names, without its modifiers (those live in clinqa.adapt), on `runtime`
    (default: `current_runtime()`: the --device/--dtype the command was given, or CLINQA_DEVICE/CLINQA_DTYPE)."""
    ms = parse_spec(spec) if isinstance(spec, str) else spec
    ms = ms.without_modifiers()
    if ms.kind == "openai":
        return _load_cached(ms, None)
    return _load_cached(ms, runtime or current_runtime())


@lru_cache(maxsize=4)
def _load_cached(ms: ModelSpec, runtime: Runtime | None) -> Predictor:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ms.kind == "openai":
        from clinqa.models.remote import OpenAIModel, RemoteConfig

        config = RemoteConfig.from_params(dict(ms.params), str(ms))
        return OpenAIModel(
            ms.target, ms.model_name, spec=str(ms), api_key=os.environ.get("CLINQA_OPENAI_API_KEY"), config=config
        )

    from clinqa.models.embedded import EMBEDDED_NAME, converted_gguf_dir, embedded_model_dir
    from clinqa.models.local import LocalModel

    if ms.kind == "default":
        return LocalModel.from_pretrained(embedded_model_dir(), spec="default", name=EMBEDDED_NAME, runtime=runtime)
    if ms.kind == "gguf":
        path = Path(ms.target)
        if not path.is_file():
            raise ClinqaError(f"no such GGUF file: {path}")
        return LocalModel.from_pretrained(converted_gguf_dir(path), spec=str(ms), name=path.stem, runtime=runtime)
    path = Path(ms.target)
    if ms.target.startswith((".", "/", "~")) and not path.expanduser().exists():
        raise ClinqaError(f"no such model folder: {ms.target}")
    if path.expanduser().is_dir() and not (path.expanduser() / "config.json").is_file():
        raise ClinqaError(
            f"model folder {ms.target} has no config.json: give a Hugging Face model folder (config.json, weights, tokenizer)"
        )
    return LocalModel.from_pretrained(
        path.expanduser() if path.expanduser().exists() else ms.target, spec=str(ms), runtime=runtime
    )
