"""The "none" gate on hand-labelled MedMCQA: can the MiniLM annotator learn to leave a question unlabelled?

    python benchmarks/none_gate_medmcqa.py [--folds 5] [--threshold 0.5] [--out runs/bench-none-gate] [--no-dev]

More than half of MedMCQA (241 of the 450 hand-labelled questions in benchmarks/data/
medmcqa_specialty_val.jsonl: dental, anatomy, statistics, ...) belongs to none of the fifteen
specialties, and the fifteen-specialty MiniLM annotator (`bundled:all`) has no way to say so. This
script measures `clinqa.specialties.none_gate` against the rule available without it (leave a
question unlabelled when its top one-vs-rest probability is below a threshold), on the same questions:

- every hand-labelled question gets P(none) from a gate that never saw it (stratified k-fold: each
  fold's gate trains on the bundled:all questions and the other folds' questions with a specialty,
  against the other folds' none questions);
- AUROC of P(none) and of 1 - top probability for telling none from specialty questions, each with
  a bootstrap interval, and their paired difference;
- at the threshold: the share of none questions left unlabelled (none recall) and of specialty
  questions kept (retention), with intervals; the top-probability rule at the cut-off that keeps the
  same share of specialty questions, for a like-for-like comparison;
- "annotation correct" per question (a none question left unlabelled, or a kept question whose top
  label is a hand label) with the gate, against labelling every question (what the annotator does
  now), paired bootstrap over all questions;
- on all MedMCQA dev questions (skip with --no-dev): with a gate trained on every hand-labelled
  question, the share left unlabelled and the specialty counts before and after.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, machine, write_json  # noqa: E402
from annotate_medmcqa import VAL, paired_vs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def share_ci(flags, seed: int = 0) -> dict:
    import numpy as np

    from clinqa.evaluate.metrics import bootstrap_ci

    x = np.asarray(flags, dtype=float)
    lo, hi = bootstrap_ci(x, seed=seed)
    return {"n": len(x), "share": float(x.mean()), "ci95": [lo, hi]}


def auroc_ci(scores, positive, seed: int = 0) -> dict:
    """AUROC of `scores` for `positive`, with a 95% bootstrap interval (resampling questions)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from clinqa.evaluate.metrics import bootstrap_ci

    s, y = np.asarray(scores, float), np.asarray(positive, bool)

    def stat(idx):
        i = idx.astype(int)
        return roc_auc_score(y[i], s[i]) if 0 < y[i].sum() < len(i) else float("nan")

    lo, hi = bootstrap_ci(np.arange(len(s), dtype=float), seed=seed, stat=stat)
    return {"n": len(s), "auroc": float(roc_auc_score(y, s)), "ci95": [lo, hi]}


