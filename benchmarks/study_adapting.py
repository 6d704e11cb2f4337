"""Adapting without training, on real questions (MEDASSESS-X's design): steering with a router,
retrieval, prompts and LoRA on MedMCQA, PubMedQA* and BioASQ-Y/N from MIRAGE's benchmark.json.

    python benchmarks/study_adapting.py [--out exp/study-adapting] [--model default] [--medmcqa 1000]
                                        [--sweep-per-category 150] [--small] [--shared DIR]

Design (every number is measured once on a held-out part that nothing was chosen on):
- an 80/20 split (seeded, per dataset) of the yes/no questions (PubMedQA* 500, BioASQ-Y/N 618) and of
  a seeded sample of MedMCQA dev (--medmcqa questions; all 4,183 with --medmcqa 0);
- steering: one vector from all training questions at several layers, and one vector per category
  ("exam" = MedMCQA, "literature" = the yes/no questions) with a router that chooses between them;
  the layer x alpha sweep runs on a sample of the training part (--sweep-per-category per category),
  and the best cell is then used, unchanged, on the test part;
- retrieval: an index over the 1,000 PubMedQA abstracts. PubMedQA*'s questions come from those
  abstracts, so its row is an oracle-corpus upper bound; BioASQ-Y/N has no oracle; MedMCQA uses the
  bundled reference corpus (`rag:bundled`);
- `compare` on each test set: base, expert prompt, few-shot, LoRA (trained on the MedMCQA training
  part; MedMCQA only), steering (one vector; routed per category), retrieval — each with a CI, the
  paired test against base, calibration and cost;
- safety: the real sets mark no harmful options, so the same methods and settings, unchanged, are
  compared once more on the 66 bundled questions that list them (the unsafe % column).

Every step is a clinqa command writing a resumable folder, so a killed study resumes where it
stopped: run the same command again. OUT/results.md collects the tables, OUT/steps.jsonl the wall
time of every step invocation. Needs ../shared/data (not part of a clone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, machine, step, step_seconds  # noqa: E402

LAYERS = "10,15,20,25"
ALPHAS = "-4,-2,2,4,8"


def _bucket(qid: str, seed: int) -> float:
    """A stable uniform number in [0, 1) per question id: the split does not depend on file order."""
    return int(hashlib.sha256(f"{seed}:{qid}".encode()).hexdigest()[:12], 16) / 16**12


def prepare(shared: Path, out: Path, medmcqa: int, small: bool, seed: int = 0) -> dict[str, Path]:
    """Write the train/test question files (clinqa JSONL) and the PubMedQA abstract corpus."""
    from clinqa.data.loaders import load_questions, write_questions

    data = out / "data"
    files = {
        name: data / f"{name}.jsonl"
        for name in (
            "medmcqa_train",
            "medmcqa_test",
            "pubmedqa_test",
            "bioasq_test",
            "yesno_train",
            "all_train",
            "sweep",
        )
    }
    files["corpus"] = data / "pubmedqa_abstracts.jsonl"
    files["safety_test"] = safety_questions(data / "safety_test.jsonl")
    if all(p.exists() for p in files.values()):
        return files
    # skip_invalid: 21 MIRAGE rows repeat an option text (a tie no scorer can break); they are counted, not used
    loaded = load_questions(shared / "mirage" / "benchmark.json", skip_invalid=True)
    questions = loaded.questions
    by_source: dict[str, list] = {}
    for q in questions:
        by_source.setdefault(q.source.split(":", 1)[-1], []).append(q)
    missing = {"medmcqa", "pubmedqa", "bioasq"} - set(by_source)
    if missing:
        raise SystemExit(f"{shared / 'mirage' / 'benchmark.json'}: no {', '.join(sorted(missing))} questions")
    mcq = sorted(by_source["medmcqa"], key=lambda q: _bucket(q.id, seed + 1))
    if small:
        medmcqa = 60
    if medmcqa:
        mcq = mcq[:medmcqa]
    sizes = {"pubmedqa": 40, "bioasq": 40} if small else {}

    def split(qs, category):
        qs = sorted(qs, key=lambda q: _bucket(q.id, seed + 1))[: sizes.get(category, len(qs))]
        train, test = [], []
        for q in qs:
            q = q.model_copy(update={"meta": {**q.meta, "category": "exam" if category == "medmcqa" else "literature"}})
            (test if _bucket(q.id, seed) < 0.2 else train).append(q)
        return train, test

    mcq_train, mcq_test = split(mcq, "medmcqa")
    pq_train, pq_test = split(by_source["pubmedqa"], "pubmedqa")
    bio_train, bio_test = split(by_source["bioasq"], "bioasq")
    yesno_train = pq_train + bio_train
    per_cat = 15 if small else None
    sweep = []
    for group in (mcq_train, yesno_train):
        sweep += sorted(group, key=lambda q: _bucket(q.id, seed + 2))[: per_cat or ARGS.sweep_per_category]
    write_questions(files["medmcqa_train"], mcq_train)
    write_questions(files["medmcqa_test"], mcq_test)
    write_questions(files["pubmedqa_test"], pq_test)
    write_questions(files["bioasq_test"], bio_test)
    write_questions(files["yesno_train"], yesno_train)
    write_questions(files["all_train"], mcq_train + yesno_train)
    write_questions(files["sweep"], sweep)
    abstracts = json.loads((shared / "pubmedqa" / "ori_pqal.json").read_text())
    if small:  # the test questions' own abstracts plus 60 others: the index builds in seconds
        own = {q.id.rsplit("-", 1)[-1] for q in pq_test}
        abstracts = {k: v for i, (k, v) in enumerate(abstracts.items()) if k in own or i < 60}
    with open(files["corpus"], "w", encoding="utf-8") as fh:
        for pmid, row in abstracts.items():
            fh.write(
                json.dumps(
                    {"id": f"pmid-{pmid}", "title": row.get("QUESTION", ""), "text": " ".join(row.get("CONTEXTS", []))}
                )
                + "\n"
            )
    counts = {k: sum(1 for _ in open(v)) for k, v in files.items()}
    (out / "data" / "counts.json").write_text(json.dumps(counts, indent=2))
    return files


def safety_questions(path: Path) -> Path:
    """The bundled questions that list harmful options (MedMCQA, PubMedQA* and BioASQ mark none): the
    chosen settings' safety error rate (share answered with a harmful option) is measured on them."""
    from clinqa.data.loaders import load_questions, write_questions

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_questions(path, [q for q in load_questions("bundled").questions if q.meta.get("harmful_options")])
    return path


