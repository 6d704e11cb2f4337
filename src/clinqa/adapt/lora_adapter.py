"""A LoRA adapter folder: its metadata file, its identity (what a training in it must agree on), the
starting adapter's hash, and the `+lora:` spec modifier that loads it into a local model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clinqa.adapt.lora_config import LoraTrainConfig, identity_config
from clinqa.errors import ClinqaError
from clinqa.runs import LOCK_FILE, atomic_write_text, now, versions  # noqa: F401  (versions: lora.py imports it from here)

METADATA_FILE = "clinqa_adapter.json"
TRAIN_FILE = "clinqa_train.json"  # identity of an unfinished training run; removed when it finishes
CHECKPOINT_DIR = "checkpoint"  # the Trainer's checkpoint-N/ folders


def load_adapter_metadata(path: str | Path) -> dict[str, Any]:
    """The clinqa_adapter.json of an adapter folder trained by `finetune`."""
    path = Path(path)
    if not path.is_dir():
        raise ClinqaError(f"no such LoRA adapter folder: {path}")
    f = path / METADATA_FILE
    if not f.is_file():
        raise ClinqaError(
            f"{path} has no {METADATA_FILE}: not a finished clinqa adapter (train one with clinqa.adapt.lora.finetune)"
        )
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ClinqaError(f"{f} is not valid JSON: {exc}") from exc


def is_finished(out_dir: Path) -> bool:
    return all((out_dir / f).is_file() for f in (METADATA_FILE, "adapter_config.json", "adapter_model.safetensors"))


def check_identity(out_dir: Path, found: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> None:
    """Refuse to mix two trainings in one folder, naming what differs."""
    diffs = []
    old_cfg = identity_config(found.get("config") or {})
    new_cfg = wanted["config"]
    for k in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(k) != new_cfg.get(k):
            diffs.append(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}")
    if (found.get("base") or {}).get("spec") != wanted["base"]["spec"]:
        diffs.append(f"base model: {(found.get('base') or {}).get('spec')!r} -> {wanted['base']['spec']!r}")
    if found.get("data_fingerprint") != wanted["data_fingerprint"]:
        diffs.append("training questions differ")

    def sha(v):  # metadata keeps {"path", "sha256"}; a run's identity the hash alone
        return v.get("sha256") if isinstance(v, Mapping) else v

    if sha(found.get("init_adapter")) != sha(wanted.get("init_adapter")):
        diffs.append(f"starting adapter: {sha(found.get('init_adapter'))!r} -> {sha(wanted.get('init_adapter'))!r}")
    if diffs:
        raise ClinqaError(
            f"{out_dir} holds {where} with a different setup ({'; '.join(diffs)}): "
            "choose another output folder or delete this one"
        )


def read_init_adapter(path: Path, config: LoraTrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights, identity) of a starting adapter, refusing one whose rank or targets differ from `config`.
    The identity is the hash of its weights file, wherever the folder lives."""
    from safetensors.torch import load_file

    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise ClinqaError(
            f"starting adapter {path} is not a LoRA adapter folder (no adapter_config.json / adapter_model.safetensors)"
        )
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("r") != config.rank:
        raise ClinqaError(f"starting adapter {path} has rank {cfg.get('r')}; this training uses rank {config.rank}")
    if config.target_modules is not None and sorted(cfg.get("target_modules") or []) != sorted(config.target_modules):
        raise ClinqaError(
            f"starting adapter {path} targets {cfg.get('target_modules')}; this training targets {config.target_modules}"
        )
    blob = (path / "adapter_model.safetensors").read_bytes()
    return load_file(str(path / "adapter_model.safetensors")), {
        "path": str(path),
        "sha256": hashlib.sha256(blob).hexdigest()[:16],
    }


def claim_folder(out_dir: Path, identity: Mapping[str, Any]) -> None:
    """Make `out_dir` this training's folder, or refuse: an unfinished run's folder must have been
    started with the same identity; any other non-empty folder is someone else's. Run it on one
    process at a time (the main one first under several processes), after the finished check."""
    train_file = out_dir / TRAIN_FILE
    if train_file.is_file():
        check_identity(out_dir, json.loads(train_file.read_text()), identity, "an unfinished training run")
        return
    if out_dir.exists() and any(p.name != LOCK_FILE for p in out_dir.iterdir()):
        raise ClinqaError(f"{out_dir} exists and is not a clinqa adapter folder: choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(train_file, json.dumps({**identity, "started_at": now()}, indent=2))


def apply_modifier(predictor, modifier):
    """`+lora:PATH[@name=NAME]`: load the adapter folder into a local model and use it.

    Adapters share the base weights: several `+lora:` specs on one loaded model cost one copy of it.
    """
    from clinqa.models.local import LocalModel

    unknown = set(modifier.params) - {"name"}
    if unknown:
        raise ClinqaError(
            f"unknown parameter(s) {', '.join(sorted(unknown))} for {modifier}: lora takes only @name=NAME"
        )
    path = Path(modifier.target).expanduser()
    if not path.exists():
        raise ClinqaError(f"no such LoRA adapter folder: {modifier.target} (train one with `clinqa finetune`)")
    if not path.is_dir() or not (path / "adapter_config.json").is_file():
        raise ClinqaError(f"{modifier.target} is not a LoRA adapter folder (no adapter_config.json)")
    if not isinstance(predictor, LocalModel):
        backend = getattr(getattr(predictor, "info", None), "backend", type(predictor).__name__)
        raise ClinqaError(
            f"LoRA adapters need a local model backend (a model folder, a .gguf file or 'default'), not {backend}; "
            "put +lora: first, before modifiers that wrap the model"
        )
    if predictor.adapter is not None:
        raise ClinqaError(f"one LoRA adapter per model spec: {predictor.info.spec} already uses {predictor.adapter!r}")
    if (path / METADATA_FILE).is_file():
        trained_on = load_adapter_metadata(path).get("base", {})
        for key in ("hidden_size", "n_layers"):
            want, have = trained_on.get(key), getattr(predictor.info, key, None)
            if want is not None and have is not None and want != have:
                raise ClinqaError(
                    f"adapter {modifier.target} was trained on {trained_on.get('name') or trained_on.get('spec')} "
                    f"({key} {want}); this model ({predictor.info.name}) has {key} {have}"
                )
    try:
        view = predictor.load_adapter(path, name=modifier.params.get("name"))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ClinqaError(f"could not load LoRA adapter {modifier.target} into {predictor.info.name}: {exc}") from exc
    view.info = dataclasses.replace(
        view.info, spec=f"{predictor.info.spec}+{modifier}"
    )  # runs record which adapter answered
    return view
