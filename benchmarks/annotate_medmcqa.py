"""Specialty annotation held out on real exam questions: MedMCQA questions labelled by hand.

    python benchmarks/annotate_medmcqa.py [--llm-limit 60] [--prompts 5] [--out runs/bench-annotate-medmcqa]
                                          [--no-dev] [--threads N]

The validation set is benchmarks/data/medmcqa_specialty_val.jsonl: 450 MedMCQA dev questions drawn
with a fixed seed and labelled by hand against the taxonomy's definitions (209 with a specialty, 241
"none": dental, ophthalmology, ENT, statistics, ...; see benchmarks/data/README.md). Measured on the
209 labelled questions, in the same run:

- the MiniLM annotator trained on the bundled questions of all fifteen specialties (`bundled:all`,
  440 questions) and, for comparison, on the 204 of the six experiment specialties (`bundled`, what
  `--train bundled` meant before): accuracy (top label is one of the hand labels) with a bootstrap CI,
  as a ratio to the majority-class baseline (always the most common hand label), with a paired
  bootstrap test of the difference; coverage at a top-probability threshold; split-conformal sets
  (calibrated on half of the labelled questions, tested on the other half);
- the LLM vote annotator (the embedded model unless --model; majority over the prompts), on the first
  --llm-limit labelled questions only (it is slow on CPU): accuracy, the vote-threshold trade-off,
  and Cohen's kappa between its top label and the MiniLM annotator's on the same questions (and each
  against the hand labels): the analogue of S-MedQA's expert validation;
- on all 4,183 MedMCQA dev questions (skip with --no-dev): the share each MiniLM annotator puts into
  the six experiment specialties (issue 15's symptom: over 98% with the six-specialty training set).

LLM annotations are appended to the run folder OUT/llm/ as they are made, so a killed run resumes (an
OUT/llm.jsonl written by an older clinqa is migrated into it).
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
from annotate_pubmedqa import accuracy, accuracy_with_ci, llm_annotations, paired_vs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VAL = Path(__file__).resolve().parent / "data" / "medmcqa_specialty_val.jsonl"
MIRAGE = SHARED / "mirage" / "benchmark.json"


def kappa(a: list[str], b: list[str]) -> float:
    """Cohen's kappa between two annotators' single labels (sklearn)."""
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(a, b))


def kappa_with_ci(a: list[str], b: list[str], seed: int = 0) -> dict:
    """Cohen's kappa with a 95% percentile bootstrap interval over questions (resampled pairs)."""
    import numpy as np

    from clinqa.evaluate.metrics import bootstrap_ci

    la, lb = np.asarray(a, dtype=object), np.asarray(b, dtype=object)

    def stat(idx: np.ndarray) -> float:
        i = idx.astype(int)
        k = kappa(list(la[i]), list(lb[i]))
        return 0.0 if np.isnan(k) else k  # a resample where both annotators use one label: no agreement beyond chance

    lo, hi = bootstrap_ci(np.arange(len(a), dtype=float), seed=seed, stat=stat)
    return {"n": len(a), "kappa": kappa(a, b), "ci95": [lo, hi]}


