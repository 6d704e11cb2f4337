"""Two-stage record QA vs the full-record baseline on the largest real Synthea bundle, with the
embedded model (SmolLM2-135M-Instruct): questions/second and LLM tokens processed per question, and
stage-1 (question, line) pairs/second for the LLM selector.

Record: the largest bundle in ../shared/data/fhir/synthea-r4 (by file size). Questions: made by
`generate_questions` (as of the day after the record's last resource), round-robin over question
types, first --questions of them. Systems:

- two-stage: BM25 selector, top 8 lines -> answer from those lines (`answer_question`);
- full: every line, truncated to the model's 8k window by tokens (`FullRecordBaseline`);
- LLM selector: P(yes) for --pairs (question, line) pairs (one question against the record's first
  lines), batched in one call; pairs/second and tokens/pair, the implied seconds for one question
  over the whole record, and the speed-up from sharing the question prefix (KV cache) over running
  every pair's whole prompt, interleaved in the same process.

    python benchmarks/records.py [--questions 6] [--pairs 256] [--repeats 2] [--max-new-tokens 128] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SYNTHEA, machine, peak_rss_mb, write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pick_questions(questions, n):
    by_type: dict[str, list] = {}
    for q in questions:
        by_type.setdefault(q.qtype, []).append(q)
    out = []
    while len(out) < n and any(by_type.values()):
        for qs in by_type.values():
            if qs and len(out) < n:
                out.append(qs.pop(0))
    return out


def run_system(model, record, lines, questions, selector, max_new_tokens):
    from clinqa.records.metrics import exact_match
    from clinqa.records.pipeline import answer_question

    rows = []
    t0 = time.perf_counter()
    for q in questions:
        res = answer_question(model, record, q, selector=selector, max_new_tokens=max_new_tokens, lines=lines)
        rows.append({"qtype": q.qtype, "tokens": res.tokens, "seconds": res.timings["total"], "context_lines": len(res.context_ids),
                     "exact_match": exact_match(q, res.answer), "answer": res.answer[:160], "citations": len(res.citations)})  # fmt: skip
    wall = time.perf_counter() - t0
    em = [r["exact_match"] for r in rows if r["exact_match"] is not None]
    return {
        "questions": len(rows),
        "seconds": wall,
        "questions_per_second": len(rows) / wall,
        "tokens_per_question": sum(r["tokens"] for r in rows) / len(rows),
        "context_lines_per_question": sum(r["context_lines"] for r in rows) / len(rows),
        "exact_match": sum(map(bool, em)) / len(em) if em else None,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=256, help="(question, line) pairs for the LLM-selector timing")
    ap.add_argument(
        "--repeats", type=int, default=2, help="interleaved repeats of the shared vs unshared selector timing"
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own; 1 helps on a busy machine)"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from clinqa.adapt import load_predictor
    from clinqa.records import generate_questions, load_bundle, render_record
    from clinqa.records.pipeline import FullRecordBaseline, LLMSelector, RetrievalSelector, context_window, count_tokens

    bundles = sorted(SYNTHEA.glob("*.json"), key=lambda p: p.stat().st_size, reverse=True)
    if not bundles:
        sys.exit(f"no Synthea bundles in {SYNTHEA}")
    path = bundles[0]
    t = time.perf_counter()
    record = load_bundle(path, lenient=True)
    lines = render_record(record)
    load_s = time.perf_counter() - t
    model = load_predictor("default")
    record_tokens = sum(count_tokens(model, [t for _, t in lines]))
    questions = pick_questions(generate_questions(record, now=None, seed=0, per_type=2), args.questions)
    import torch

    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
    print(f"record: {path.name}: {len(lines)} resources, {record_tokens} tokens rendered (window {context_window(model)}), "
          f"loaded+rendered in {load_s:.2f} s")  # fmt: skip
    print(
        f"questions: {len(questions)} ({', '.join(q.qtype for q in questions)}); max_new_tokens={args.max_new_tokens}"
    )

    results = {}
    for name, selector in [
        ("two_stage_bm25_top8", RetrievalSelector("bm25", top_k=8)),
        ("full_record", FullRecordBaseline()),
    ]:
        r = run_system(model, record, lines, questions, selector, args.max_new_tokens)
        results[name] = r
        print(f"{name:>20}: {r['questions_per_second']:.4f} q/s ({r['seconds'] / r['questions']:.1f} s/q), "
              f"{r['tokens_per_question']:.0f} tokens/q, {r['context_lines_per_question']:.1f} lines/q, "
              f"exact match {r['exact_match']}")  # fmt: skip

    q0 = questions[0].question
    sample = lines[: args.pairs]

    class Unshared:  # the same model without the shared-prefix path: every pair runs its whole prompt
        def __init__(self, m):
            self.info, self.tokenizer, self.next_token_logprobs = m.info, m.tokenizer, m.next_token_logprobs

    timings: dict[str, list[float]] = {"shared": [], "unshared": []}
    for _ in range(args.repeats):  # interleaved, best of each: the machine is noisy
        for name, pred in (("shared", model), ("unshared", Unshared(model))):
            t = time.perf_counter()
            _, tokens = LLMSelector(pred).run(q0, sample)
            timings[name].append(time.perf_counter() - t)
    s = min(timings["shared"])
    pairs_per_s = len(sample) / s
    llm = {"pairs": len(sample), "seconds": s, "pairs_per_second": pairs_per_s, "tokens_per_pair": tokens / len(sample),
           "seconds_per_question_whole_record": len(lines) / pairs_per_s, "timings": timings,
           "shared_prefix_speedup": min(timings["unshared"]) / s}  # fmt: skip
    print(f"{'llm_selector':>20}: {pairs_per_s:.1f} pairs/s ({tokens / len(sample):.0f} tokens/pair); one question over all "
          f"{len(lines)} lines = {len(lines) / pairs_per_s:.0f} s; sharing the question prefix is "
          f"{llm['shared_prefix_speedup']:.2f}x the unshared path (best of {args.repeats})")  # fmt: skip

    two, full = results["two_stage_bm25_top8"], results["full_record"]
    ratios = {
        "speedup_two_stage_vs_full": two["questions_per_second"] / full["questions_per_second"],
        "token_ratio_full_vs_two_stage": full["tokens_per_question"] / two["tokens_per_question"]
        if two["tokens_per_question"]
        else None,
        "llm_selection_vs_full_seconds_per_question": llm["seconds_per_question_whole_record"]
        / (full["seconds"] / full["questions"]),
    }
    print(f"ratios: two-stage is {ratios['speedup_two_stage_vs_full']:.1f}x faster than full record and processes "
          f"{ratios['token_ratio_full_vs_two_stage'] or float('nan'):.1f}x fewer tokens; LLM selection over the whole record "
          f"costs {ratios['llm_selection_vs_full_seconds_per_question']:.1f}x a full-record answer")  # fmt: skip
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    if args.json:
        write_json(args.json, {"record": path.name, "resources": len(lines), "record_tokens": record_tokens,
                               "machine": machine(), "systems": results, "llm_selector": llm, "ratios": ratios})  # fmt: skip


if __name__ == "__main__":
    main()
