"""The stage-1 `Selector` protocol and `make_selector`, the one factory of the CLI and the service."""

from __future__ import annotations

import json
from datetime import date
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from clinqa.errors import ClinqaError
from clinqa.records.pipeline import FullRecordBaseline, LLMSelector, RetrievalSelector, Selected, answer_question
from clinqa.records.selector_factory import SELECTOR_KINDS, make_selector
from clinqa.records.selectors import Selector

NOW = date(2025, 1, 1)  # as in conftest.py


class FakeModel:
    """Just enough of a Predictor for building selectors: an identity (`info.spec`)."""

    def __init__(self, spec: str):
        self.info = SimpleNamespace(spec=spec, name=spec)


def fake_loader(monkeypatch) -> list[str]:
    """Patch clinqa.adapt.load_predictor (what the CLI, the service and the factory load through)."""
    loaded: list[str] = []

    def load(spec):
        loaded.append(spec)
        return FakeModel(spec)

    monkeypatch.setattr("clinqa.adapt.load_predictor", load)
    return loaded


def stages_folder(path, threshold=0.37):
    path.mkdir()
    (path / "stages.json").write_text(
        json.dumps({"base": "default", "stage1": "/old/place/s1", "stage2": "/old/place/s2", "threshold": threshold})
    )
    return path


def same(a, b) -> bool:
    return type(a) is type(b) and a.describe() == b.describe()


def test_factory_builds_each_kind_with_its_settings(tmp_path, monkeypatch):
    model = FakeModel("m")
    # the same selectors built by hand: class and settings
    assert same(make_selector("bm25", top_k=5), RetrievalSelector("bm25", top_k=5))
    assert same(make_selector("embedding", top_k=3), RetrievalSelector("embedding", top_k=3))
    assert make_selector("bm25").describe() == {"kind": "retrieval", "mode": "bm25", "top_k": 8, "threshold": None}
    llm = make_selector("llm", predictor=model, threshold=0.25)
    assert isinstance(llm, LLMSelector) and llm.predictor is model and llm.threshold == 0.25
    assert make_selector("llm", predictor=model).threshold == 0.5
    assert isinstance(make_selector("full", top_k=3, threshold=0.9), FullRecordBaseline)
    loaded = fake_loader(monkeypatch)
    ft = make_selector("finetuned", base="base-spec", adapters=stages_folder(tmp_path / "st"))
    # the stage-1 adapter beside stages.json (wherever the folder moved), the tuned threshold
    assert loaded == [f"base-spec+lora:{tmp_path / 'st' / 's1'}"]
    assert isinstance(ft, LLMSelector) and ft.threshold == pytest.approx(0.37)
    assert ft.describe()["model"] == loaded[0]
    assert make_selector("finetuned", base="b", adapters=tmp_path / "st", threshold=0.6).threshold == 0.6
    # the LLM selectors' floor of lines; the other kinds ignore it
    assert make_selector("llm", predictor=model, min_lines=2).min_lines == 2
    assert make_selector("finetuned", base="b", adapters=tmp_path / "st", min_lines=1).min_lines == 1
    assert same(make_selector("bm25", top_k=5, min_lines=3), RetrievalSelector("bm25", top_k=5))


def test_every_selector_satisfies_the_protocol(tmp_path, monkeypatch, synthetic_records):
    fake_loader(monkeypatch)
    stages_folder(tmp_path / "st")
    built = {
        kind: make_selector(kind, predictor=FakeModel("m"), base="b", adapters=tmp_path / "st" if kind == "finetuned" else None)
        for kind in SELECTOR_KINDS
    }  # fmt: skip
    for kind, sel in built.items():
        assert isinstance(sel, Selector), kind
        assert sel.describe()["kind"] == sel.kind
    assert isinstance(RetrievalSelector("bm25"), Selector) and isinstance(FullRecordBaseline(), Selector)

    class OnlySelect:  # the old duck type: still accepted by the pipeline, but not a full Selector
        def select(self, question, lines):
            return [Selected(lines[0][0], 1.0)]

    assert not isinstance(OnlySelect(), Selector)
    record = synthetic_records[0]
    answered = answer_question(SimpleNamespace(), record, "Anything?", selector=FullRecordBaseline(), lines=[])
    assert answered.selected == [] and answered.tokens == 0