def auroc_difference(a, b, positive, seed: int = 0, n_boot: int = 2000) -> dict:
    """AUROC(a) - AUROC(b) on the same questions: paired bootstrap interval and two-sided p."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    a, b, y = np.asarray(a, float), np.asarray(b, float), np.asarray(positive, bool)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    d = np.asarray(diffs)
    p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))
    return {
        "difference": float(roc_auc_score(y, a) - roc_auc_score(y, b)),
        "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
        "p": float(p),
        "n_boot": len(d),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=Path, default=VAL)
    ap.add_argument("--mirage", type=Path, default=SHARED / "mirage" / "benchmark.json")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.5, help="P(none) at which the gate leaves a question")
    ap.add_argument("--no-dev", action="store_true", help="skip MedMCQA dev")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-none-gate"))
    args = ap.parse_args()

    import numpy as np

    from clinqa.data.loaders import load_questions
    from clinqa.specialties.embed import SPECIALTY_IDS, EmbeddingAnnotator, embed_texts, question_text
    from clinqa.specialties.label import ALL_SPECIALTIES_SPEC
    from clinqa.specialties.none_gate import cross_fitted_p_none, fit_none_gate

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    every = load_questions(str(args.val), skip_invalid=True).questions
    is_none = np.array([not q.specialties for q in every])
    gold = [list(q.specialties) for q in every]
    train = load_questions(ALL_SPECIALTIES_SPEC).questions
    print(
        f"{machine()}; {args.val.name}: {len(every)} hand-labelled questions ({int(is_none.sum())} none, "
        f"{int((~is_none).sum())} with a specialty); annotator and gate trained on {ALL_SPECIALTIES_SPEC} "
        f"({len(train)} questions) + the other folds",
        flush=True,
    )
    emb = embed_texts([question_text(q) for q in every])
    emb_train = embed_texts([question_text(q) for q in train])
    annotator = EmbeddingAnnotator().fit(train, embeddings=emb_train)
    probs = annotator.predict_proba_embeddings(emb)
    top = [SPECIALTY_IDS[int(j)] for j in probs.argmax(1)]
    top_p = probs.max(1)
    p_none = cross_fitted_p_none(emb, is_none, extra_specialty_embeddings=emb_train, folds=args.folds)

    res: dict = {"machine": machine(), "n": len(every), "n_none": int(is_none.sum()), "folds": args.folds}
    res["auroc_gate"] = auroc_ci(p_none, is_none)
    res["auroc_top_probability"] = auroc_ci(1 - top_p, is_none)
    res["auroc_gate_minus_top_probability"] = auroc_difference(p_none, 1 - top_p, is_none)
    gated = p_none >= args.threshold
    res["gate"] = {
        "threshold": args.threshold,
        "none_recall": share_ci(gated[is_none]),
        "specialty_retention": share_ci(~gated[~is_none]),
    }
    # the top-probability rule at the cut-off keeping the same share of specialty questions
    retention = float((~gated[~is_none]).mean())
    cut = float(np.quantile(top_p[~is_none], 1 - retention)) if retention < 1 else float(top_p.min())
    kept_rule = top_p >= cut
    res["top_probability_rule"] = {
        "cutoff": cut,
        "none_recall": share_ci(~kept_rule[is_none]),
        "specialty_retention": share_ci(kept_rule[~is_none]),
        "none_recall_at_0.5": share_ci(top_p[is_none] < 0.5),
        "specialty_retention_at_0.5": share_ci(top_p[~is_none] >= 0.5),
    }
    hit = np.array([t in g for t, g in zip(top, gold)])
    correct_gate = np.where(gated, is_none, ~is_none & hit).astype(float)
    correct_rule = np.where(~kept_rule, is_none, ~is_none & hit).astype(float)
    correct_all = (~is_none & hit).astype(float)  # every question labelled: a none question is always wrong
    res["annotation_correct"] = {
        "gate": share_ci(correct_gate),
        "top_probability_rule": share_ci(correct_rule),
        "label_everything": share_ci(correct_all),
        "gate_minus_label_everything": paired_vs(list(correct_gate), list(correct_all)),
        "gate_minus_top_probability_rule": paired_vs(list(correct_gate), list(correct_rule)),
    }
    kept_spec = ~is_none & ~gated
    res["accuracy_of_kept_specialty_questions"] = share_ci(hit[kept_spec])
    res["accuracy_of_all_specialty_questions"] = share_ci(hit[~is_none])

    g, r, c = res["gate"], res["top_probability_rule"], res["annotation_correct"]

    def f(d):
        return f"{d['share']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}] (n={d['n']})"

    def ci(d, key="auroc", sign=""):
        return f"{d[key]:{sign}.3f} [{d['ci95'][0]:{sign}.3f}, {d['ci95'][1]:{sign}.3f}]"

    diff = res["auroc_gate_minus_top_probability"]
    print(
        f"AUROC none vs specialty (n={len(every)}): gate {ci(res['auroc_gate'])}, 1 - top probability "
        f"{ci(res['auroc_top_probability'])}; difference {ci(diff, 'difference', '+')} "
        + (f"p={diff['p']:.4f}" if diff["p"] > 0 else f"p<{1 / diff['n_boot']:.4f} (no bootstrap sample at or below 0)")
    )
    print(
        f"gate at P(none) >= {args.threshold}: none left unlabelled {f(g['none_recall'])}; specialty kept {f(g['specialty_retention'])}"
    )
    print(f"top-probability rule at the same retention (cut-off {cut:.3f}): none left unlabelled {f(r['none_recall'])}")
    print(
        f"annotation correct: gate {f(c['gate'])}; top-probability rule {f(c['top_probability_rule'])}; label everything {f(c['label_everything'])}"
    )
    for k in ("gate_minus_label_everything", "gate_minus_top_probability_rule"):
        d = c[k]
        print(f"  {k}: {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] p={d['p']:.4f}")
    print(
        f"top label a hand label: kept specialty questions {f(res['accuracy_of_kept_specialty_questions'])}; "
        f"all specialty questions {f(res['accuracy_of_all_specialty_questions'])}"
    )

    if not args.no_dev and args.mirage.is_file():
        val_ids = {q.id for q in every}
        dev = [
            q
            for q in load_questions(str(args.mirage), skip_invalid=True).questions
            if q.source == "mirage:medmcqa" and q.id not in val_ids
        ]
        gate = fit_none_gate(np.vstack([emb_train, emb[~is_none]]), emb[is_none], threshold=args.threshold)
        emb_dev = embed_texts([question_text(q) for q in dev])
        dev_top = [SPECIALTY_IDS[int(j)] for j in annotator.predict_proba_embeddings(emb_dev).argmax(1)]
        dev_gated = gate.is_none(emb_dev)
        before = collections.Counter(dev_top)
        after = collections.Counter(t for t, x in zip(dev_top, dev_gated) if not x)
        res["dev"] = {
            "n": len(dev),
            "left_unlabelled": float(dev_gated.mean()),
            "counts_before": dict(before.most_common()),
            "counts_after": dict(after.most_common()),
        }
        print(
            f"MedMCQA dev outside the hand-labelled sample ({len(dev)}): the gate leaves {dev_gated.mean():.1%} unlabelled"
        )
        for lab, n in before.most_common():
            print(f"  {lab:<24} {n:>5} -> {after.get(lab, 0):>5}")
    res["seconds"] = time.perf_counter() - t0
    write_json(args.out / "results.json", res)
    print(f"{res['seconds']:.0f} s; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
