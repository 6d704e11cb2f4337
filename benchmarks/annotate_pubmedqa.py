"""Specialty annotation held out, on real questions: PubMedQA's 1,000 expert-labelled questions, with
silver specialty labels derived from each article's MeSH headings.

    python benchmarks/annotate_pubmedqa.py [--limit N] [--prompts 5] [--out runs/bench-annotate] [--threads N]

Why: the five annotation prompts were chosen on the bundled questions and the MiniLM annotator is
trained on them, so the bundled-set figures are optimistic. PubMedQA was never looked at for either,
its questions are real (research questions, not exam vignettes), and MeSH indexing gives an
independent label. The MeSH -> specialty map below is a keyword heuristic (age-group check tags such as
"Child" are ignored; a heading can map to several specialties), so the labels are silver and the
absolute numbers are agreement with MeSH, a lower bound on accuracy. Compared on the same questions:

- the LLM annotator (the embedded model unless --model; majority vote over the prompts, contextual
  calibration), with the accuracy/coverage trade-off of the vote threshold;
- the MiniLM annotator trained on the 204 bundled questions of the six experiment specialties
  (`bundled`; it is also scored on the questions whose silver labels include one of those six) and on
  the 440 of all fifteen (`bundled:all`, what `--train bundled` means now), with 95% bootstrap
  intervals and paired bootstrap tests of the fifteen-specialty annotator against the six-specialty
  one and the baseline;
- the majority-class baseline (always the most common silver label); every accuracy is also printed
  as a ratio to it;
- split-conformal sets at alpha 0.1: MiniLM calibrated on the bundled set (a distribution shift:
  coverage is only guaranteed for exchangeable data) vs calibrated on half of PubMedQA and tested on
  the other half; the fifteen-specialty MiniLM and the LLM calibrated on the same half.

LLM annotations are appended to the run folder OUT/llm/ as they are made, so a killed run resumes (an
OUT/llm.jsonl written by an older clinqa is migrated into it).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PUBMEDQA, machine, write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# MeSH heading -> specialty: a heading maps to a specialty when one of its words starts with one of
# these stems (case-insensitive). Written once, before any annotator was run on PubMedQA.
MESH_STEMS: dict[str, tuple[str, ...]] = {
    "cardiology": (
        "heart",
        "cardi",
        "coronary",
        "myocardi",
        "atrial",
        "arrhythmi",
        "hypertension",
        "angina",
        "aortic valve",
        "mitral valve",
        "ventricular",
        "angioplasty",
    ),
    "gastroenterology": (
        "liver",
        "hepat",
        "colon",
        "colorectal",
        "gastr",
        "intestin",
        "pancrea",
        "biliary",
        "gallbladder",
        "cholecyst",
        "esophag",
        "bowel",
        "crohn",
        "colitis",
        "duoden",
        "rectal",
        "rectum",
        "appendic",
        "colonoscopy",
    ),
    "infectious_diseases": (
        "infection",
        "hiv",
        "bacteri",
        "virus",
        "viral",
        "tuberculosis",
        "sepsis",
        "anti-bacterial",
        "vaccin",
        "hepatitis",
        "malaria",
        "communicable",
    ),
    "neurology": (
        "brain",
        "stroke",
        "cerebr",
        "epilep",
        "seizure",
        "nervous system",
        "parkinson",
        "alzheimer",
        "dementia",
        "multiple sclerosis",
        "headache",
        "migraine",
        "spinal cord",
        "neurolog",
    ),
    "obstetrics_gynecology": (
        "pregnan",
        "obstet",
        "cesarean",
        "uter",
        "ovar",
        "cervix",
        "gynec",
        "fetal",
        "prenatal",
        "endometri",
        "menopaus",
        "infertility",
        "placenta",
        "postpartum",
    ),
    "pediatrics": ("pediatric", "infant, newborn, diseases", "infant, premature", "child development"),
    "endocrinology": ("diabetes", "thyroid", "insulin", "adrenal", "pituitar", "obesity", "osteoporosis"),
    "hematology_oncology": (
        "neoplasm",
        "cancer",
        "carcinoma",
        "tumor",
        "lymphoma",
        "leukemia",
        "anemia",
        "chemotherapy",
        "radiotherapy",
        "melanoma",
        "sarcoma",
        "hemoglobin",
        "blood coagulation",
        "blood transfusion",
        "medical oncology",
    ),
    "nephrology": ("kidney", "renal", "dialysis", "nephr", "glomerul"),
    "pulmonology": ("lung", "pulmonary", "asthma", "respiratory", "bronch", "pneumon"),
    "psychiatry": (
        "depressi",
        "anxiety",
        "mental",
        "psychiatr",
        "schizophren",
        "substance-related",
        "alcoholism",
        "bipolar",
        "suicide",
        "stress disorders",
        "psychotic",
    ),
    "dermatology": ("skin", "dermat", "psoriasis", "eczema"),
    "rheumatology": ("arthritis", "lupus", "rheumat", "gout", "vasculitis"),
    "surgery": ("surgical", "general surgery", "laparoscop", "anastomo", "hernia", "transplantation"),
    "emergency_medicine": ("emergenc", "wounds and injuries", "resuscitation", "poisoning", "multiple trauma"),
}
_PATTERNS = {
    s: re.compile(r"\b(?:" + "|".join(re.escape(k) for k in stems) + ")", re.I) for s, stems in MESH_STEMS.items()
}


def mesh_specialties(meshes: list[str]) -> list[str]:
    """Silver specialties of one article, most matching headings first (ties in taxonomy order)."""
    hits = collections.Counter(s for m in meshes for s, p in _PATTERNS.items() if p.search(m))
    order = list(MESH_STEMS)
    return sorted(hits, key=lambda s: (-hits[s], order.index(s)))


def llm_annotations(model: str, questions: list, out_dir: Path, n_prompts: int) -> tuple[list, float]:
    """The LLM vote annotator (majority over `n_prompts` prompts) on `questions`, appended to the run folder
    `out_dir` as it goes (a killed run resumes), with a progress bar; the annotations and the seconds taken.
    The file ``out_dir.jsonl`` an older clinqa wrote instead is migrated into the folder the first time."""
    from rich.progress import Progress

    from clinqa.adapt import load_predictor
    from clinqa.specialties.annotate import annotate_to_run

    predictor = load_predictor(model)
    t = time.perf_counter()
    with Progress() as bar:
        task = bar.add_task(f"LLM annotator, {n_prompts} prompts", total=len(questions))
        anns = annotate_to_run(
            predictor,
            questions,
            out_dir,
            n_prompts=n_prompts,
            min_votes=1,
            progress=lambda d, n: bar.update(task, completed=d),
            legacy_file=out_dir.with_name(out_dir.name + ".jsonl"),
        )
    return anns, time.perf_counter() - t


def accuracy(top: list[str], gold: list[list[str]]) -> float:
    return sum(t in g for t, g in zip(top, gold)) / len(gold)


def accuracy_with_ci(top: list[str], gold: list[list[str]], seed: int = 0) -> dict:
    """Share of items whose top label is a gold label, with a 95% percentile bootstrap interval over items."""
    from clinqa.evaluate.metrics import bootstrap_ci

    hits = [float(t in g) for t, g in zip(top, gold)]
    lo, hi = bootstrap_ci(hits, seed=seed)
    return {"n": len(hits), "accuracy": accuracy(top, gold), "ci95": [lo, hi], "hits": hits}


def paired_vs(hits_a: list[float], hits_b: list[float]) -> dict:
    """Mean paired difference a - b over the same items, its 95% interval and two-sided bootstrap p."""
    from clinqa.evaluate.metrics import bootstrap_mean_test

    mean, lo, hi, p = bootstrap_mean_test([a - b for a, b in zip(hits_a, hits_b)])
    return {"difference": mean, "ci95": [lo, hi], "p": p}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=PUBMEDQA)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--limit", type=int, help="only the first N silver-labelled questions")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-annotate"))
    ap.add_argument("--threads", type=int)
    ap.add_argument(
        "--no-llm", action="store_true", help="MiniLM and the baseline only (seconds instead of CPU-minutes)"
    )
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"{args.data} not found: this benchmark needs PubMedQA's ori_pqal.json (../shared/data/pubmedqa)")

    import numpy as np
    import torch

    from clinqa.data.loaders import load_questions, write_questions
    from clinqa.specialties import conformal
    from clinqa.specialties.annotate import conformal_from_probs, tradeoff_table
    from clinqa.specialties.embed import SPECIALTY_IDS, EmbeddingAnnotator, embed_texts, question_text
    from clinqa.specialties.label import ALL_SPECIALTIES_SPEC, conformal_sets
    from clinqa.specialties.taxonomy import EXPERIMENT_SPECIALTIES

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    questions = []
    everything = load_questions(str(args.data)).questions
    for q in everything:
        labels = mesh_specialties(q.meta.get("meshes", []))
        if labels:
            questions.append(q.model_copy(update={"specialties": labels}))
    n_all = len(everything)
    questions = questions[: args.limit] if args.limit else questions
    write_questions(args.out / "pubmedqa_mesh_labelled.jsonl", questions)
    gold = [q.specialties for q in questions]
    single = [i for i, g in enumerate(gold) if len(g) == 1]
    six = [i for i, g in enumerate(gold) if set(g) & set(EXPERIMENT_SPECIALTIES)]
    counts = collections.Counter(g[0] for g in gold)
    majority = counts.most_common(1)[0][0]
    print(
        f"{machine()}; {len(questions)} of {n_all} PubMedQA questions get a MeSH-derived specialty "
        f"({len(single)} exactly one, {len(six)} one of the six experiment specialties); most common first label: "
        f"{majority} ({counts[majority]})"
    )
    results: dict = {
        "n": len(questions),
        "n_single": len(single),
        "n_six": len(six),
        "silver_counts": dict(counts.most_common()),
    }

    hits: dict[str, list[float]] = {}  # per question, 1 where the top label is a silver label: for paired tests

    def report(name: str, top: list[str], seconds: float | None = None) -> None:
        acc = accuracy_with_ci(top, gold)
        acc1 = accuracy([top[i] for i in single], [gold[i] for i in single])
        acc6 = accuracy([top[i] for i in six], [gold[i] for i in six])
        base = accuracy([majority] * len(gold), gold)
        hits[name] = acc.pop("hits")
        results[name] = {
            **acc,
            "accuracy_single_label": acc1,
            "accuracy_six_specialties": acc6,
            "ratio_to_majority": acc["accuracy"] / base,
            "seconds": seconds,
        }
        lo, hi = acc["ci95"]
        print(
            f"  {name:<36} accuracy {acc['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] = {acc['accuracy'] / base:.2f}x the "
            f"majority baseline; single-label {acc1:.3f}; six experiment specialties {acc6:.3f}"
            + (f"   {seconds:.0f} s" if seconds is not None else "")
        )

    def difference(a: str, b: str) -> None:
        vs = paired_vs(hits[a], hits[b])
        results[f"{a} minus {b}"] = vs
        print(
            f"  {a} minus {b}: {vs['difference']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}], "
            f"paired bootstrap p={vs['p']:.4f} (n={len(gold)})"
        )

    print(f"top label is one of the silver labels (n={len(gold)}, 95% bootstrap CI):")
    report("majority baseline", [majority] * len(gold))

    # the MiniLM annotator trained on the six experiment specialties (`bundled`, what `--train bundled` meant
    # before issue 15) and on all fifteen (`bundled:all`, what it means now)
    t = time.perf_counter()
    emb = embed_texts([question_text(q) for q in questions])
    results["embed_seconds"] = embed_s = time.perf_counter() - t  # shared by both: counted in each one's time
    minilm_probs = {}
    for name, spec in (
        ("MiniLM (trained on bundled)", "bundled"),
        ("MiniLM, 15 specialties (bundled:all)", ALL_SPECIALTIES_SPEC),
    ):
        t = time.perf_counter()
        train = load_questions(spec).questions
        ann = EmbeddingAnnotator().fit(train)
        minilm_probs[name] = ann.predict_proba_embeddings(emb)
        report(name, [SPECIALTY_IDS[int(i)] for i in minilm_probs[name].argmax(1)], embed_s + time.perf_counter() - t)
    bundled = load_questions("bundled").questions
    p_mini = minilm_probs["MiniLM (trained on bundled)"]
    difference("MiniLM, 15 specialties (bundled:all)", "majority baseline")
    difference("MiniLM, 15 specialties (bundled:all)", "MiniLM (trained on bundled)")

    p_llm = None
    if not args.no_llm:
        anns, seconds = llm_annotations(args.model, questions, args.out / "llm", args.prompts)
        report(f"LLM, {args.prompts}-prompt majority", [a.top_label for a in anns], seconds)
        p_llm = np.array([a.probs for a in anns])
        rows = tradeoff_table(anns, questions, n_prompts=args.prompts)
        results["llm_tradeoff"] = rows
        print(
            "  LLM vote threshold: "
            + ", ".join(
                f">={r['min_votes']}: coverage {r['coverage']:.2f} acc {r['accuracy']:.3f}"
                for r in rows
                if r["accuracy"] is not None
            )
        )

    print(f"conformal sets, alpha {args.alpha} (target coverage {1 - args.alpha:.2f}):")
    cal_idx, test_idx = conformal.split(len(questions), 0.5, 0)
    test_gold = [gold[i] for i in test_idx]
    # MiniLM calibrated on bundled must not use its own training questions: 5-fold out-of-fold probabilities instead.
    from sklearn.model_selection import KFold

    oof = np.zeros((len(bundled), p_mini.shape[1]))
    for tr, te in KFold(5, shuffle=True, random_state=0).split(bundled):
        oof[te] = EmbeddingAnnotator().fit([bundled[i] for i in tr]).predict_proba([bundled[i] for i in te])
    for name, cal_p, cal_g in (
        ("MiniLM, calibrated on bundled", oof, [q.specialties for q in bundled]),
        ("MiniLM, calibrated on PubMedQA half", p_mini[cal_idx], [gold[i] for i in cal_idx]),
    ):
        sets, cal = conformal_sets(cal_p, cal_g, p_mini[test_idx], args.alpha)
        m = conformal.evaluate_sets(sets, test_gold)
        results[name] = {
            "coverage": m.coverage_any,
            "mean_set_size": m.mean_set_size,
            "precision": m.precision,
            "recall": m.recall,
            "qhat": cal.qhat,
            "n_cal": cal.n,
            "n_test": len(test_idx),
        }
        print(
            f"  {name:<36} coverage {m.coverage_any:.3f}, {m.mean_set_size:.2f} labels, precision {m.precision:.2f}, "
            f"recall {m.recall:.2f}"
        )
    # the same split (seed 0) as above for the fifteen-specialty MiniLM and the LLM
    for name, probs in (
        ("MiniLM 15, calibrated on PubMedQA half", minilm_probs["MiniLM, 15 specialties (bundled:all)"]),
        ("LLM, calibrated on PubMedQA half", p_llm),
    ):
        if probs is None:
            continue
        c = conformal_from_probs(probs, gold, args.alpha)
        results[name] = c
        print(
            f"  {name:<36} coverage {c['coverage']:.3f}, {c['mean_set_size']:.2f} labels, "
            f"precision {c['precision']:.2f}, recall {c['recall']:.2f}"
        )
    write_json(args.out / "results.json", results)
    print(f"wrote {args.out}/results.json and the silver-labelled questions {args.out}/pubmedqa_mesh_labelled.jsonl")


if __name__ == "__main__":
    main()
