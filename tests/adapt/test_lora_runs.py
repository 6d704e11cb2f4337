"""An adapter folder is a run folder of the one run store (clinqa.runs.RunFolder): run.json with the
identity config and the training questions' fingerprint, one samples.jsonl line per epoch, refusals
that name what differs, and folders written by clinqa before (clinqa_adapter.json / clinqa_train.json
without run.json) accepted and upgraded when they match, refused otherwise."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from clinqa.adapt import lora_trainer
from clinqa.adapt.lora import LoraTrainConfig, finetune
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

DRUGS = ["Aspirin", "Heparin", "Atropine", "Adenosine", "Amiodarone", "Digoxin", "Furosemide", "Metoprolol"]
FAST = dict(rank=8, alpha=16, dropout=0.1, learning_rate=3e-2, batch_size=4, max_length=48, val_fraction=0.25)
CFG = dict(epochs=2, patience=None, warmup_fraction=0.0, **FAST)  # 12 training questions: 3 steps an epoch


def questions(n: int = 16, changed: dict | None = None) -> list[Question]:
    out = []
    for i in range(n):
        fields = dict(
            id=f"q{i:02d}",
            question=f"Case {i}: which drug is first line for finding {i}?",
            options={k: DRUGS[(i + j) % len(DRUGS)] for j, k in enumerate("ABCD")},
            answer="ABCD"[i % 4],
            specialties=["cardiology" if i % 2 else "neurology"],
        )
        fields.update((changed or {}).get(fields["id"], {}))
        out.append(Question(**fields))
    return out


def old_data_fingerprint(qs: list[Question]) -> str:
    """clinqa_adapter.json's data_fingerprint as the code before run folders computed it (written out
    here by hand: ids and content, order-free, and the sorted labels)."""
    rows = sorted(
        json.dumps([q.id, q.question, q.options, q.answer, q.meta.get("contexts")], sort_keys=True, default=str)
        for q in qs
    )
    labels = sorted({s for q in qs for s in q.specialties})
    return hashlib.sha256(json.dumps([rows, labels]).encode()).hexdigest()[:16]


def no_training(monkeypatch) -> list:
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("this folder must not be trained again")

    monkeypatch.setattr(lora_trainer, "train", refuse)
    return calls


def read(folder: Path, name: str):
    text = (folder / name).read_text()
    return [json.loads(line) for line in text.splitlines()] if name.endswith(".jsonl") else json.loads(text)


def as_written_before(folder: Path) -> None:
    """Make a folder this code wrote look like one the code before run folders wrote: no run.json, no
    samples.jsonl (clinqa_adapter.json, PEFT's files and the Trainer's checkpoints are unchanged)."""
    for name in ("run.json", "samples.jsonl"):
        (folder / name).unlink()


_DONE: dict[str, Path] = {}


@pytest.fixture()
def finished(tiny_predictor, tmp_path_factory) -> Path:
    """One finished adapter folder per session (copy it before changing it)."""
    if not _DONE:
        _DONE["path"] = finetune(
            tiny_predictor, questions(), LoraTrainConfig(**CFG), tmp_path_factory.mktemp("runs") / "a"
        ).path
    return _DONE["path"]


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_an_adapter_folder_is_a_run_folder(finished):
    run = read(finished, "run.json")
    meta = read(finished, "clinqa_adapter.json")
    assert run["kind"] == "lora" and run["store"] == 2 and run["finished_at"] and run["compute_s"] > 0
    cfg = run["config"]
    assert cfg["rank"] == 8 and cfg["learning_rate"] == 3e-2 and cfg["epochs"] == 2
    assert cfg["base_model"] == "tiny" and cfg["starting_adapter"] is None
    assert cfg["specialties"] == ["cardiology", "neurology"]
    assert "device" not in cfg and "gradient_checkpointing" not in cfg  # not what decides the weights
    assert run["data"]["n"] == 16 and run["data"]["noun"] == "training questions"
    assert list(run["data"]["items"]) == [q.id for q in questions()]
    assert run["versions"]["transformers"] and "git" in run and run["host"]
    assert run["counts"] == {"epochs": 2, "steps": 6, "n_train": 12, "n_val": 4}
    # samples.jsonl: one line per epoch, the history clinqa_adapter.json (written last) reports
    assert read(finished, "samples.jsonl") == [
        {k: h[k] for k in ("epoch", "step", "train_loss", "val_loss")} for h in meta["history"]
    ]
    assert [h["step"] for h in meta["history"]] == [3, 6]
    assert not (finished / "clinqa_train.json").exists() and not (finished / "checkpoint").exists()


def test_a_finished_run_folder_is_not_trained_again(finished, tiny_predictor, tmp_path, monkeypatch):
    folder = copy_of(finished, tmp_path)
    calls = no_training(monkeypatch)
    weights = (folder / "adapter_model.safetensors").read_bytes()
    again = finetune(tiny_predictor, questions(), LoraTrainConfig(**CFG), folder)
    assert again.cached and calls == [] and again.metadata == read(finished, "clinqa_adapter.json")
    assert (folder / "adapter_model.safetensors").read_bytes() == weights
    assert read(folder, "samples.jsonl") == read(finished, "samples.jsonl")  # no epoch written twice
    assert len(read(folder, "run.json")["resumed_at"]) == 1
    # a memory knob is not identity: still the same finished adapter
    assert finetune(tiny_predictor, questions(), LoraTrainConfig(**CFG, gradient_checkpointing=True), folder).cached
    assert calls == []


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(config={"rank": 4}), r"different config \(rank: 8 -> 4\)"),
        (dict(config={"learning_rate": 1e-3}), r"learning_rate: 0\.03 -> 0\.001\)"),
        (dict(config={"dtype": "bf16"}), r"dtype: None -> 'bfloat16'"),
        (dict(data={"q03": {"answer": "A"}}), r"other data \(1 training questions differ, first: q03 answer\)"),
        (dict(data={"q05": {"question": "Case 5?"}}), r"1 training questions differ, first: q05 question\)"),
        (dict(n=17), r"1 training questions added, first: q16"),
        (dict(n=15), r"1 training questions missing, first: q15"),
        (dict(order=True), r"the training questions are in another order"),
        (dict(spec=True), r"base_model: 'tiny' -> 'tiny-other'"),
    ],
)
def test_a_different_training_is_refused_naming_what_differs(finished, tiny_predictor, tmp_path, change, message):
    folder = copy_of(finished, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    qs = questions(change.get("n", 16), change.get("data"))
    if change.get("order"):
        qs = qs[1:] + qs[:1]
    base = tiny_predictor
    if change.get("spec"):
        import copy
        import dataclasses

        base = copy.copy(tiny_predictor)  # the same weights under another spec
        base.info = dataclasses.replace(tiny_predictor.info, spec="tiny-other")
    with pytest.raises(ClinqaError, match=message) as err:
        finetune(base, qs, LoraTrainConfig(**{**CFG, **change.get("config", {})}), folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # a refusal changes nothing


def test_a_finished_folder_written_before_is_accepted_and_upgraded(finished, tiny_predictor, tmp_path, monkeypatch):
    folder = copy_of(finished, tmp_path)
    as_written_before(folder)
    meta = read(folder, "clinqa_adapter.json")
    assert meta["data_fingerprint"] == old_data_fingerprint(questions())  # what the old code compared
    calls = no_training(monkeypatch)
    res = finetune(tiny_predictor, questions(), LoraTrainConfig(**CFG), folder)
    assert res.cached and calls == [] and res.metadata == meta
    run = read(folder, "run.json")
    assert run["kind"] == "lora" and run["store"] == 2 and run["migrated_at"]
    assert run["finished_at"] == meta["created_at"] and run["compute_s"] == meta["train_seconds"]
    assert run["counts"] == read(finished, "run.json")["counts"] == {"epochs": 2, "steps": 6, "n_train": 12, "n_val": 4}
    assert run["config"] == read(finished, "run.json")["config"] and run["data"] == read(finished, "run.json")["data"]
    assert read(folder, "samples.jsonl") == read(finished, "samples.jsonl")  # the epochs from its metadata
    # upgraded: from now on the store checks it, naming the question that differs
    with pytest.raises(ClinqaError, match="first: q03 answer"):
        finetune(tiny_predictor, questions(changed={"q03": {"answer": "A"}}), LoraTrainConfig(**CFG), folder)
    assert finetune(tiny_predictor, questions(), LoraTrainConfig(**CFG), folder).cached and calls == []


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(config={"rank": 4}),
            r"finished adapter written by an older clinqa with a different setup \(rank: 8 -> 4\)",
        ),
        (dict(config={"seed": 3}), r"\(seed: 0 -> 3\)"),
        (dict(data={"q03": {"answer": "A"}}), r"\(the training questions differ\)"),
        (dict(init=True), r"starting_adapter: None -> '[0-9a-f]{16}'"),
    ],
)
def test_a_finished_folder_written_before_with_another_setup_is_refused(
    finished, tiny_predictor, tmp_path, change, message
):
    folder = copy_of(finished, tmp_path / "x")
    as_written_before(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    kw = {"init_adapter": finished} if change.get("init") else {}
    with pytest.raises(ClinqaError, match=message) as err:
        finetune(
            tiny_predictor,
            questions(changed=change.get("data")),
            LoraTrainConfig(**{**CFG, **change.get("config", {})}),
            folder,
            **kw,
        )
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # not upgraded, nothing written


def test_an_unfinished_folder_written_before_resumes_from_its_checkpoint(tiny_predictor, tmp_path):
    cfg = LoraTrainConfig(**CFG)
    folder = tmp_path / "killed"

    def kill_at_5(step, total, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_predictor, questions(), cfg, folder, checkpoint_every=2, progress=kill_at_5)
    assert (folder / "checkpoint" / "checkpoint-4" / "clinqa_state.json").is_file()
    assert read(folder, "run.json")["compute_s"] > 0 and not read(folder, "run.json")["finished_at"]
    assert [e["epoch"] for e in read(folder, "samples.jsonl")] == [1]  # epoch 1 ended at step 3
    # what the code before run folders left: its checkpoints and clinqa_train.json (the identity), no run.json
    as_written_before(folder)
    old = {"config": cfg.identity(), "base": {"spec": "tiny"}, "data_fingerprint": old_data_fingerprint(questions())}
    (folder / "clinqa_train.json").write_text(json.dumps({**old, "started_at": "2026-01-01T00:00:00Z"}, indent=2))

    lr = LoraTrainConfig(**{**CFG, "learning_rate": 1e-3})
    with pytest.raises(ClinqaError, match=r"unfinished training run written by an older clinqa .*learning_rate: 0\.03"):
        finetune(tiny_predictor, questions(), lr, folder)
    assert not (folder / "run.json").exists() and (folder / "clinqa_train.json").is_file()

    steps = []
    res = finetune(
        tiny_predictor, questions(), cfg, folder, checkpoint_every=2, progress=lambda s, t, l: steps.append(s)
    )
    assert res.resumed_from == 4 and steps == [4, 5, 6] and not res.cached
    assert res.metadata["steps"] == 6 and res.metadata["resumes"] == 1
    run = read(folder, "run.json")
    assert run["migrated_at"] and run["started_at"] == "2026-01-01T00:00:00Z" and run["finished_at"]
    assert not (folder / "clinqa_train.json").exists()
    assert [e["epoch"] for e in read(folder, "samples.jsonl")] == [1, 2]  # epoch 1 from the checkpoint, once
    assert read(folder, "samples.jsonl")[-1]["val_loss"] == pytest.approx(res.history[-1]["val_loss"])


def test_a_killed_run_resumes_and_writes_each_epoch_once(tiny_predictor, tmp_path):
    folder = tmp_path / "killed"

    def kill_at_5(step, total, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_predictor, questions(), LoraTrainConfig(**CFG), folder, checkpoint_every=2, progress=kill_at_5)
    with open(folder / "samples.jsonl", "a") as fh:  # a kill in the middle of writing epoch 2's line
        fh.write('{"epoch": 2, "step": 6, "train_lo')
    res = finetune(tiny_predictor, questions(), LoraTrainConfig(**CFG), folder, checkpoint_every=2)
    assert (
        res.resumed_from == 4
        and read(folder, "run.json")["finished_at"]
        and len(read(folder, "run.json")["resumed_at"]) == 1
    )
    assert read(folder, "samples.jsonl") == [
        {k: h[k] for k in ("epoch", "step", "train_loss", "val_loss")} for h in res.history
    ]  # the torn line was cut off, and epoch 1 (finished before the kill) is there once


def test_a_folder_that_is_not_an_adapter_is_refused(tiny_predictor, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ClinqaError, match="exists and is not a clinqa adapter folder"):
        finetune(tiny_predictor, questions(), LoraTrainConfig(**CFG), tmp_path / "other")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
