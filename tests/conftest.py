"""Shared fixtures: a tiny random Llama for logic tests, the real embedded model for inference paths."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need CUDA: skipped where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads: on a busy 2-core machine two threads wait on each other
    for tens of milliseconds per op (15x slower). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def embedded_dir():
    from clinqa.models.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_dir))


def tiny_llama(tokenizer, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    # random init gives near-uniform distributions; scale up so scores are well separated
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="session")
def make_tiny_llama():
    """`tiny_llama` for tests that build their own model (a fixture: `from conftest import` depends on
    which conftest was imported first)."""
    return tiny_llama


@pytest.fixture()
def tiny_predictor(tokenizer):
    from clinqa.models.local import LocalModel

    return LocalModel.from_objects(tiny_llama(tokenizer), tokenizer, spec="tiny", name="tiny-llama")


@pytest.fixture(scope="session")
def embedded_predictor():
    from clinqa.models import load_base_model

    return load_base_model("default")
