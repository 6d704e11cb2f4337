"""Accuracy of the answer matchers of `--method generate` on the bundled labelled set, the way S-MedQA
reports its answer classifier: accuracy, a 95% interval, n.

    python benchmarks/matcher_accuracy.py [--model default] [--no-loglik] [--out runs/bench-matcher.json]

The set (src/clinqa/data/bundled/matcher_answers.jsonl, written by benchmarks/make_matcher_answers.py)
holds generated answers to bundled questions with the option each commits to, or null when it commits
to none. A matcher is right on an answer when its option equals the label, or when both are null
(an answer the matcher refuses to map is unparseable in a run, which is right for a refusal and
wrong for a paraphrase). Reported per matcher: accuracy with a Wilson interval, accuracy on the
answers that commit to an option and on those that do not, per style, and the difference from the
regex matcher (the baseline, run in the same invocation) with an exact McNemar test on the same answers.
The loglik matcher scores options with the answering model (--model; the embedded SmolLM2-135M by
default, which did not write these answers, so it is a proxy for "the model's own").
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # noqa: E402


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    from clinqa.records.judge_report import wilson as w

    return w(k, n, z)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="model spec for the loglik matcher")
    ap.add_argument("--no-loglik", action="store_true", help="skip the loglik matcher (no language model)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures and every decision as JSON here")
    args = ap.parse_args()

    from scipy.stats import binomtest

    from clinqa.data.bundled import bundled_dir
    from clinqa.data.loaders import load_questions
    from clinqa.evaluate.matcher import match_answers
    from clinqa.evaluate.prompts import generate_prompt

    rows = [
        json.loads(line) for line in (bundled_dir() / "matcher_answers.jsonl").read_text().splitlines() if line.strip()
    ]
    questions = {q.id: q for q in load_questions("bundled:clinical").questions}
    options = [questions[r["question_id"]].options for r in rows]
    texts = [r["answer"] for r in rows]
    prompts = [generate_prompt(questions[r["question_id"]], questions[r["question_id"]].options) for r in rows]
    matchers = ["regex", "minilm"] + ([] if args.no_loglik else ["loglik"])
    predictor = None
    if not args.no_loglik:
        from clinqa.adapt import load_predictor

        predictor = load_predictor(args.model)
    print(
        f"{len(rows)} labelled answers to {len(set(r['question_id'] for r in rows))} bundled questions; "
        f"{sum(r['gold'] is None for r in rows)} commit to no option; {machine()}"
    )
    results, decisions = {}, {}
    for name in matchers:
        t = time.perf_counter()
        found = match_answers(texts, options, name, predictor=predictor, prompts=prompts)
        secs = time.perf_counter() - t
        ok = [m.pred == r["gold"] for m, r in zip(found, rows)]
        decisions[name] = [
            {"id": r["id"], "pred": m.pred, "rule": m.rule, "right": o} for m, r, o in zip(found, rows, ok)
        ]
        k, n = sum(ok), len(ok)
        committed = [o for o, r in zip(ok, rows) if r["gold"] is not None]
        none = [o for o, r in zip(ok, rows) if r["gold"] is None]
        styles = collections.defaultdict(list)
        for o, r in zip(ok, rows):
            styles[r["style"]].append(o)
        results[name] = {"n": n, "right": k, "accuracy": k / n, "ci": wilson(k, n), "seconds": secs,
                         "committed": {"n": len(committed), "accuracy": sum(committed) / len(committed)},
                         "no_option": {"n": len(none), "accuracy": sum(none) / len(none)},
                         "styles": {s: {"n": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(styles.items())},
                         "rules": dict(collections.Counter(m.rule for m in found))}  # fmt: skip
    base = [d["right"] for d in decisions["regex"]]
    print(
        f"\n{'matcher':8} {'accuracy':>9} {'95% CI':>15} {'n':>4}  {'commits':>8} {'no option':>9}  vs regex (McNemar)       time"
    )
    for name, r in results.items():
        mine = [d["right"] for d in decisions[name]]
        b = sum(x and not y for x, y in zip(base, mine))
        c = sum(y and not x for x, y in zip(base, mine))
        p = binomtest(b, b + c).pvalue if b + c else 1.0
        r["vs_regex"] = {
            "difference": r["accuracy"] - results["regex"]["accuracy"],
            "regex_only": b,
            "this_only": c,
            "p_mcnemar": p,
        }
        lo, hi = r["ci"]
        print(
            f"{name:8} {100 * r['accuracy']:8.1f}% [{100 * lo:5.1f}, {100 * hi:5.1f}] {r['n']:4d}  "
            f"{100 * r['committed']['accuracy']:7.1f}% {100 * r['no_option']['accuracy']:8.1f}%  "
            f"{100 * r['vs_regex']['difference']:+5.1f} pts ({b}/{c}, p={p:.3g})  {r['seconds']:6.2f}s "
            f"(x{r['seconds'] / max(results['regex']['seconds'], 1e-9):.0f} regex)"
        )
    print("\naccuracy per answer style (n):")
    names = sorted(results["regex"]["styles"])
    print(f"{'style':18} " + " ".join(f"{m:>8}" for m in matchers))
    for s in names:
        print(
            f"{s:18} "
            + " ".join(f"{100 * results[m]['styles'][s]['accuracy']:7.0f}%" for m in matchers)
            + f"  ({results['regex']['styles'][s]['n']})"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {"results": results, "decisions": decisions, "model": args.model, "machine": machine()})
        print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
