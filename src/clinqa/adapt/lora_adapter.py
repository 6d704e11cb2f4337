"""A LoRA adapter folder: a run folder of the one run store (`clinqa.runs.RunFolder`, kind "lora":
run.json with the identity, samples.jsonl with one `TrainingEpoch` per finished epoch) plus PEFT's
files and `clinqa_adapter.json`, the adapter's metadata, written last. Here: opening it as a run
(and upgrading folders written before), the metadata, the starting adapter's hash, and the
`+lora:` spec modifier that loads it into a local model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clinqa.adapt.lora_config import LoraTrainConfig, TrainingEpoch, identity_config
from clinqa.errors import ClinqaError
from clinqa.runs import (  # noqa: F401  (versions, now: lora.py imports them from here)
    LOCK_FILE,
    RUN_FILE,
    SAMPLES_FILE,
    RunFolder,
    atomic_write_text,
    describe_config_change,
    digest,
    now,
    read_json_object,
    versions,
)

KIND = "lora"  # run.json's kind for an adapter folder
METADATA_FILE = "clinqa_adapter.json"  # the adapter's public metadata, written last: it marks a finished folder
LEGACY_TRAIN_FILE = "clinqa_train.json"  # an unfinished run's identity before adapter folders were run folders
CHECKPOINT_DIR = "checkpoint"  # the Trainer's checkpoint-N/ folders
COUNTS = {"epochs": "epochs_run", "steps": "steps", "n_train": "n_train", "n_val": "n_val"}  # run.json <- metadata


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
    return load_file(str(path / "adapter_model.safetensors")), {"path": str(path), "sha256": weights_hash(path)}


def weights_hash(path: str | Path) -> str:
    """An adapter folder's identity wherever it lives: the first 16 hex digits of the sha256 of its
    weights file."""
    return hashlib.sha256((Path(path) / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


def run_config(config: LoraTrainConfig, base_spec: str, starting_adapter: str | None, labels) -> dict[str, Any]:
    """What decides an adapter, as its run.json keeps it (the run store's config and identity): the
    training settings without the memory/speed knobs (`LoraTrainConfig.identity`), the base model's
    spec, the starting adapter's weights hash (None for a fresh LoRA initialisation) and the
    specialty labels. The training questions are the run's data fingerprint."""
    return {
        **config.identity(),
        "base_model": base_spec,
        "starting_adapter": starting_adapter,
        "specialties": sorted(labels),
    }


def open_adapter_run(
    out_dir: Path, cfg: Mapping[str, Any], data: Mapping[str, Any], legacy_data: str
) -> RunFolder[TrainingEpoch]:
    """`out_dir` as this training's run folder (kind "lora"): created, resumed, or refused by the run
    store naming what differs; an adapter folder written before adapter folders were run folders is
    upgraded when it matches (`adopt_legacy`). The caller holds the folder's lock (`lock_path`);
    call it on the main process only."""
    legacy = adopt_legacy(out_dir, cfg, legacy_data)
    run = RunFolder.open(
        out_dir,
        cfg,
        kind=KIND,
        sample_type=TrainingEpoch,
        data=data,
        legacy_identity=legacy,
        lock=False,
        data_may_grow=False,  # other questions train another adapter: none may be added either
    )
    (out_dir / LEGACY_TRAIN_FILE).unlink(missing_ok=True)  # its run.json now says the same
    run.samples()  # cuts off a last line torn by a kill, so the next epoch's line starts whole
    return run


def adopt_legacy(out_dir: Path, cfg: Mapping[str, Any], legacy_data: str) -> str | None:
    """An adapter folder without run.json but with clinqa_adapter.json (finished) or clinqa_train.json
    (unfinished), as clinqa wrote them before: refused with a one-line error naming what differs from
    this training (`legacy_data`: `lora_data.fingerprint` of its questions, the hash those files
    hold), or given a store-version-1 run.json that `RunFolder.open` upgrades; returns the identity
    to pass it as `legacy_identity`. None when `out_dir` is not such a folder; any other non-empty
    folder is refused."""
    if not out_dir.is_dir() or (out_dir / RUN_FILE).exists():
        return None
    if not any(p.name != LOCK_FILE for p in out_dir.iterdir()):
        return None
    finished = (out_dir / METADATA_FILE).is_file()
    source = out_dir / (METADATA_FILE if finished else LEGACY_TRAIN_FILE)
    if not source.is_file():
        raise ClinqaError(f"{out_dir} exists and is not a clinqa adapter folder: choose another output folder")
    found = read_json_object(source)
    start = found.get("init_adapter")  # clinqa_adapter.json keeps {"path", "sha256"}, clinqa_train.json the hash
    old = {
        **identity_config(found.get("config") or {}),
        "base_model": (found.get("base") or {}).get("spec"),
        "starting_adapter": start.get("sha256") if isinstance(start, Mapping) else start,
    }
    diffs = describe_config_change(old, {k: v for k, v in cfg.items() if k != "specialties"})
    if found.get("data_fingerprint") != legacy_data:
        diffs.append("the training questions differ")  # one hash then: which question cannot be named
    if diffs:
        raise ClinqaError(
            f"{out_dir} holds {'a finished adapter' if finished else 'an unfinished training run'} written by an "
            f"older clinqa with a different setup ({'; '.join(diffs)}): choose another output folder or delete this one"
        )
    identity = digest({"lora-legacy": old, "data": legacy_data})
    meta = {
        "kind": KIND,
        "identity": identity,
        "config": dict(cfg),
        "versions": found.get("versions") or versions(),
        "git": None,
        "host": None,
        "started_at": found.get("started_at"),
        "finished_at": found.get("created_at") if finished else None,
        "counts": {},
    }
    if finished:
        meta["compute_s"] = found.get("train_seconds")
        meta["counts"] = {k: found.get(m) for k, m in COUNTS.items()}
    atomic_write_text(out_dir / RUN_FILE, json.dumps(meta, indent=2, default=str))
    return identity


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
