"""What a steering hook costs: generation and option scoring on the embedded model, with and without it.

One process, one model. Conditions are interleaved (the order rotates every repeat) so drift in
machine load hits all of them alike; we report medians, and the overhead relative to the plain
model three ways: ratio of medians, median of per-repeat ratios (paired), ratio of minima.

    plain      the LocalModel itself
    steer a=0  SteeredPredictor with alpha 0: hooks run and add zero, outputs are identical to plain,
               so this isolates the hook's cost (same tokens generated)
    steer a=1  alpha 1: the real thing (generation may then stop at a different length; we report tokens)

    python benchmarks/steer_overhead.py [--prompts 20] [--new-tokens 32] [--questions 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", default="", help="comma-separated steering layers (default: the penultimate one)")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = ap.parse_args()

    from clinqa.adapt.control import SteeredPredictor
    from clinqa.adapt.steering import SteeringConfig, build_steering_vector
    from clinqa.data.loaders import load_questions
    from clinqa.evaluate.methods import make_items, score_option
    from clinqa.evaluate.prompts import generate_prompt
    from clinqa.models import load_base_model
    from clinqa.models.base import GenerationConfig

    model = load_base_model("default")
    questions = load_questions("bundled").questions
    layers = [int(x) for x in args.layers.split(",") if x] or None
    t = time.perf_counter()
    vector = build_steering_vector(model, questions[:16], SteeringConfig(layers=layers), name="bench")
    build_s = time.perf_counter() - t
    conditions = {
        "plain": model,
        "steer a=0": SteeredPredictor(model, vector, alpha=0.0),
        "steer a=1": SteeredPredictor(model, vector, alpha=1.0),
    }
    prompts = [generate_prompt(q, q.options) for q in questions[: args.prompts]]
    gen_cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    items = make_items(questions[: args.questions], shuffles=1, seed=0)

    def run_generate(p):
        return sum(len(model.encode(text)) for text in p.generate(prompts, gen_cfg))

    def run_score(p):
        return sum(s.correct for s in score_option(p, items))

    tasks = {"generate": run_generate, "option": run_score}
    for fn in tasks.values():  # warm-up
        fn(model)
    times = {task: {c: [] for c in conditions} for task in tasks}
    outputs = {task: {} for task in tasks}
    names = list(conditions)
    load0 = os.getloadavg()[0]
    for r in range(args.repeats):
        for task, fn in tasks.items():
            for c in names[r % len(names) :] + names[: r % len(names)]:
                t = time.perf_counter()
                outputs[task][c] = fn(conditions[c])
                times[task][c].append(time.perf_counter() - t)
    load1 = os.getloadavg()[0]

    print(
        f"machine: {machine()}; load average {load0:.1f} -> {load1:.1f}; steering layers {vector.layers}; "
        f"vector built from 16 questions in {build_s:.1f} s"
    )
    result = {
        "machine": machine(),
        "layers": vector.layers,
        "repeats": args.repeats,
        "load": [load0, load1],
        "tasks": {},
    }
    for task in tasks:
        base = statistics.median(times[task]["plain"])
        what = (
            f"{len(prompts)} prompts x {args.new_tokens} new tokens"
            if task == "generate"
            else f"{len(items)} questions, option method"
        )
        print(
            f"\n[{task}] {what} ({'generated tokens' if task == 'generate' else 'correct'} per condition: {outputs[task]})"
        )
        result["tasks"][task] = {}
        for c in names:
            ts = times[task][c]
            med = statistics.median(ts)
            over = 100 * (med / base - 1)
            # each repeat runs the conditions back to back: their ratio is robust to slow load drift
            paired = 100 * (statistics.median(t / p for t, p in zip(ts, times[task]["plain"])) - 1)
            print(
                f"  {c:10s} median {med:7.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})"
                + (
                    ""
                    if c == "plain"
                    else f"  overhead: medians {over:+.1f}%, paired {paired:+.1f}%, "
                    f"minima {100 * (min(ts) / min(times[task]['plain']) - 1):+.1f}%"
                )
            )
            result["tasks"][task][c] = {
                "median_s": med,
                "all_s": ts,
                "overhead_pct": over,
                "paired_overhead_pct": paired,
                "output": outputs[task][c],
            }
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
