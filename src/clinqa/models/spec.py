"""Parse the model-spec string users type everywhere (eval, compare, records, serve).

    default                                   the embedded SmolLM2-135M-Instruct
    HF_ID_OR_DIR                              a Hugging Face id (already in the local cache) or a folder
    path/model.gguf                           a GGUF file (dequantised by transformers, cached)
    openai:http://127.0.0.1:8000/v1#name      an OpenAI-compatible server (vLLM, llama.cpp server)
    openai:URL#name@concurrency=8,batch=16    ... with throughput parameters (see models/remote.py)

Modifiers are appended with '+': `default+lora:adapters/cardio`, `default+steer:vectors/triage@alpha=2`,
`default+rag:indexes/textbook@k=5`. Parameters after '@' are comma-separated key=value pairs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from clinqa.errors import ClinqaError

MODIFIER_KINDS = ("lora", "steer", "rag", "prompt")
_SPLIT = re.compile(r"\+(?=(?:{}):)".format("|".join(MODIFIER_KINDS)))


@dataclass(frozen=True)
class Modifier:
    kind: str
    target: str
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        p = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind}:{self.target}" + (f"@{p}" if p else "")


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # default | hf | gguf | openai
    target: str  # '' for default, path/id, or base URL
    model_name: str = ""  # openai: the served model name
    modifiers: tuple[Modifier, ...] = ()
    params: tuple[tuple[str, str], ...] = ()  # openai: @key=value after the model name

    @property
    def base(self) -> str:
        if self.kind == "default":
            return "default"
        if self.kind == "openai":
            p = ",".join(f"{k}={v}" for k, v in self.params)
            return (
                f"openai:{self.target}"
                + (f"#{self.model_name}" if self.model_name or p else "")
                + (f"@{p}" if p else "")
            )
        return self.target

    def __str__(self) -> str:
        return "+".join([self.base, *map(str, self.modifiers)])

    def without_modifiers(self) -> ModelSpec:
        return ModelSpec(self.kind, self.target, self.model_name, params=self.params)


def _parse_params(text: str, where: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise ClinqaError(f"bad parameter {part!r} in {where!r}: expected key=value, e.g. @alpha=2")
        k, v = part.split("=", 1)
        params[k.strip()] = v.strip()
    return params


def parse_modifier(text: str) -> Modifier:
    kind, _, rest = text.partition(":")
    if kind not in MODIFIER_KINDS:
        raise ClinqaError(f"unknown model modifier {kind!r} in {text!r}: use one of {', '.join(MODIFIER_KINDS)}")
    target, _, params = rest.partition("@")
    if not target:
        raise ClinqaError(f"model modifier {text!r} needs a target, e.g. {kind}:path/to/it")
    return Modifier(kind, target, _parse_params(params, text))


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; raises ClinqaError with an example on malformed input."""
    spec = (spec or "").strip()
    if not spec:
        raise ClinqaError("empty model spec: use 'default', a model folder or id, a .gguf file, or openai:URL#MODEL")
    base, *mods = _SPLIT.split(spec)
    modifiers = tuple(parse_modifier(m) for m in mods)
    if base == "default":
        return ModelSpec("default", "", "", modifiers)
    if base.startswith("openai:"):
        url, _, name = base[len("openai:") :].partition("#")
        if not url.startswith(("http://", "https://")):
            raise ClinqaError(f"bad endpoint in {base!r}: expected openai:http://HOST:PORT/v1#MODEL")
        name, _, params = name.partition("@")
        return ModelSpec("openai", url.rstrip("/"), name, modifiers, tuple(_parse_params(params, base).items()))
    if base.lower().endswith(".gguf"):
        return ModelSpec("gguf", base, "", modifiers)
    return ModelSpec("hf", base, "", modifiers)
