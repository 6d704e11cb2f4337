"""Fine-tuning the record stages (clinqa.records.train) on a tiny random Llama: the examples, the three
modes, the tuned threshold, the forgetting experiment and the size sweep, each resumable."""

from __future__ import annotations

import json
from datetime import date

import pytest

from clinqa.adapt.lora import LoraTrainConfig
from clinqa.errors import ClinqaError
from clinqa.records.fhir import record_from_bundle
from clinqa.records.pipeline import ANSWER_SYSTEM, LLMSelector, select_prompt
from clinqa.records.questions import generate_questions, read_questions
from clinqa.records.render import render_record
from clinqa.records.synth import synthesize_patients
from clinqa.records.train import (
    StagesConfig,
    evaluate_answering,
    evaluate_selection,
    finetune_stages,
    forgetting,
    read_stages,
    size_sweep,
    stage_examples,
)

NOW = date(2025, 1, 1)
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def records():
    return [
        record_from_bundle(b, source=f"synthetic-{i}") for i, b in enumerate(synthesize_patients(2, seed=3, now=NOW))
    ]


@pytest.fixture(scope="module")
def questions(records):
    return [q for r in records for q in generate_questions(r, now=NOW, seed=0, per_type=1)]


def tiny_config(mode: str = "separate", **kw) -> StagesConfig:
    lora = LoraTrainConfig(
        rank=4,
        alpha=8,
        epochs=1,
        patience=None,
        batch_size=8,
        max_length=256,
        learning_rate=1e-2,
        val_fraction=0.2,
        warmup_fraction=0.0,
    )
    return StagesConfig(mode=mode, lora=lora, negatives=1, distractors=1, **kw)


def test_stage_examples_match_the_inference_prompts(records, questions):
    ex1 = stage_examples(records, questions, 1, negatives=2)
    by_q = {q.id: q for q in questions}
    lines = {rid: text for r in records for rid, text in render_record(r)}
    for e in ex1:
        qid, rid = e.id.split("|")
        assert e.prompt == select_prompt(by_q[qid].question, lines[rid]) and not e.chat  # LLMSelector's very prompt
        assert e.target == (" yes" if rid in by_q[qid].relevant_ids else " no")
    assert {e.target for e in ex1} == {" yes", " no"}
    ex2 = stage_examples(records, questions, 2)
    assert len(ex2) == len(questions) and all(e.chat and e.system == ANSWER_SYSTEM for e in ex2)
    unanswerable = next(e for e in ex2 if by_q[e.id].qtype == "unanswerable")
    assert unanswerable.target == "Not in the record."
    with pytest.raises(ClinqaError, match="stage must be 1 or 2"):
        stage_examples(records, questions, 3)


def test_bad_config_and_missing_records(records, questions, tiny_predictor, tmp_path):
    with pytest.raises(ClinqaError, match="mode = 'joint'"):
        StagesConfig(mode="joint")
    with pytest.raises(ClinqaError, match="no record for patient"):
        finetune_stages(tiny_predictor, records[:1], questions, tmp_path / "x", tiny_config())
    with pytest.raises(ClinqaError, match="records finetune"):
        read_stages(tmp_path)


def test_separate_stages_train_tune_and_reuse(records, questions, tiny_predictor, tmp_path):
    stages = finetune_stages(tiny_predictor, records, questions, tmp_path / "sep", tiny_config())
    assert read_stages(tmp_path / "sep") == json.loads(json.dumps(stages))
    assert stages["stage1"].endswith("stage1") and stages["stage2"].endswith("stage2")
    meta1 = json.loads((tmp_path / "sep/stage1/clinqa_adapter.json").read_text())
    meta2 = json.loads((tmp_path / "sep/stage2/clinqa_adapter.json").read_text())
    assert meta1["specialties"] == ["stage1"] and meta2["specialties"] == ["stage2"] and meta2["init_adapter"] is None
    # the tuning questions are held out of both stages' training data
    assert stages["n_tune_questions"] >= 1 and stages["n_questions"] + stages["n_tune_questions"] == len(questions)
    trained_q = {i.split("|")[0] for i in meta1["train_ids"] + meta1["val_ids"]}
    assert len(trained_q) == stages["n_questions"]  # every training question has pairs (at least its negatives)
    assert len({q.id for q in questions} - trained_q) == stages["n_tune_questions"]
    # ... and written out, so another selector can be tuned on the same held-out questions
    held_out = read_questions(tmp_path / "sep/tune-questions.jsonl")
    assert {q.id for q in held_out} == {q.id for q in questions} - trained_q
    assert [q.id for q in held_out] == stages["tuning"]["key"][0]
    assert 0.0 <= stages["threshold"] <= 1.0 and 0.0 <= stages["tuning"]["f1"] <= 1.0
    # a moved folder still finds its adapters
    import shutil

    shutil.copytree(tmp_path / "sep", tmp_path / "moved")
    assert read_stages(tmp_path / "moved")["stage2"] == str(tmp_path / "moved" / "stage2")
    # a second call trains nothing and keeps the tuned threshold
    again = finetune_stages(tiny_predictor, records, questions, tmp_path / "sep", tiny_config())
    assert again["threshold"] == stages["threshold"] and again["tuning"] == stages["tuning"]