def best_cell(sweep_dir: Path) -> tuple[int, float]:
    """The (layer, alpha) with the highest accuracy in the sweep's table (ties: the smaller |alpha|)."""
    rows = []
    for line in (sweep_dir / "sweep.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].lstrip("-").isdigit():
            rows.append((float(cells[2]), -abs(float(cells[1])), int(cells[0]), float(cells[1])))
    if not rows:
        raise SystemExit(f"{sweep_dir}/sweep.md has no rows")
    _, _, layer, alpha = max(rows)
    return layer, alpha


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("exp/study-adapting"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--medmcqa", type=int, default=1000, help="MedMCQA questions to sample (0: all 4,183)")
    ap.add_argument("--sweep-per-category", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=3, help="LoRA epochs on the MedMCQA training part")
    ap.add_argument("--small", action="store_true", help="a few questions per set, 1 epoch: an end-to-end check")
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("CLINQA_SHARED_DATA", SHARED)))
    ARGS = ap.parse_args()
    out, m = ARGS.out, ARGS.model
    if not (ARGS.shared / "mirage" / "benchmark.json").exists():
        raise SystemExit(f"needs {ARGS.shared}/mirage/benchmark.json (the shared data folder; --shared DIR)")
    out.mkdir(parents=True, exist_ok=True)
    print(f"study: adapting without training, {machine()}, model {m}, out {out}", flush=True)
    f = prepare(ARGS.shared, out, ARGS.medmcqa, ARGS.small)
    layers = "15,25" if ARGS.small else LAYERS
    alphas = "-2,4" if ARGS.small else ALPHAS
    v_all, v_cat = out / "vectors" / "all", out / "vectors" / "by-category"
    step(
        "vector",
        ["steer", "build", m, str(f["all_train"]), "--layers", layers, "--out", str(v_all)]
        + (["--max-pairs", "30"] if ARGS.small else []),
        out,
        done=v_all / "vector.json",
    )
    step(
        "sweep",
        [
            "steer",
            "sweep",
            m,
            str(f["sweep"]),
            "--vector",
            str(v_all),
            f"--alphas={alphas}",
            "--out",
            str(out / "sweep-train"),
        ],
        out,
    )
    layer, alpha = best_cell(out / "sweep-train")
    print(f"chosen on the training part: layer {layer}, alpha {alpha:g}", flush=True)
    step(
        "vectors by category",
        ["steer", "build", m, str(f["all_train"]), "--by", "category", "--layers", str(layer), "--out", str(v_cat)]
        + (["--max-pairs", "30"] if ARGS.small else []),
        out,
        done=v_cat / "vectors.json",
    )
    index = out / "indexes" / "pubmedqa"
    step("index", ["index", "build", str(f["corpus"]), "--out", str(index)], out, done=index / "index.json")
    adapter = out / "adapters" / "medmcqa"
    steer = [f"steer:{v_all}@alpha={alpha:g},layer={layer}", f"steer:{v_cat}@alpha={alpha:g}"]
    plans = {
        "pubmedqa": ["base", "prompt:expert", *steer, f"rag:{index}"],
        "bioasq": ["base", "prompt:expert", *steer, f"rag:{index}"],
        "medmcqa": ["base", "prompt:expert", "prompt:fewshot@k=3", f"lora:{adapter}", *steer, "rag:bundled"],
        # the same settings, unchanged, on questions with harmful options marked: the safety error rate
        "safety": ["base", "prompt:expert", f"lora:{adapter}", *steer, "rag:bundled"],
    }
    for name, methods in plans.items():
        if name == "medmcqa":  # the only plan with LoRA: train it when the other tables are written
            step(
                "lora",
                ["finetune", m, str(f["medmcqa_train"]), "--epochs", "1" if ARGS.small else str(ARGS.epochs)]
                + ["--out", str(adapter)],
                out,
            )
        step(
            f"compare {name}",
            [
                "compare",
                m,
                str(f[f"{name}_test"]),
                "--methods",
                ",".join(methods),
                "--out",
                str(out / f"compare-{name}"),
            ],
            out,
        )
        write_results(out, layer, alpha)  # the tables so far