@pytest.mark.parametrize(
    "kind,kw,message",
    [
        ("tfidf", {}, "unknown selector 'tfidf': use bm25, embedding, llm, full or finetuned"),
        ("llm", {}, "the llm selector needs a model"),
        ("llm", {"predictor": FakeModel("m"), "threshold": 1.5}, "selector 'llm': threshold must be in [0, 1]"),
        ("bm25", {"top_k": None}, "selector 'bm25': give top_k, threshold or both"),
        ("bm25", {"adapters": "ft"}, "adapters are the fine-tuned stage 1"),
        ("finetuned", {"base": "default"}, "needs a `records finetune` folder"),
        ("llm", {"predictor": FakeModel("m"), "min_lines": -1}, "selector 'llm': min_lines must be between 0"),
    ],
)
def test_factory_refuses_bad_settings_in_one_line(kind, kw, message):
    with pytest.raises(ClinqaError) as info:
        make_selector(kind, **kw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_finetuned_refuses_a_bad_stages_folder(tmp_path, monkeypatch):
    loaded = fake_loader(monkeypatch)
    with pytest.raises(ClinqaError, match="has no stages.json"):
        make_selector("finetuned", base="b", adapters=tmp_path / "nothing")
    with pytest.raises(ClinqaError, match=r"threshold must be in \[0, 1\], got 3.0"):
        make_selector("finetuned", base="b", adapters=stages_folder(tmp_path / "bad", threshold=3))
    assert loaded == []  # refused before any model is loaded


def _service_selector(tmp_path, **settings):
    from clinqa.serve.app import Service
    from clinqa.serve.config import ServeConfig

    config = ServeConfig(keys_db=tmp_path / "keys.sqlite", audit_db=tmp_path / "audit.sqlite", **settings)
    service = Service(config, predictor=FakeModel("m"), records=[])
    try:
        return service.selector
    finally:
        service.close()


@pytest.mark.parametrize("kind,top_k", [("bm25", 8), ("bm25", 3), ("embedding", 5), ("full", 8)])
def test_cli_and_service_build_equal_selectors(tmp_path, monkeypatch, synthetic_bundles, kind, top_k):
    """`records ask --selector K --top-k N` and the service with selector_mode=K, selector_top_k=N."""
    from clinqa.cli import app
    from clinqa.records.synth import write_patients

    fake_loader(monkeypatch)
    seen = []

    def capture(predictor, record, question, *, selector, **kw):
        seen.append(selector)
        return answer_question(predictor, record, question, selector=FullRecordBaseline(), lines=[])

    monkeypatch.setattr("clinqa.records.pipeline.answer_question", capture)
    bundle = write_patients(tmp_path / "pts", synthetic_bundles[:1])[0]
    args = ["records", "ask", str(bundle), "Any allergies?", "--selector", kind, "--top-k", str(top_k)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    from_service = _service_selector(tmp_path, selector_mode=kind, selector_top_k=top_k)
    assert len(seen) == 1 and same(seen[0], from_service)
    assert seen[0].describe().get("top_k") == (top_k if kind != "full" else None)


def test_cli_and_service_build_equal_fine_tuned_selectors(tmp_path, monkeypatch, synthetic_bundles, synthetic_records):
    """`records eval BASE --adapters DIR` and `serve` with model=BASE, adapters=DIR: the same stage 1 (and stage 2)."""
    from clinqa.cli import app
    from clinqa.records.questions import generate_questions, write_questions
    from clinqa.records.synth import write_patients
    from clinqa.serve import runner
    from clinqa.serve.config import ServeConfig

    loaded = fake_loader(monkeypatch)
    seen = []

    def capture(predictor, records, questions, *, selector, **kw):
        seen.append((predictor, selector))
        return {"n": len(questions)}

    monkeypatch.setattr("clinqa.records.pipeline.evaluate_records", capture)
    write_patients(tmp_path / "pts", synthetic_bundles[:1])
    write_questions(tmp_path / "qa.jsonl", generate_questions(synthetic_records[0], now=NOW, seed=0)[:2])
    st = stages_folder(tmp_path / "st")
    args = ["records", "eval", "base", str(tmp_path / "qa.jsonl"), "--records", str(tmp_path / "pts")]
    r = CliRunner().invoke(app, [*args, "--adapters", str(st), "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    cli_loaded = list(loaded)
    predictor, selector = runner.load_models(ServeConfig(model="base", adapters=st))
    assert cli_loaded == [f"base+lora:{st / 's2'}", f"base+lora:{st / 's1'}"] and loaded[2:] == cli_loaded
    (cli_predictor, cli_selector), = seen  # fmt: skip
    assert same(cli_selector, selector) and cli_selector.threshold == pytest.approx(0.37)
    assert cli_predictor.info.spec == predictor.info.spec
    # --stage1-model would be ignored beside --adapters: refused instead
    r = CliRunner().invoke(app, [*args, "--adapters", str(st), "--stage1-model", "x", "--out", str(tmp_path / "r2")])
    assert r.exit_code != 0 and "drop --stage1-model" in str(r.exception)
    # --min-lines reaches the fine-tuned selector; beside a retrieval selector, or negative, it is refused
    # before any model loads
    r = CliRunner().invoke(app, [*args, "--adapters", str(st), "--min-lines", "1", "--out", str(tmp_path / "r3")])
    assert r.exit_code == 0, r.output
    assert seen[-1][1].min_lines == 1 and seen[-1][1].threshold == pytest.approx(0.37)
    del loaded[:]
    for bad, message in ((["--selector", "bm25", "--min-lines", "1"], "--min-lines is the llm selector's floor"),
                         (["--selector", "llm", "--min-lines", "-1"], "--min-lines must be at least 0")):  # fmt: skip
        r = CliRunner().invoke(app, [*args, *bad, "--out", str(tmp_path / "r4")])
        assert r.exit_code != 0 and message in str(r.exception) and loaded == []
