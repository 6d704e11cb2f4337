"""clinqa's `letter` and `option` methods vs lm-evaluation-harness's HF backend, same model, same questions.

Each system runs as a whole process (model load included), one after the other in this invocation,
and we compare questions/second and per-question predictions (they must be identical). Inside the
clinqa process we also time the scoring loop alone and relate its tokens/second to this machine's
fp32 matmul peak (tokens/s x FLOPs per token / peak FLOP/s).

    python benchmarks/mcq_speed.py [--pubmedqa N] [--lm-eval-batch 16]

Needs the bench extra (`pip install -e '.[bench]'`, or `make bench`). Data: the bundled clinical
and control questions, plus the first N PubMedQA questions from ../shared when present (long
abstracts: a realistic prompt length).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PUBMEDQA, machine, matmul_peak_gflops, peak_rss_mb, write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_questions(n_pubmedqa: int):
    from clinqa.data.loaders import load_questions

    qs = load_questions("bundled").questions + load_questions("bundled:control").questions
    if n_pubmedqa and PUBMEDQA.exists():
        qs += load_questions(PUBMEDQA).questions[:n_pubmedqa]
    return qs


def task_rows(questions, task: str):
    from clinqa.evaluate import prompts

    rows = []
    for q in questions:
        if task == "letter":
            rows.append(
                {
                    "id": q.id,
                    "prompt": prompts.letter_prompt(q, q.options),
                    "choices": list(q.options),
                    "gold": q.answer_index,
                }
            )
        else:
            rows.append(
                {
                    "id": q.id,
                    "prompt": prompts.cloze_prompt(q),
                    "choices": list(q.options.values()),
                    "gold": q.answer_index,
                }
            )
    return rows


# -- workers (each runs in its own process) ----------------------------------------------------------
def worker_clinqa(task: str, qfile: Path, out: Path) -> None:
    t0 = time.perf_counter()
    from clinqa.data.schema import Question
    from clinqa.evaluate.methods import make_items, score_letter, score_option
    from clinqa.models import load_base_model

    pred = load_base_model("default")
    questions = [Question.model_validate_json(line) for line in qfile.read_text().split("\n") if line]
    items = make_items(questions, 1, 0)
    t1 = time.perf_counter()
    samples = (score_letter if task == "letter" else score_option)(pred, items)
    t2 = time.perf_counter()
    from clinqa.evaluate import prompts

    if task == "letter":
        n_tokens = sum(len(pred.encode(prompts.letter_prompt(q, q.options))) for q in questions)
    else:  # tokens actually run: the context once plus every continuation but its last token
        n_tokens = 0
        for q in questions:
            ctx = prompts.cloze_prompt(q)
            pairs = [pred.encode_pair(ctx, " " + v) for v in q.options.values()]
            n_tokens += len(pairs[0][0]) + sum(len(c) - 1 for _, c in pairs)
    cfg = pred.model.config
    non_embedding = pred.info.n_params - cfg.vocab_size * cfg.hidden_size
    preds = {s.question_id: {"norm": s.pred, "sum": s.extras.get("pred_sum", s.pred)} for s in samples}
    write_json(
        out,
        {
            "preds": preds,
            "score_s": t2 - t1,
            "setup_s": t1 - t0,
            "tokens": n_tokens,
            "flops_per_token": 2 * non_embedding,
            "peak_rss_mb": peak_rss_mb(),
            "acc": sum(s.correct for s in samples) / len(samples),
        },
    )


def worker_lmeval(task: str, rows_file: Path, model_dir: str, batch: int, out: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tmp = Path(tempfile.mkdtemp())
    (tmp / "clinqa_bench.yaml").write_text(
        textwrap.dedent(f"""\
        task: clinqa_bench_{task}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {rows_file}
        test_split: test
        output_type: multiple_choice
        doc_to_text: prompt
        doc_to_choice: choices
        doc_to_target: gold
        metric_list:
          - metric: acc
          - metric: acc_norm
        """)
    )
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=[f"clinqa_bench_{task}"],
        task_manager=TaskManager(include_path=str(tmp)),
        batch_size=batch,
        device="cpu",
        log_samples=True,
    )
    docs = res["samples"][f"clinqa_bench_{task}"]
    preds = {}
    for d in docs:
        lls = [r[0] for r in d["filtered_resps"]]
        lens = [len(c) for c in d["doc"]["choices"]]
        letters = "ABCDEFGH"
        preds[d["doc"]["id"]] = {
            "sum": letters[max(range(len(lls)), key=lambda i: lls[i])],
            "norm": letters[max(range(len(lls)), key=lambda i: lls[i] / lens[i])],
        }
    write_json(
        out,
        {"preds": preds, "peak_rss_mb": peak_rss_mb(), "acc": res["results"][f"clinqa_bench_{task}"].get("acc,none")},
    )


# -- orchestration --------------------------------------------------------------------------------------
def run_process(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pubmedqa", type=int, default=300, help="PubMedQA questions to add from ../shared (0 = none)")
    ap.add_argument("--lm-eval-batch", type=int, default=16)
    ap.add_argument("--tasks", default="letter,option")
    ap.add_argument("--worker", choices=["clinqa", "lmeval"], help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "clinqa":
        return worker_clinqa(args.task, args.input, args.out)
    if args.worker == "lmeval":
        return worker_lmeval(args.task, args.input, args.model_dir, args.lm_eval_batch, args.out)

    from clinqa.models.embedded import embedded_model_dir

    model_dir = str(embedded_model_dir())  # convert once, outside the timings
    questions = build_questions(args.pubmedqa)
    tmp = Path(tempfile.mkdtemp(prefix="clinqa-bench-"))
    qfile = tmp / "questions.jsonl"
    qfile.write_text("".join(q.model_dump_json() + "\n" for q in questions))
    peak = matmul_peak_gflops()
    print(f"machine: {machine()}; fp32 matmul peak {peak:.0f} GFLOP/s; {len(questions)} questions")
    for task in args.tasks.split(","):
        rows = tmp / f"{task}.jsonl"
        rows.write_text("".join(json.dumps(r) + "\n" for r in task_rows(questions, task)))
        ours_out, theirs_out = tmp / f"clinqa-{task}.json", tmp / f"lmeval-{task}.json"
        t_ours = run_process(["--worker", "clinqa", "--task", task, "--input", str(qfile), "--out", str(ours_out)])
        t_theirs = run_process(
            [
                "--worker",
                "lmeval",
                "--task",
                task,
                "--input",
                str(rows),
                "--model-dir",
                model_dir,
                "--out",
                str(theirs_out),
                "--lm-eval-batch",
                str(args.lm_eval_batch),
            ]
        )
        ours, theirs = json.loads(ours_out.read_text()), json.loads(theirs_out.read_text())
        key = "sum" if task == "letter" else "norm"
        n = len(questions)
        same = {k: sum(ours["preds"][q][k] == theirs["preds"][q][k] for q in ours["preds"]) for k in ("sum", "norm")}
        gold = {q.id: q.answer for q in questions}
        acc = {
            name: sum(r["preds"][q][key] == gold[q] for q in gold) / n
            for name, r in (("clinqa", ours), ("lm-eval", theirs))
        }
        tok_s = ours["tokens"] / ours["score_s"]
        share = tok_s * ours["flops_per_token"] / (peak * 1e9)
        print(
            f"\n[{task}] whole process: clinqa {n / t_ours:.2f} q/s ({t_ours:.1f} s), lm-eval {n / t_theirs:.2f} q/s "
            f"({t_theirs:.1f} s, batch {args.lm_eval_batch}) -> ratio {t_theirs / t_ours:.2f}x"
        )
        print(
            f"[{task}] clinqa scoring loop: {n / ours['score_s']:.2f} q/s, {tok_s:.0f} tokens/s = {100 * share:.0f}% of matmul peak "
            f"({ours['flops_per_token'] / 1e6:.0f} MFLOP/token); setup {ours['setup_s']:.1f} s"
        )
        print(
            f"[{task}] identical predictions: {same[key]}/{n} ({'acc' if key == 'sum' else 'acc_norm'}); "
            f"other variant {same['norm' if key == 'sum' else 'sum']}/{n}; accuracy clinqa {acc['clinqa']:.3f} lm-eval {acc['lm-eval']:.3f}"
        )
        print(f"[{task}] peak memory: clinqa {ours['peak_rss_mb']:.0f} MB, lm-eval {theirs['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