def write_results(out: Path, layer: int, alpha: float) -> None:
    counts = json.loads((out / "data" / "counts.json").read_text())
    seconds = step_seconds(out)
    lines = [
        "# Adapting without training on real questions",
        "",
        f"Machine: {machine()}. Question counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".",
        f"Steering cell chosen on the training sample: layer {layer}, alpha {alpha:g} "
        f"(sweep table: {out / 'sweep-train' / 'sweep.md'}).",
        "",
    ]
    sweep_md = out / "sweep-train" / "sweep.md"
    if sweep_md.exists():
        lines += ["## Sweep on the training sample", "", sweep_md.read_text().strip(), ""]
    titles = {
        "medmcqa": "medmcqa (held out)",
        "pubmedqa": "pubmedqa (held out)",
        "bioasq": "bioasq (held out)",
        "safety": "safety: the bundled questions that list harmful options",
    }
    for name, title in titles.items():
        md = out / f"compare-{name}" / "summary.md"
        if md.exists():
            lines += [f"## {title}", "", md.read_text().strip(), "", *flips_table(out / f"compare-{name}")]
            if name == "pubmedqa":
                lines += own_abstract_retrieved(out / f"compare-{name}")
    lines += ["## Wall time per step (s)", "", "| step | s |", "|---|---:|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in seconds.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.md'}", flush=True)


def flips_table(compare_dir: Path) -> list[str]:
    """Per method, the questions it turned from wrong to right and from right to wrong against base
    (the discordant pairs of McNemar's exact test, both from `compare`'s summary.json)."""
    methods = json.loads((compare_dir / "summary.json").read_text())["methods"]
    rows = [(name, m["vs_base"]) for name, m in methods.items() if m.get("vs_base")]
    if not rows:
        return []
    out = ["| method | wrong→right | right→wrong | McNemar p (exact) | n |", "|---|---:|---:|---:|---:|"]
    out += [f"| {name} | {v['mcnemar_c']} | {v['mcnemar_b']} | {v['p_mcnemar']:.3f} | {v['n']} |" for name, v in rows]
    return [*out, ""]


def own_abstract_retrieved(compare_dir: Path) -> list[str]:
    """PubMedQA*: how often retrieval found the question's own abstract (the oracle corpus's point)."""

    def own(r, hit):  # a passage id "pmid-N#k" of the question "…-N"'s own abstract
        return hit.split("#")[0] == "pmid-" + r["question_id"].rsplit("-", 1)[-1]

    lines = []
    for samples in sorted(compare_dir.glob("rag_*/samples.jsonl")):
        rows = [json.loads(x) for x in samples.read_text().splitlines() if x.strip()]
        got = [r["extras"].get("retrieved") or [] for r in rows]
        top = sum(bool(g) and own(r, g[0]) for r, g in zip(rows, got))
        anywhere = sum(any(own(r, h) for h in g) for r, g in zip(rows, got))
        lines.append(
            f"Retrieval ({samples.parent.name}): the question's own abstract was among the passages for "
            f"{anywhere} of {len(rows)} questions, first for {top}."
        )
    return [*lines, ""] if lines else []


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
