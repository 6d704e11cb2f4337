"""Scoring methods, shuffling, answer extraction and resumable runs on a tiny random Llama."""

import json

import numpy as np
import pytest

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate import EvalConfig, Run, evaluate, prompts, shuffle
from clinqa.evaluate.extract import extract_answer
from clinqa.evaluate.methods import make_items, score_letter, score_option


def questions(n=6):
    out = []
    for i in range(n):
        out.append(
            Question(
                id=f"q{i}",
                question=f"Which option is number {i}?",
                options={"A": f"alpha {i}", "B": f"bravo {i}", "C": f"charlie {i}", "D": f"delta {i}"},
                answer="ABCD"[i % 4],
                specialties=["cardiology"] if i % 2 else ["neurology", "pediatrics"],
                source="t",
                meta={"harmful_options": ["ABCD"[(i + 1) % 4]]},
            )
        )
    return out


def test_shuffle_letter_follows_its_option():
    q = questions()[1]
    for k in range(5):
        perm = shuffle.permutation(q.id, k, 4, seed=3)
        shown, gold, to_orig = shuffle.apply(q, perm)
        assert shown[gold] == q.options[q.answer]
        assert sorted(shown.values()) == sorted(q.options.values())
        assert all(shown[s] == q.options[o] for s, o in to_orig.items())
    assert shuffle.permutation(q.id, 0, 4, 3) == [0, 1, 2, 3]
    assert shuffle.permutation(q.id, 2, 4, 3) == shuffle.permutation(q.id, 2, 4, 3)


def test_letter_method_uses_next_token_scores(tiny_predictor):
    items = make_items(questions(), shuffles=2, seed=0)
    samples = score_letter(tiny_predictor, items)
    for it, s in zip(items, samples):
        lp = tiny_predictor.next_token_logprobs(
            [prompts.letter_prompt(it.question, it.options)], [" A", " B", " C", " D"]
        )[0]
        assert s.pred == "ABCD"[int(np.argmax(lp))]
        assert s.scores["A"] == pytest.approx(lp[0], abs=1e-4)
        assert sum(s.probs.values()) == pytest.approx(1.0)
        assert s.gold == it.gold and s.correct == (s.pred == it.gold)
        # harmful option mapped to the letter it is shown under
        orig = it.question.meta["harmful_options"][0]
        shown = [k for k, v in it.to_original.items() if v == orig]
        assert s.extras["harmful_options"] == shown


def test_option_method_sum_and_norm(tiny_predictor):
    from clinqa.models import loglikelihood

    items = make_items(questions(), shuffles=1, seed=0)
    samples = score_option(tiny_predictor, items)
    for it, s in zip(items, samples):
        ctx = prompts.cloze_prompt(it.question)
        direct = [x.logprob for x in loglikelihood(tiny_predictor, [(ctx, " " + v) for v in it.options.values()])]
        assert s.extras["pred_sum"] == "ABCD"[int(np.argmax(direct))]
        norm = [d / len(v) for d, v in zip(direct, it.options.values())]
        assert s.pred == "ABCD"[int(np.argmax(norm))]
        # confidence comes from the prediction's rule: softmax of the normalised scores; the sum rule's kept apart
        e = np.exp(np.array(norm) - max(norm))
        assert [s.probs[k] for k in "ABCD"] == pytest.approx(list(e / e.sum()), abs=1e-4)
        assert max(s.probs, key=s.probs.get) == s.pred
        e = np.exp(np.array(direct) - max(direct))
        assert [s.extras["probs_sum"][k] for k in "ABCD"] == pytest.approx(list(e / e.sum()), abs=1e-4)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Answer: C", ("C", "pattern")),
        ("The answer is (B) because ...", ("B", "pattern")),
        ("B. Naloxone", ("B", "pattern")),
        ("I think it is naloxone.", ("B", "text")),
        ("Let me think. A is wrong, D is wrong. Answer: C", ("C", "pattern")),
        ("No idea", (None, "unparseable")),
        ("Either A or B", (None, "unparseable")),
        ("Maybe (A), maybe (B)", (None, "ambiguous")),
        ("flumazenil or naloxone", (None, "ambiguous")),
    ],
)
def test_extract_answer(text, expected):
    opts = {"A": "Flumazenil", "B": "Naloxone", "C": "Atropine", "D": "Glucagon"}
    assert extract_answer(text, opts) == expected