def share_in(labels: list[str], group: tuple[str, ...]) -> float:
    return sum(lab in group for lab in labels) / len(labels) if labels else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", type=Path, default=VAL)
    ap.add_argument("--mirage", type=Path, default=MIRAGE, help="MIRAGE benchmark.json, for the MedMCQA dev share")
    ap.add_argument("--model", default="default", help="the LLM vote annotator's model")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument(
        "--llm-limit", type=int, default=60, help="LLM annotator on the first N labelled questions (0: skip)"
    )
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument(
        "--threshold", type=float, default=0.5, help="MiniLM coverage: top one-vs-rest probability at least this"
    )
    ap.add_argument("--no-dev", action="store_true", help="skip annotating all of MedMCQA dev")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-annotate-medmcqa"))
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()

    import numpy as np
    import torch

    from clinqa.data.loaders import load_questions
    from clinqa.specialties.annotate import conformal_from_probs, tradeoff_table
    from clinqa.specialties.embed import SPECIALTY_IDS, EmbeddingAnnotator, embed_texts, question_text
    from clinqa.specialties.label import ALL_SPECIALTIES_SPEC
    from clinqa.specialties.taxonomy import EXPERIMENT_SPECIALTIES

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    every = load_questions(str(args.val), skip_invalid=True).questions
    labelled = [q for q in every if q.specialties]
    gold = [list(q.specialties) for q in labelled]
    primary = [g[0] for g in gold]
    counts = collections.Counter(primary)
    majority = counts.most_common(1)[0][0]
    n_six = sum(p in EXPERIMENT_SPECIALTIES for p in primary)
    print(
        f"{machine()}; {args.val.name}: {len(every)} hand-labelled MedMCQA questions, {len(labelled)} with a specialty "
        f"({n_six} in the six experiment specialties, {sum(len(g) > 1 for g in gold)} with two), "
        f"{len(every) - len(labelled)} none; most common label {majority} ({counts[majority]})"
    )
    results: dict = {
        "n_questions": len(every),
        "n_labelled": len(labelled),
        "n_none": len(every) - len(labelled),
        "n_six": n_six,
        "hand_counts": dict(counts.most_common()),
        "majority_label": majority,
    }

    base = accuracy_with_ci([majority] * len(gold), gold)
    results["majority baseline"] = {k: v for k, v in base.items() if k != "hits"}
    print(f"top label is one of the hand labels (n={len(gold)}, 95% bootstrap CI):")
    print(f"  {'majority baseline':<34} {base['accuracy']:.3f} [{base['ci95'][0]:.3f}, {base['ci95'][1]:.3f}]")

    t = time.perf_counter()
    emb_all = embed_texts([question_text(q) for q in every])
    idx = [i for i, q in enumerate(every) if q.specialties]
    annotators = {}
    for name, spec in (
        ("MiniLM, 15 specialties (bundled:all)", ALL_SPECIALTIES_SPEC),
        ("MiniLM, 6 specialties (bundled)", "bundled"),
    ):
        train = load_questions(spec).questions
        ann = EmbeddingAnnotator().fit(train)
        probs_all = ann.predict_proba_embeddings(emb_all)
        probs = probs_all[idx]
        top = [SPECIALTY_IDS[int(j)] for j in probs.argmax(1)]
        acc = accuracy_with_ci(top, gold)
        vs = paired_vs(acc["hits"], base["hits"])
        top_p = probs.max(1)
        covered = top_p >= args.threshold
        acc_cov = (
            accuracy([t_ for t_, c in zip(top, covered) if c], [g for g, c in zip(gold, covered) if c])
            if covered.any()
            else None
        )
        none_p = probs_all[[i for i, q in enumerate(every) if not q.specialties]].max(1)
        conf = conformal_from_probs(probs, gold, args.alpha)
        annotators[name] = (top, probs)
        results[name] = {
            "n_train": len(train),
            "untrained": list(ann.untrained_labels),
            **{k: v for k, v in acc.items() if k != "hits"},
            "ratio_to_majority": acc["accuracy"] / base["accuracy"],
            "vs_majority": vs,
            "accuracy_primary": sum(a == p for a, p in zip(top, primary)) / len(primary),
            "share_in_six": share_in(top, EXPERIMENT_SPECIALTIES),
            "coverage_at_threshold": float(covered.mean()),
            "accuracy_covered": acc_cov,
            "none_coverage_at_threshold": float((none_p >= args.threshold).mean()),
            "conformal": conf,
        }
        print(
            f"  {name:<34} {acc['accuracy']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}] = "
            f"{acc['accuracy'] / base['accuracy']:.2f}x the baseline (difference {vs['difference']:+.3f} "
            f"[{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}], paired bootstrap p={vs['p']:.4f}); "
            f"{share_in(top, EXPERIMENT_SPECIALTIES):.0%} of its labels in the six (hand labels: {n_six / len(primary):.0%})"
        )
        print(
            f"  {'':<34} top probability >= {args.threshold}: coverage {covered.mean():.2f} "
            f"(accuracy there {acc_cov if acc_cov is None else f'{acc_cov:.3f}'}); the 'none' questions reach it "
            f"{(none_p >= args.threshold).mean():.2f} of the time"
        )
        print(
            f"  {'':<34} conformal sets alpha {args.alpha} (calibrated on {conf['n_cal']}, tested on {conf['n_test']}): "
            f"coverage {conf['coverage']:.3f} (target {conf['target']:.2f}), {conf['mean_set_size']:.2f} labels, "
            f"precision {conf['precision']:.2f}, recall {conf['recall']:.2f}"
        )
    results["minilm_seconds"] = time.perf_counter() - t
    (top15, _), (top6, _) = (
        annotators["MiniLM, 15 specialties (bundled:all)"],
        annotators["MiniLM, 6 specialties (bundled)"],
    )
    vs = paired_vs([float(t_ in g) for t_, g in zip(top15, gold)], [float(t_ in g) for t_, g in zip(top6, gold)])
    results["MiniLM 15 minus MiniLM 6"] = vs
    print(
        f"  MiniLM trained on 15 minus trained on 6: {vs['difference']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}], "
        f"paired bootstrap p={vs['p']:.4f} (n={len(gold)})"
    )

    if args.llm_limit:
        sub = labelled[: args.llm_limit]
        sub_gold = gold[: len(sub)]
        anns, seconds = llm_annotations(args.model, sub, args.out / "llm", args.prompts)
        llm_top = [a.top_label for a in anns]
        acc = accuracy_with_ci(llm_top, sub_gold)
        sub_base = accuracy_with_ci([majority] * len(sub_gold), sub_gold)
        mini_top = annotators["MiniLM, 15 specialties (bundled:all)"][0][: len(sub)]
        mini_acc = accuracy_with_ci(mini_top, sub_gold)
        rows = tradeoff_table(anns, sub, n_prompts=args.prompts)
        k_llm_mini = kappa_with_ci(llm_top, mini_top)
        k_llm_hand = kappa_with_ci(llm_top, primary[: len(sub)])
        k_mini_hand = kappa_with_ci(mini_top, primary[: len(sub)])
        results["LLM vote annotator"] = {
            "model": args.model,
            "prompts": args.prompts,
            "n": len(sub),
            "seconds": seconds,
            **{k: v for k, v in acc.items() if k != "hits"},
            "majority_baseline_same_questions": sub_base["accuracy"],
            "minilm_same_questions": {k: v for k, v in mini_acc.items() if k != "hits"},
            "llm_minus_minilm": paired_vs(acc["hits"], mini_acc["hits"]),
            "share_in_six": share_in(llm_top, EXPERIMENT_SPECIALTIES),
            "tradeoff": rows,
            "kappa_llm_minilm": k_llm_mini,
            "kappa_llm_hand": k_llm_hand,
            "kappa_minilm_hand": k_mini_hand,
            "agreement_llm_minilm": sum(a == b for a, b in zip(llm_top, mini_top)) / len(sub),
        }
        if len(sub) >= 20:
            results["LLM vote annotator"]["conformal"] = conformal_from_probs(
                np.array([a.probs for a in anns]), sub_gold, args.alpha
            )
        print(
            f"LLM vote annotator ({args.model}, {args.prompts} prompts) on the first {len(sub)} labelled questions, "
            f"{seconds:.0f} s:"
        )
        print(
            f"  accuracy {acc['accuracy']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}]; MiniLM (15) on the same "
            f"{mini_acc['accuracy']:.3f}; majority baseline {sub_base['accuracy']:.3f}"
        )
        print(
            "  vote threshold: "
            + ", ".join(
                f">={r['min_votes']}: coverage {r['coverage']:.2f} acc "
                f"{'-' if r['accuracy'] is None else format(r['accuracy'], '.3f')}"
                for r in rows
            )
        )

        def k_str(k: dict) -> str:
            return f"{k['kappa']:.3f} [{k['ci95'][0]:.3f}, {k['ci95'][1]:.3f}]"

        print(
            f"  Cohen's kappa (n={len(sub)}, 95% bootstrap CI): LLM vs MiniLM {k_str(k_llm_mini)} (raw agreement "
            f"{results['LLM vote annotator']['agreement_llm_minilm']:.2f}); LLM vs hand {k_str(k_llm_hand)}; "
            f"MiniLM vs hand {k_str(k_mini_hand)} (primary labels)"
        )

    if not args.no_dev:
        if not args.mirage.is_file():
            print(f"{args.mirage} not found: skipping the MedMCQA dev share (needs ../shared/data/mirage)")
        else:
            dev = [
                q for q in load_questions(str(args.mirage), skip_invalid=True).questions if q.source == "mirage:medmcqa"
            ]
            t = time.perf_counter()
            emb = embed_texts([question_text(q) for q in dev])
            results["dev"] = {"n": len(dev)}
            for name, spec in (
                ("MiniLM, 15 specialties (bundled:all)", ALL_SPECIALTIES_SPEC),
                ("MiniLM, 6 specialties (bundled)", "bundled"),
            ):
                top = [
                    SPECIALTY_IDS[int(j)]
                    for j in EmbeddingAnnotator()
                    .fit(load_questions(spec).questions)
                    .predict_proba_embeddings(emb)
                    .argmax(1)
                ]
                share = share_in(top, EXPERIMENT_SPECIALTIES)
                results["dev"][name] = {"share_in_six": share, "counts": dict(collections.Counter(top).most_common())}
                print(
                    f"MedMCQA dev, {len(dev)} questions: {name} puts {share:.1%} into the six experiment specialties, "
                    f"{1 - share:.1%} outside"
                )
            results["dev"]["seconds"] = time.perf_counter() - t
    write_json(args.out / "results.json", results)
    print(f"wrote {args.out}/results.json")


if __name__ == "__main__":
    main()
