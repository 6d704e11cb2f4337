"""--preset s-medqa: the paper's settings under explicit flags, recorded in the config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clinqa.cli import app
from clinqa.errors import ClinqaError
from clinqa.experiments.presets import PRESETS, apply_preset

DEFAULTS = {"epochs": 3, "learning_rate": None, "patience": None, "method": "option", "shuffles": 1, "matcher": "regex"}


def test_explicit_flags_beat_the_preset_which_beats_the_defaults():
    none = dict.fromkeys(DEFAULTS)
    assert apply_preset(None, none, DEFAULTS) == DEFAULTS
    assert apply_preset("s-medqa", none, DEFAULTS) == {"epochs": 10, "learning_rate": 2e-5, "patience": 2, "method": "generate",
                                                        "shuffles": 5, "matcher": "minilm"}  # fmt: skip
    mixed = apply_preset("s-medqa", {**none, "shuffles": 2, "learning_rate": 1e-4}, DEFAULTS)
    assert (mixed["shuffles"], mixed["learning_rate"], mixed["epochs"]) == (2, 1e-4, 10)
    assert apply_preset("s-medqa", {**none, "epochs": 0}, DEFAULTS)["epochs"] == 0  # 0 is a value, not "unset"
    with pytest.raises(ClinqaError, match="unknown preset"):
        apply_preset("lm-eval", none, DEFAULTS)
    assert PRESETS["s-medqa"].settings["learning_rate"] == 2e-5


def test_cross_specialty_preset_is_checked_before_any_work(tmp_path):
    r = CliRunner().invoke(app, ["experiment", "cross-specialty", "default", "--out", str(tmp_path / "x"), "--preset", "s-medqa",
                                 "--method", "option"])  # fmt: skip
    assert isinstance(r.exception, ClinqaError) and "use it with --method generate" in str(r.exception)
    r = CliRunner().invoke(
        app, ["experiment", "cross-specialty", "default", "--out", str(tmp_path / "x"), "--preset", "nope"]
    )
    assert isinstance(r.exception, ClinqaError) and "unknown preset" in str(r.exception)
    assert not (tmp_path / "x").exists()


def test_finetune_preset_sets_the_learning_rate_and_records_its_name(tokenizer, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    r = CliRunner().invoke(app, ["finetune", str(model_dir), "bundled", "--specialty", "cardiology", "--out", str(tmp_path / "ad"),
                                 "--preset", "s-medqa", "--epochs", "1", "--rank", "2", "--batch-size", "8"])  # fmt: skip
    assert r.exit_code == 0, r.output
    meta = json.loads(next((tmp_path / "ad").rglob("clinqa_adapter.json")).read_text())
    assert meta["config"]["learning_rate"] == 2e-5  # from the preset
    assert meta["config"]["epochs"] == 1  # the explicit flag wins
    assert meta["config"]["patience"] == 2 and meta["extra"]["preset"] == "s-medqa"