def _micro_f1(selector, records, qs):
    """Micro F1 of a selector, computed directly from its selections."""
    lines = {r.patient_id: render_record(r) for r in records}
    tp = fp = fn = 0
    for q in qs:
        picked = {s.id for s in selector.select(q.question, lines[q.patient_id])}
        rel = set(q.relevant_ids)
        tp, fp, fn = tp + len(picked & rel), fp + len(picked - rel), fn + len(rel - picked)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def test_sequential_continues_stage1_and_measures_forgetting(records, questions, tiny_predictor, tmp_path, monkeypatch):
    from rouge_score import rouge_scorer

    from clinqa.records.metrics import strip_citations
    from clinqa.records.pipeline import answer
    from clinqa.records.train import with_adapter

    stages = finetune_stages(tiny_predictor, records, questions, tmp_path / "seq", tiny_config("sequential"))
    meta2 = json.loads((tmp_path / "seq/stage2-after-stage1/clinqa_adapter.json").read_text())
    assert meta2["init_adapter"]["path"] == stages["stage1"]
    # the reverse order: stage 1 continues a stage-2 adapter trained first
    rev = stages["reverse"]
    meta_r = json.loads((tmp_path / "seq/stage1-after-stage2/clinqa_adapter.json").read_text())
    assert meta_r["init_adapter"]["path"] == rev["stage2"] and meta_r["specialties"] == ["stage1"]
    assert json.loads((tmp_path / "seq/stage2/clinqa_adapter.json").read_text())["init_adapter"] is None
    test_q = questions[:3]
    result = forgetting(tiny_predictor, records, test_q, tmp_path / "seq", max_new_tokens=8, with_meteor=False)
    # forward: the F1 of each adapter, computed directly from its selector at the tuned threshold
    f1 = {name: _micro_f1(LLMSelector(with_adapter(tiny_predictor, stages[key]), threshold=stages["threshold"]), records, test_q)
          for name, key in (("before", "stage1"), ("after", "stage2"))}  # fmt: skip
    assert result["before"]["micro"]["f1"] == pytest.approx(f1["before"]) and result["after"]["micro"][
        "f1"
    ] == pytest.approx(f1["after"])
    assert result["f1_drop"] == pytest.approx(f1["before"] - f1["after"])
    # the paired change: per-question F1 from the selections written, recomputed here by hand
    per = {}
    for name in ("before", "after"):
        for line in (tmp_path / f"seq/selection-{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            s, r = set(row["selected"]), set(row["relevant_ids"])
            if r:
                per.setdefault(row["question_id"], {})[name] = 2 * len(s & r) / (len(s) + len(r))
    diffs = [v["after"] - v["before"] for v in per.values()]
    assert diffs, "the test questions need relevant lines"
    assert result["f1_change"]["n"] == len(diffs) and result["f1_change"]["diff"] == pytest.approx(
        sum(diffs) / len(diffs)
    )
    # the ranking with no threshold: average precision from each adapter's own P(yes), by hand
    lines_of = {r.patient_id: render_record(r) for r in records}
    ap = {}
    for name, key in (("before", "stage1"), ("after", "stage2")):
        sel = LLMSelector(with_adapter(tiny_predictor, stages[key]))
        ap[name] = [_ap_by_hand(sel, q, lines_of[q.patient_id]) for q in test_q]
        assert result[name]["mean_ap"] == pytest.approx(sum(ap[name]) / len(ap[name]))
    assert result["ap_change"]["n"] == len(test_q) and result["ap_change"]["diff"] == pytest.approx(
        sum(a - b for a, b in zip(ap["after"], ap["before"])) / len(test_q)
    )
    assert json.loads((tmp_path / "seq/forgetting.json").read_text())["f1_drop"] == pytest.approx(result["f1_drop"])
    # reverse: stage-2 answers from the gold lines, ROUGE-L by rouge-score directly
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    lines = {r.patient_id: render_record(r) for r in records}
    direct = {}
    for name, key in (("before", "stage2"), ("after", "stage1_after_stage2")):
        model = with_adapter(tiny_predictor, rev[key])
        direct[name] = []
        for q in test_q:
            text = answer(
                model, q.question, [(i, t) for i, t in lines[q.patient_id] if i in q.relevant_ids], max_new_tokens=8
            )
            assert result["reverse"][name]["per_question"][q.id]["answer"] == text
            direct[name].append(scorer.score(q.answer, strip_citations(text))["rougeL"].fmeasure)
        assert result["reverse"][name]["rouge_l"] == pytest.approx(sum(direct[name]) / 3)
        assert result["reverse"][name]["meteor"] is None
    change = result["reverse"]["rouge_l_change"]
    assert change["n"] == 3 and change["diff"] == pytest.approx(
        sum(a - b for a, b in zip(direct["after"], direct["before"])) / 3
    )
    assert result["reverse"]["meteor_change"] is None
    lines_before = (tmp_path / "seq/selection-before.jsonl").read_text().splitlines()
    assert len(lines_before) == 3 and len((tmp_path / "seq/answers-after.jsonl").read_text().splitlines()) == 3
    # resumable: a second run reads the selections and answers instead of computing them again
    again = forgetting(tiny_predictor, records, test_q, tmp_path / "seq", max_new_tokens=8, with_meteor=False)
    assert again["before"] == result["before"] and again["reverse"] == json.loads(json.dumps(result["reverse"]))
    assert (tmp_path / "seq/selection-before.jsonl").read_text().splitlines() == lines_before
    # a view of another adapter names it (`tiny+lora:FOLDER`) and its rows carry the hash of its weights,
    # so the "after" adapters writing into the "before" files select and answer every question again
    after1 = with_adapter(tiny_predictor, stages["stage2"])
    assert after1.info.spec == f"tiny+lora:{stages['stage2']}"
    sel_file, ans_file = tmp_path / "seq/selection-before.jsonl", tmp_path / "seq/answers-before.jsonl"
    other = evaluate_selection(LLMSelector(after1, threshold=stages["threshold"]), records, test_q, out=sel_file)
    assert other["micro"] == result["after"]["micro"] and len(sel_file.read_text().splitlines()) == 6
    after2 = with_adapter(tiny_predictor, rev["stage1_after_stage2"])
    other = evaluate_answering(after2, records, test_q, out=ans_file, max_new_tokens=8, with_meteor=False)
    assert other["rouge_l"] == pytest.approx(result["reverse"]["after"]["rouge_l"])
    assert len(ans_file.read_text().splitlines()) == 6
    # the threshold tuned again after stage 2, on the same held-out training questions: computed here
    # with tune_threshold on the "after" adapter directly, then the F1 at it from its own selections
    from clinqa.records.pipeline import selection_examples, tune_threshold
    from clinqa.records.train import TUNE_FILE

    held_out = read_questions(tmp_path / "seq" / TUNE_FILE)
    retuned = LLMSelector(with_adapter(tiny_predictor, stages["stage2"]))
    threshold = tune_threshold(retuned, selection_examples(records, held_out))["threshold"]
    result = forgetting(tiny_predictor, records, test_q, tmp_path / "seq", tune_records=records, with_meteor=False,
                        max_new_tokens=8)  # fmt: skip
    r = result["after_retuned"]
    assert r["tuning"]["threshold"] == pytest.approx(threshold) and r["tuning"]["questions"] == len(held_out)
    assert r["micro"]["f1"] == pytest.approx(_micro_f1(retuned, records, test_q))
    per_retuned = {}
    for line in (tmp_path / "seq/selection-after-retuned.jsonl").read_text().splitlines():
        row = json.loads(line)
        s, rel = set(row["selected"]), set(row["relevant_ids"])
        if rel:
            per_retuned[row["question_id"]] = 2 * len(s & rel) / (len(s) + len(rel))
    assert result["f1_change_retuned"]["diff"] == pytest.approx(
        sum(per_retuned[q] - per[q]["before"] for q in per_retuned) / len(per_retuned)
    )
    # a rerun reads the tuning back (tuning-after-retuned.json) instead of scoring the held-out questions again
    import clinqa.records.train as train_mod

    def no_tuning(*a, **k):
        raise AssertionError("tuned again")

    monkeypatch.setattr(train_mod, "tune_threshold", no_tuning)
    again = forgetting(tiny_predictor, records, test_q, tmp_path / "seq", tune_records=records, with_meteor=False,
                       max_new_tokens=8)  # fmt: skip
    assert again["after_retuned"] == json.loads(json.dumps(r))
    # files written when an adapter view's spec was the base model's (its weights hash told the adapter)
    # resume too: their settings rewritten as they were then, the rerun selects, answers and tunes nothing
    from clinqa.adapt.lora_adapter import weights_hash
    from clinqa.records import pipeline
    from clinqa.runs import digest

    def as_before(file, described, adapter):
        old = digest({**described, "model": "tiny", "adapter": weights_hash(adapter)})
        rows = [json.loads(line) for line in file.read_text().splitlines()]
        file.write_text("".join(json.dumps({**row, "settings": old}) + "\n" for row in rows))

    selector_then = LLMSelector(
        with_adapter(tiny_predictor, stages["stage2"]), threshold=stages["threshold"]
    ).describe()
    as_before(tmp_path / "seq/selection-after.jsonl", selector_then, stages["stage2"])
    as_before(tmp_path / "seq/answers-after.jsonl", {"max_new_tokens": 8, "meteor": False}, rev["stage1_after_stage2"])
    tuned_file = tmp_path / "seq/tuning-after-retuned.json"
    tuned = json.loads(tuned_file.read_text())
    tuned_file.write_text(json.dumps({**tuned, "selector": {**tuned["selector"], "model": "tiny"}}))

    def computed_again(*a, **k):
        raise AssertionError("selected or answered again")

    for name in ("run_scored", "select"):
        monkeypatch.setattr(LLMSelector, name, computed_again)
    monkeypatch.setattr(pipeline, "answer", computed_again)
    resumed = forgetting(tiny_predictor, records, test_q, tmp_path / "seq", tune_records=records, with_meteor=False,
                         max_new_tokens=8)  # fmt: skip
    assert resumed["after"] == again["after"] and resumed["reverse"] == again["reverse"]
    with pytest.raises(ClinqaError, match="needs --mode sequential"):
        sep = finetune_stages(tiny_predictor, records, questions, tmp_path / "sep1", tiny_config(tune_fraction=0.0))
        assert sep["threshold"] == 0.5
        forgetting(tiny_predictor, records, test_q, tmp_path / "sep1")


def test_multitask_is_one_adapter_for_both_stages(records, questions, tiny_predictor, tmp_path):
    stages = finetune_stages(
        tiny_predictor, records, questions, tmp_path / "mt", tiny_config("multitask", tune_fraction=0.0)
    )
    assert stages["stage1"] == stages["stage2"] and stages["stage1"].endswith("multitask")
    meta = json.loads((tmp_path / "mt/multitask/clinqa_adapter.json").read_text())
    assert sorted(meta["specialties"]) == ["stage1", "stage2"]
    assert meta["n_train"] + meta["n_val"] == stages["n_examples"]["stage1"] + stages["n_examples"]["stage2"]


def _ap_by_hand(selector, q, lines) -> float:
    """Average precision as its definition: over the relevant lines, the precision among the lines
    scoring at least as high as each (tied scores enter together)."""
    scores = selector.scores(q.question, lines)
    rel = [s for (rid, _), s in zip(lines, scores) if rid in q.relevant_ids]
    assert rel, "the question needs a relevant line in its record"
    precision = [
        sum(1 for x in rel if x >= s) / sum(1 for x in scores if x >= s) for s in rel
    ]  # fmt: skip
    return sum(precision) / len(rel)


def test_evaluate_selection_ranks_every_line(records, questions, tiny_predictor, tmp_path):
    """The LLM selector's rows carry the average precision of its line ranking, which needs no threshold;
    rows written before it existed are selected again, a selector without scores writes none."""
    selector = LLMSelector(tiny_predictor, threshold=0.999)
    qs = [q for q in questions if q.relevant_ids][:2]
    lines = {r.patient_id: render_record(r) for r in records}
    picked, tokens, scores = selector.run_scored(qs[0].question, lines[qs[0].patient_id])
    assert (picked, tokens) == selector.run(qs[0].question, lines[qs[0].patient_id])
    assert scores == pytest.approx(selector.scores(qs[0].question, lines[qs[0].patient_id]))
    path = tmp_path / "sel.jsonl"
    m = evaluate_selection(selector, records, qs, out=path)
    by_hand = [_ap_by_hand(selector, q, lines[q.patient_id]) for q in qs]
    assert [m["per_question"][q.id]["ap"] for q in qs] == pytest.approx(by_hand)
    assert m["mean_ap"] == pytest.approx(sum(by_hand) / 2) and m["n_ap"] == 2
    # a file from before the ranking was measured: its rows are redone, then resumed
    old = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        row.pop("ap")
        old.append(json.dumps(row))
    path.write_text("\n".join(old) + "\n")
    assert evaluate_selection(selector, records, qs, out=path)["mean_ap"] == pytest.approx(m["mean_ap"])
    assert len(path.read_text().splitlines()) == 4
    evaluate_selection(selector, records, qs, out=path)
    assert len(path.read_text().splitlines()) == 4
    from clinqa.records.selectors import RetrievalSelector

    bm25 = evaluate_selection(RetrievalSelector("bm25", top_k=3), records, qs)
    assert bm25["mean_ap"] is None and bm25["per_question"][qs[0].id]["ap"] is None


def test_evaluate_selection_matches_the_selector(records, questions, tiny_predictor, tmp_path):
    selector = LLMSelector(tiny_predictor, threshold=0.5)
    qs = questions[:2]
    m = evaluate_selection(selector, records, qs, out=tmp_path / "sel.jsonl")
    lines = {r.patient_id: render_record(r) for r in records}
    tp = fp = fn = 0
    for q in qs:
        picked = {s.id for s in selector.select(q.question, lines[q.patient_id])}
        rel = set(q.relevant_ids)
        tp, fp, fn = tp + len(picked & rel), fp + len(picked - rel), fn + len(rel - picked)
    assert (m["micro"]["tp"], m["micro"]["fp"], m["micro"]["fn"]) == (tp, fp, fn)
    # the same selector resumes from the file (nothing appended); another threshold selects again
    n_lines = len((tmp_path / "sel.jsonl").read_text().splitlines())
    assert evaluate_selection(selector, records, qs, out=tmp_path / "sel.jsonl")["micro"] == m["micro"]
    assert len((tmp_path / "sel.jsonl").read_text().splitlines()) == n_lines == 2
    strict = LLMSelector(tiny_predictor, threshold=0.999)
    m2 = evaluate_selection(strict, records, qs, out=tmp_path / "sel.jsonl")
    assert len((tmp_path / "sel.jsonl").read_text().splitlines()) == 4
    picked = [{s.id for s in strict.select(q.question, lines[q.patient_id])} for q in qs]
    assert m2["micro"]["tp"] == sum(len(p & set(q.relevant_ids)) for p, q in zip(picked, qs))
    assert m2["micro"]["fp"] == sum(len(p - set(q.relevant_ids)) for p, q in zip(picked, qs))


def test_size_sweep_writes_curves(records, questions, tiny_predictor, tmp_path):
    train_q = [q for q in questions if q.patient_id == records[0].patient_id]
    test_q = [q for q in questions if q.patient_id == records[1].patient_id][:2]
    rows = size_sweep(
        tiny_predictor,
        records,
        train_q,
        records,
        test_q,
        [4, None],
        tmp_path / "sw",
        tiny_config(tune_fraction=0.0),
        max_new_tokens=8,
    )
    assert [r["n_questions"] for r in rows] == [4, len(train_q)]
    assert rows[0]["n_examples"]["stage2"] < rows[1]["n_examples"]["stage2"]
    from clinqa.records.train import stage_models

    for r in rows:
        # each row's stage-1 F1 is the one of its own adapters' selector, computed directly
        stages = read_stages(tmp_path / f"sw/n{r['n_questions']}/adapters")
        selector = LLMSelector(stage_models(stages, tiny_predictor)[0], threshold=stages["threshold"])
        assert r["stage1_f1"] == pytest.approx(_micro_f1(selector, records, test_q)) and r["stage2"]["n"] == 2
        assert r["threshold"] == stages["threshold"] == 0.5  # no tuning questions
    saved = json.loads((tmp_path / "sw/sweep.json").read_text())
    assert saved["sizes"] == [4, len(train_q)]
    assert (tmp_path / "sw/sweep.png").stat().st_size > 1000
    assert (tmp_path / f"sw/n{len(train_q)}/run/records.jsonl").is_file()
    # each evaluation's run folder names the adapters that made it, as a `+lora:` spec would ...
    small, full = (read_stages(tmp_path / f"sw/n{n}/adapters") for n in (4, len(train_q)))
    config = json.loads((tmp_path / "sw/n4/run/run.json").read_text())["config"]
    assert config["model"] == f"tiny+lora:{small['stage2']}"
    assert config["selector"]["model"] == f"tiny+lora:{small['stage1']}"
    # ... so the other size's adapters are not taken for its own: that run folder is refused
    from clinqa.records.evaluation import evaluate_records

    stage1, stage2 = stage_models(full, tiny_predictor)
    with pytest.raises(ClinqaError, match="different config"):
        evaluate_records(stage2, records, test_q, selector=LLMSelector(stage1, threshold=0.5), out=tmp_path / "sw/n4/run",
                         max_new_tokens=8)  # fmt: skip


def test_cli_finetune_eval_and_sweep(records, questions, tokenizer, tmp_path, monkeypatch):
    """The commands a user runs, end to end, on a tiny random Llama saved as a model folder."""
    import sys

    from typer.testing import CliRunner

    from clinqa.cli import app
    from clinqa.records.questions import write_questions
    from clinqa.records.synth import write_patients

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from conftest import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_patients(tmp_path / "pts", synthesize_patients(2, seed=3, now=NOW))
    train_q = [q for q in questions if q.patient_id == records[0].patient_id]
    test_q = [q for q in questions if q.patient_id == records[1].patient_id][:2]
    write_questions(tmp_path / "train.jsonl", train_q)
    write_questions(tmp_path / "test.jsonl", test_q)
    runner = CliRunner()
    common = ["--records", str(tmp_path / "pts"), "--epochs", "1", "--rank", "4", "--max-length", "256"]
    r = runner.invoke(
        app,
        [
            "records",
            "finetune",
            str(model_dir),
            str(tmp_path / "train.jsonl"),
            *common,
            "--sequential",
            "--test",
            str(tmp_path / "test.jsonl"),
            "--out",
            str(tmp_path / "ft"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "stage-1 micro F1 on 2 test questions: before stage 2" in r.output
    assert (tmp_path / "ft/stages-sequential.json").is_file() and (tmp_path / "ft/forgetting.json").is_file()
    if json.loads((tmp_path / "ft/forgetting.json").read_text())["f1_change"]:
        assert "per-question stage-1 F1 change" in r.output
    # --adapters takes the folder or one mode's stages file (a study pins stages-separate.json)
    assert read_stages(tmp_path / "ft/stages-sequential.json") == read_stages(tmp_path / "ft")
    evaluate = ["records", "eval", str(model_dir), str(tmp_path / "test.jsonl"), "--records", str(tmp_path / "pts")]
    r = runner.invoke(
        app,
        [
            *evaluate,
            "--adapters",
            str(tmp_path / "ft"),
            "--max-new-tokens",
            "8",
            "--no-meteor",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    stages = json.loads((tmp_path / "ft/stages.json").read_text())
    assert summary["selector"]["kind"] == "llm" and summary["selector"]["threshold"] == stages["threshold"]
    assert summary["model"].endswith("+lora:" + stages["stage2"]) and summary["n"] == 2
    tuned_eval = [
        *evaluate,
        "--selector",
        "llm",
        "--tune",
        str(tmp_path / "train.jsonl"),
        "--limit",
        "1",
        "--max-new-tokens",
        "4",
        "--no-meteor",
        "--out",
        str(tmp_path / "run-tuned"),
    ]
    r = runner.invoke(app, tuned_eval)
    assert r.exit_code == 0, r.output
    tuned = float(r.output.split("stage-1 threshold ")[1].split(":")[0])
    assert json.loads((tmp_path / "run-tuned/summary.json").read_text())["selector"]["threshold"] == pytest.approx(
        tuned, abs=1e-4
    )
    # a rerun reads the tuning back from the run's run.json: scoring the tuning questions again would fail
    import clinqa.records.pipeline as pipeline

    monkeypatch.setattr(pipeline, "tune_threshold", lambda *a, **k: pytest.fail("tuned again"))
    r = runner.invoke(app, tuned_eval)
    assert r.exit_code == 0, r.output
    assert "(tuned before, read from" in r.output
    assert float(r.output.split("stage-1 threshold ")[1].split(":")[0]) == pytest.approx(tuned, abs=1e-4)
    r = runner.invoke(
        app,
        [
            "records",
            "judge",
            str(tmp_path / "test.jsonl"),
            "--run",
            f"tuned={tmp_path / 'run'}",
            "--run",
            f"again={tmp_path / 'run'}",
            "--judge",
            str(model_dir),
            "--out",
            str(tmp_path / "judge"),
        ],
    )
    assert r.exit_code == 0, r.output
    judged = json.loads((tmp_path / "judge" / "report.json").read_text())
    assert set(judged["systems"]) == {"tuned", "again"} and len(judged["grades"]["blind"]) == 4
    # the two systems gave the same answers: both orders of a pair are the same prompt, so each of the
    # 2 pairs gets the same slot twice, which counts as following the position
    pb = judged["position_bias"]
    assert (pb["pairs"], pb["follows_position"], pb["unparseable"]) == (2, 2, 0)
    assert "position bias: 2 of 2 pairs" in r.output and "self-preference" in r.output
    r = runner.invoke(
        app, ["records", "judge", str(tmp_path / "test.jsonl"), "--run", "nofolder", "--judge", str(model_dir)]
    )
    assert isinstance(r.exception, ClinqaError) and "NAME=RUN_FOLDER" in str(r.exception)
    r = runner.invoke(
        app,
        [
            "records",
            "sweep",
            str(model_dir),
            str(tmp_path / "train.jsonl"),
            str(tmp_path / "test.jsonl"),
            *common,
            "--sizes",
            "3,full",
            "--max-new-tokens",
            "8",
            "--out",
            str(tmp_path / "sw"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "sweep.json" in r.output and (tmp_path / "sw/sweep.png").is_file()
    assert json.loads((tmp_path / "sw/sweep.json").read_text())["sizes"] == [3, len(train_q)]
    r = runner.invoke(
        app, ["records", "sweep", str(model_dir), "a", "b", "--records", "x", "--sizes", "ten", "--out", "y"]
    )
    assert isinstance(r.exception, ClinqaError) and "--sizes 'ten'" in str(r.exception)


def test_evaluate_answering_answers_again_for_other_settings(records, questions, tiny_predictor, tmp_path, monkeypatch):
    calls = []
    generate = tiny_predictor.generate
    monkeypatch.setattr(
        tiny_predictor, "generate", lambda prompts, config=None: calls.append(len(prompts)) or generate(prompts, config)
    )
    qs = [q for q in questions if q.relevant_ids][:2]
    out = tmp_path / "answers.jsonl"
    first = evaluate_answering(tiny_predictor, records, qs, out=out, max_new_tokens=4, with_meteor=False)
    assert sum(calls) == 2
    again = evaluate_answering(tiny_predictor, records, qs, out=out, max_new_tokens=4, with_meteor=False)
    assert sum(calls) == 2 and again == json.loads(json.dumps(first))  # resumed: no model call
    # another max_new_tokens is another answer: both questions are answered again
    evaluate_answering(tiny_predictor, records, qs, out=out, max_new_tokens=6, with_meteor=False)
    assert sum(calls) == 4 and len(out.read_text().splitlines()) == 4