def test_run_resumes_without_recomputing(tiny_predictor, tmp_path):
    qs = questions(6)
    cfg = EvalConfig(model="tiny", data="test", method="letter", shuffles=2)
    calls = []
    real = tiny_predictor.next_token_logprobs

    def counting(contexts, candidates):
        calls.append(len(contexts))
        return real(contexts, candidates)

    tiny_predictor.next_token_logprobs = counting
    # simulate a kill after the first batch: score only the first 2 questions' items
    run = evaluate(tiny_predictor, qs[:2], cfg, tmp_path / "run", batch_size=4)
    first = {s.key: s for s in run.samples()}
    assert len(first) == 4 and sum(calls) == 4
    calls.clear()
    run = evaluate(tiny_predictor, qs, cfg, tmp_path / "run", batch_size=4)
    assert sum(calls) == 8  # only the 4 new questions x 2 shuffles
    samples = run.samples()
    assert len(samples) == 12 and len({s.key for s in samples}) == 12
    assert all(first[s.key] == s for s in samples if s.key in first)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["config"]["method"] == "letter" and meta["counts"]["samples"] == 12
    assert "torch" in meta["versions"]


def test_same_seed_same_results(tiny_predictor, tmp_path):
    cfg = EvalConfig(model="tiny", data="test", method="option", shuffles=3, seed=7)
    a = evaluate(tiny_predictor, questions(), cfg, tmp_path / "a").samples()
    b = evaluate(tiny_predictor, questions(), cfg, tmp_path / "b").samples()
    assert [(s.key, s.pred, s.permutation) for s in a] == [(s.key, s.pred, s.permutation) for s in b]


def test_torn_last_line_is_repaired(tiny_predictor, tmp_path):
    cfg = EvalConfig(model="tiny", data="test", method="letter")
    run = evaluate(tiny_predictor, questions(3), cfg, tmp_path / "r")
    f = tmp_path / "r" / "samples.jsonl"
    f.write_bytes(f.read_bytes() + b'{"question_id": "q9", "shuf')
    assert len(Run.load(tmp_path / "r").samples()) == 3
    run = evaluate(tiny_predictor, questions(4), cfg, tmp_path / "r")
    assert len(run.samples()) == 4


def test_different_config_is_refused_and_nothing_written(tiny_predictor, tmp_path):
    evaluate(tiny_predictor, questions(2), EvalConfig(model="tiny", data="test", method="letter"), tmp_path / "r")
    before = (tmp_path / "r" / "samples.jsonl").read_bytes()
    with pytest.raises(ClinqaError, match=r"different config \(method: 'letter' -> 'option'\)"):
        evaluate(tiny_predictor, questions(2), EvalConfig(model="tiny", data="test", method="option"), tmp_path / "r")
    assert (tmp_path / "r" / "samples.jsonl").read_bytes() == before


def test_unknown_method(tiny_predictor, tmp_path):
    with pytest.raises(ClinqaError, match="unknown method 'vote'"):
        evaluate(tiny_predictor, questions(1), EvalConfig(model="t", data="t", method="vote"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_report_writes_markdown_and_plots(tiny_predictor, tmp_path):
    from clinqa.evaluate.report import write_report

    cfg = EvalConfig(model="tiny", data="test", method="option", shuffles=2)
    evaluate(tiny_predictor, questions(8), cfg, tmp_path / "a")
    evaluate(
        tiny_predictor, questions(8), EvalConfig(model="tiny", data="test", method="letter", shuffles=2), tmp_path / "b"
    )
    res = write_report([tmp_path / "a", tmp_path / "b"])
    text = (tmp_path / "a" / "report.md").read_text()
    assert "| cardiology |" in text and "| pediatrics |" in text and "Paired comparison" in text
    assert (tmp_path / "a" / "specialties.png").stat().st_size > 1000
    assert (tmp_path / "a" / "reliability.png").stat().st_size > 1000
    s = res["summary"]
    assert s["n_questions"] == 8 and s["n_samples"] == 16
    assert s["by_specialty"]["cardiology"]["n"] == 8  # 4 questions x 2 shuffles
    assert s["overall"]["chance"] == pytest.approx(0.25)
    # the headline numbers recomputed from the run folder's samples.jsonl
    rows = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert s["overall"]["acc"] == pytest.approx(sum(r["correct"] for r in rows) / 16)
    assert s["overall_sum"]["acc"] == pytest.approx(sum(r["extras"]["correct_sum"] for r in rows) / 16)
    harmful = [r["pred"] in r["extras"]["harmful_options"] for r in rows]
    assert (s["unsafe_choice"]["events"], s["unsafe_choice"]["n"]) == (sum(harmful), 16)
    b_rows = {
        (r["question_id"], r["shuffle"]): r["correct"]
        for r in (json.loads(x) for x in (tmp_path / "b" / "samples.jsonl").read_text().splitlines())
    }
    assert res["paired"].diff == pytest.approx(sum(b_rows.values()) / 16 - sum(r["correct"] for r in rows) / 16)
