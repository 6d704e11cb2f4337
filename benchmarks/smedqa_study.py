"""S-MedQA on real questions: the cross-specialty experiment on MedMCQA dev, annotated by MiniLM.

    python benchmarks/smedqa_study.py --out runs/smedqa [--model default] [--per-specialty 220]
                                      [--shuffles 5] [--epochs 3] [--small] [--threads N]

One resumable command, in steps; each writes its result into OUT before the next starts, and a step
whose result is already there is not redone (a killed study restarts where it stopped; the
cross-specialty experiment resumes adapter by adapter and run by run):

1. annotate: MedMCQA dev (4,183 questions, MIRAGE's copy) with the MiniLM annotator trained on the
   bundled questions of all fifteen specialties (`bundled:all`) -> OUT/medmcqa_dev_labelled.jsonl,
   every question with its top specialty (and the probabilities in meta), written in chunks; with
   --none-gate also its P(none) from the none gate (clinqa.specialties.none_gate) fitted on the
   hand-labelled sample benchmarks/data/medmcqa_specialty_val.jsonl;
2. select (with --none-gate, among the questions with P(none) < 0.5): the six experiment specialties, balanced: per specialty --per-specialty questions drawn
   (seeded) from those whose top label it is with probability >= --min-prob, topped up with the most
   confident of the rest if too few (default 220 = 154 train + 66 test at --test-fraction 0.3)
   -> OUT/selected.jsonl, selection.json;
3. control: the MMLU non-medical questions (../shared/data/mmlu_control), split in two halves (seeded):
   one trains the control adapter, the other (--general-n of it) measures general ability
   -> OUT/mmlu_control_{train,test}.jsonl;
4. cross-specialty: base, the six specialty adapters and the control adapter, every one tested on
   every specialty's held-out split with --shuffles option orders; the matrix, pooled paired tests
   (own vs other specialty, medical vs base, control vs base, medical vs control)
   -> OUT/cross_specialty/ (summary.md, summary.json, matrix.png, test_questions.jsonl);
5. general ability: base and every adapter on the held-out MMLU half (the control-set column)
   -> OUT/general/ (per-model runs, general.json), with paired tests against base;
6. token shift: clinical-term log-probability under base and each adapter on the held-out questions
   -> OUT/token_shift/;
7. OUT/study.md: everything above in one page, with each step's time (OUT/timings.json).

--small is a quick end-to-end check: 10 questions per specialty (7 train, 3 test), 1 epoch (one
optimizer step per adapter), 1 shuffle, 12 MMLU questions each for the control adapter and general
ability, the annotator on the first 800 dev questions; use its own OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, machine, write_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MIRAGE = SHARED / "mirage" / "benchmark.json"
MMLU_CONTROL = SHARED / "mmlu_control"
CHUNK = 256


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Timings:
    """Seconds per step, kept in OUT/timings.json across resumed runs (a resumed step adds its time)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def add(self, step: str, seconds: float) -> None:
        self.data[step] = self.data.get(step, 0.0) + seconds
        write_json(self.path, self.data)


def load_pool(spec: str) -> list:
    """The questions to annotate: MedMCQA dev from MIRAGE's benchmark.json, or any question file/folder."""
    from clinqa.data.loaders import load_questions

    qs = load_questions(spec, skip_invalid=True).questions  # 21 MIRAGE rows repeat an option text: skipped
    medmcqa = [q for q in qs if q.source == "mirage:medmcqa"]
    return medmcqa or qs


NONE_EXAMPLES = Path(__file__).resolve().parent / "data" / "medmcqa_specialty_val.jsonl"


def annotate_dev(mirage: Path | str, out: Path, limit: int | None, none_gate: bool = False) -> Path:
    """Step 1: MiniLM (bundled:all) labels on MedMCQA dev, appended in chunks so a kill loses one chunk;
    with `none_gate`, each question's P(none) from the none gate fitted on the hand-labelled sample."""
    from clinqa.specialties.embed import SPECIALTY_IDS, embed_texts, question_text
    from clinqa.specialties.label import ALL_SPECIALTIES_SPEC, bundled_annotator

    path = out / "medmcqa_dev_labelled.jsonl"
    dev = load_pool(str(mirage))
    dev = dev[:limit] if limit else dev
    done = len(read_jsonl(path)) if path.exists() else 0
    if done >= len(dev):
        log(f"1 annotate: {path} already has {done} questions")
        return path
    log(f"1 annotate: MiniLM trained on {ALL_SPECIALTIES_SPEC}, {len(dev)} MedMCQA dev questions ({done} already done)")
    ann = bundled_annotator()
    gate = None
    if none_gate:
        from clinqa.data.loaders import load_questions
        from clinqa.specialties.none_gate import fit_none_gate_on

        gate = fit_none_gate_on(
            load_questions(str(NONE_EXAMPLES), skip_invalid=True).questions,
            load_questions(ALL_SPECIALTIES_SPEC).questions,
            where=str(NONE_EXAMPLES),
        )
        log(f"  none gate fitted on {NONE_EXAMPLES.name} ({gate.n_none} none, {gate.n_specialty} with a specialty)")
    for s in range(done, len(dev), CHUNK):
        batch = dev[s : s + CHUNK]
        emb = embed_texts([question_text(q) for q in batch])
        probs = ann.predict_proba_embeddings(emb)
        p_none = gate.p_none(emb) if gate is not None else [None] * len(batch)
        with open(path, "a", encoding="utf-8") as fh:
            for q, row, pn in zip(batch, probs, p_none):
                order = row.argsort()[::-1]
                top = SPECIALTY_IDS[int(order[0])]
                info = {
                    "annotator": f"MiniLM trained on {ALL_SPECIALTIES_SPEC}",
                    "prob": float(row[order[0]]),
                    "top3": {SPECIALTY_IDS[int(j)]: round(float(row[j]), 4) for j in order[:3]},
                    **({} if pn is None else {"p_none": round(float(pn), 4)}),
                }
                d = q.model_copy(update={"specialties": [top], "meta": {**q.meta, "specialty_annotation": info}})
                fh.write(json.dumps(d.model_dump(), ensure_ascii=False) + "\n")
        log(f"  annotated {min(s + CHUNK, len(dev))}/{len(dev)}")
    return path


def select(labelled: Path, out: Path, specs: tuple[str, ...], per_specialty: int, min_prob: float, seed: int) -> Path:
    """Step 2: a balanced, seeded draw of `per_specialty` questions for each experiment specialty."""
    path = out / "selected.jsonl"
    if path.exists():
        log(f"2 select: {path} already there")
        return path
    rows = read_jsonl(labelled)
    chosen, info = [], {"per_specialty": per_specialty, "min_prob": min_prob, "seed": seed, "specialties": {}}
    short = []
    n_rows = len(rows)
    rows = [r for r in rows if r["meta"]["specialty_annotation"].get("p_none", 0.0) < 0.5]
    if len(rows) < n_rows:
        info["left_out_by_the_none_gate"] = n_rows - len(rows)
        log(f"2 select: the none gate leaves out {n_rows - len(rows)} questions (P(none) >= 0.5)")
    for s in specs:
        mine = [r for r in rows if r["specialties"] and r["specialties"][0] == s]
        sure = sorted((r for r in mine if r["meta"]["specialty_annotation"]["prob"] >= min_prob), key=lambda r: r["id"])
        rest = sorted(
            (r for r in mine if r["meta"]["specialty_annotation"]["prob"] < min_prob),
            key=lambda r: (-r["meta"]["specialty_annotation"]["prob"], r["id"]),
        )
        pick = random.Random(f"{seed}|select|{s}").sample(sure, min(per_specialty, len(sure)))
        pick += rest[: per_specialty - len(pick)]
        info["specialties"][s] = {"labelled": len(mine), f"prob>={min_prob}": len(sure), "selected": len(pick)}
        if len(pick) < per_specialty:
            short.append(f"{s}: {len(pick)}")
        chosen += pick
    if short:
        n = min(v["selected"] for v in info["specialties"].values())
        log(
            f"2 select: fewer than {per_specialty} questions for {', '.join(short)}: balancing at {n} per specialty "
            "(MedMCQA dev is too small for the asked size; --pool adds a larger labelled source such as MedMCQA's train split)"
        )
        by = {s: [r for r in chosen if r["specialties"][0] == s] for s in specs}
        chosen = [r for s in specs for r in by[s][:n]]
        info["balanced_at"] = n
    with open(path, "w", encoding="utf-8") as fh:
        for r in chosen:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    write_json(out / "selection.json", info)
    log(
        f"2 select: {len(chosen)} questions, "
        + ", ".join(f"{s} {v['selected']} (of {v['labelled']})" for s, v in info["specialties"].items())
    )
    return path


def control_split(mmlu: Path, out: Path, n_test: int | None, n_train: int | None, seed: int) -> tuple[Path, Path]:
    """Step 3: MMLU control questions, half for the control adapter, half for general ability."""
    from clinqa.data.loaders import load_questions, write_questions

    train_p, test_p = out / "mmlu_control_train.jsonl", out / "mmlu_control_test.jsonl"
    if train_p.exists() and test_p.exists():
        log("3 control: MMLU split already there")
        return train_p, test_p
    qs = sorted(load_questions(str(mmlu), format="mmlu", skip_invalid=True).questions, key=lambda q: q.id)
    random.Random(f"{seed}|mmlu").shuffle(qs)
    half = len(qs) // 2
    train, test = qs[:half], qs[half:]
    train, test = train[:n_train] if n_train else train, test[:n_test] if n_test else test
    write_questions(train_p, train)
    write_questions(test_p, test)
    log(f"3 control: {len(train)} MMLU questions for the control adapter, {len(test)} held out for general ability")
    return train_p, test_p


def general_ability(
    base, model_spec: str, xs_dir: Path, names: list[str], test_path: Path, out: Path, shuffles: int, seed: int
) -> dict:
    """Step 5: every model on the held-out MMLU half; accuracy with CI and a paired test against base."""
    from clinqa.data.loaders import load_questions
    from clinqa.evaluate import metrics as M
    from clinqa.evaluate.harness import evaluate
    from clinqa.evaluate.runs import EvalConfig

    qs = load_questions(str(test_path)).questions
    samples, res = {}, {"n": len(qs), "models": {}}
    for name in ["base", *names]:
        pred = base if name == "base" else base.load_adapter(xs_dir / "adapters" / name, name=f"xs_{name}")
        cfg = EvalConfig(
            model=model_spec + ("" if name == "base" else f"+lora:{xs_dir / 'adapters' / name}"),
            data=str(test_path),
            method="option",
            shuffles=shuffles,
            seed=seed,
        )
        run = evaluate(pred, qs, cfg, out / name)
        samples[name] = run.samples()
        a = M.accuracy(samples[name], seed=seed)
        res["models"][name] = {"acc": a.acc, "ci_low": a.ci_low, "ci_high": a.ci_high, "n": a.n}
        if name != "base":
            p = M.paired_comparison(samples["base"], samples[name], seed=seed)
            res["models"][name]["vs_base"] = {
                "diff": p.diff,
                "ci_low": p.ci_low,
                "ci_high": p.ci_high,
                "p": p.p_bootstrap,
                "p_mcnemar": p.p_mcnemar,
            }
        log(f"5 general: {name} {100 * a.acc:.1f}% ({100 * a.ci_low:.1f}-{100 * a.ci_high:.1f})")
    write_json(out / "general.json", res)
    return res


def general_markdown(res: dict) -> str:
    lines = [
        f"General ability: accuracy % on {res['n']} held-out MMLU non-medical questions (95% CI); "
        "paired difference vs base (bootstrap CI, p).",
        "",
        "| model | accuracy | Δ vs base | 95% CI | p |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in res["models"].items():
        v = m.get("vs_base")
        lines.append(
            f"| {name} | {100 * m['acc']:.1f} ({100 * m['ci_low']:.1f}–{100 * m['ci_high']:.1f}) | "
            + (
                f"{100 * v['diff']:+.1f} | {100 * v['ci_low']:+.1f} to {100 * v['ci_high']:+.1f} | {v['p']:.3f} |"
                if v
                else "— | — | — |"
            )
        )
    return "\n".join(lines) + "\n"


def token_shift_step(base, xs_dir: Path, names: list[str], control_path: Path, out: Path, max_terms: int) -> str:
    """Step 6: the token-shift analysis on the held-out test questions of the experiment."""
    from clinqa.analysis.token_shift import clinical_terms, plot_shift, token_shift
    from clinqa.data.loaders import load_questions

    md = out / "token_shift.md"
    if md.exists():
        log("6 token shift: already there")
        return md.read_text()
    questions = load_questions(str(xs_dir / "test_questions.jsonl")).questions
    terms = clinical_terms(questions, load_questions(str(control_path)).questions, max_terms=max_terms)
    views = {n: base.load_adapter(xs_dir / "adapters" / n, name=f"xs_{n}") for n in names}
    log(
        f"6 token shift: {len(questions)} held-out questions, {sum(map(len, terms.values()))} clinical terms, {len(views)} adapters"
    )
    result = token_shift(
        base, views, questions, terms, progress=lambda d, t: log(f"  token shift: {d}/{t} models read")
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_shift.json").write_text(
        json.dumps(
            {
                "rows": [r.__dict__ for r in result.rows],
                "terms": result.terms,
                "contrasts": [c.__dict__ for c in result.contrasts],
            },
            indent=2,
        )
    )
    plot_shift(result, out / "token_shift.png")
    md.write_text(result.markdown())
    return result.markdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="study folder (resumable)")
    ap.add_argument("--model", default="default", help="base model spec (a local model: adapters are trained on it)")
    ap.add_argument(
        "--mirage",
        "--pool",
        dest="mirage",
        type=Path,
        default=MIRAGE,
        help="the questions to annotate and select from: MIRAGE benchmark.json (its MedMCQA dev part) or any "
        "question file or folder clinqa reads (e.g. MedMCQA's train split, for >= 150 + 60 per specialty)",
    )
    ap.add_argument("--mmlu", type=Path, default=MMLU_CONTROL, help="folder of MMLU non-medical CSVs (the control)")
    ap.add_argument("--per-specialty", type=int, default=220, help="questions per specialty (train + test)")
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument(
        "--min-prob",
        type=float,
        default=0.5,
        help="prefer questions the annotator labels with at least this probability",
    )
    ap.add_argument(
        "--specialties",
        help="comma-separated specialties to select and train (default: the six experiment specialties); "
        "e.g. the four MedMCQA dev has 220 questions of, for the issue's 150 + 60 per specialty",
    )
    ap.add_argument(
        "--none-gate",
        action="store_true",
        help="leave out, before selecting, the questions the none gate judges outside the fifteen specialties "
        "(fitted on benchmarks/data/medmcqa_specialty_val.jsonl and bundled:all; a new --out)",
    )
    ap.add_argument("--shuffles", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--general-n", type=int, default=300, help="held-out MMLU questions for general ability (0: all)")
    ap.add_argument("--general-shuffles", type=int, default=1, help="option orders for the general-ability column")
    ap.add_argument("--max-terms", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="quick end-to-end check: few questions, 1 epoch, 1 shuffle")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    dev_limit, n_train_ctrl = None, None
    if args.small:
        args.per_specialty, args.epochs, args.shuffles, args.general_n, args.max_terms = 10, 1, 1, 12, 10
        dev_limit, n_train_ctrl = 800, 12
    for path, what in (
        (args.mirage, "MIRAGE benchmark.json (../shared/data/mirage) or another --pool"),
        (args.mmlu, "the MMLU control CSVs (../shared/data/mmlu_control)"),
    ):
        if not path.exists():
            sys.exit(f"{path} not found: this study needs {what}; pass its path")

    import torch

    from clinqa.adapt import load_predictor
    from clinqa.data.loaders import load_questions
    from clinqa.experiments import cross_specialty as xs
    from clinqa.specialties.taxonomy import EXPERIMENT_SPECIALTIES

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("threads", "out")}
    if not args.none_gate:
        settings.pop("none_gate")  # the default: studies written before the option resume
    if args.specialties is None:
        settings.pop("specialties")  # the default: studies written before the option resume
        specialties = EXPERIMENT_SPECIALTIES
    else:
        from clinqa.data.taxonomy import resolve_specialty

        specialties = tuple(resolve_specialty(s.strip()) for s in args.specialties.split(",") if s.strip())
    settings_file = out / "study.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        sys.exit(f"{out} holds a study with other settings ({settings_file}): choose another --out")
    write_json(settings_file, settings)
    timings = Timings(out / "timings.json")
    log(f"S-MedQA study in {out} ({'small check' if args.small else 'full'}); {machine()}")

    t = time.perf_counter()
    labelled = annotate_dev(args.mirage, out, dev_limit, args.none_gate)
    rows = read_jsonl(labelled)
    in_six = sum(r["specialties"][0] in EXPERIMENT_SPECIALTIES for r in rows) / len(rows)
    timings.add("1 annotate", time.perf_counter() - t)

    t = time.perf_counter()
    selected = select(labelled, out, specialties, args.per_specialty, args.min_prob, args.seed)
    ctrl_train, ctrl_test = control_split(args.mmlu, out, args.general_n or None, n_train_ctrl, args.seed)
    timings.add("2-3 select and control split", time.perf_counter() - t)

    from clinqa.models.base import LoadsAdapters

    base = load_predictor(args.model)
    if not isinstance(base, LoadsAdapters):
        sys.exit("the study needs a local base model (it trains LoRA adapters)")
    cfg = xs.CrossSpecialtyConfig(
        model=args.model,
        data=str(selected),
        specialties=specialties,
        control_data=str(ctrl_train),
        control_eval=str(ctrl_test),
        test_fraction=args.test_fraction,
        balance=True,
        method="option",
        shuffles=args.shuffles,
        seed=args.seed,
        lora={"epochs": args.epochs, **({"max_length": 256} if args.small else {})},
    )
    xs_dir = out / "cross_specialty"
    t = time.perf_counter()
    log(
        f"4 cross-specialty: {len(specialties)} specialties + control, {args.shuffles} shuffles, {args.epochs} epochs -> {xs_dir}"
    )
    last = {}

    def progress(what: str, done: int, total: int) -> None:
        if last.get(what) is None or done == total or time.perf_counter() - last[what] > 30:
            last[what] = time.perf_counter()
            log(f"  {what}: {done}/{total}")

    summary = xs.cross_specialty(
        cfg,
        load_questions(str(selected)).questions,
        xs_dir,
        base=base,
        control_questions=load_questions(str(ctrl_train)).questions,
        progress=progress,
    )
    timings.add("4 cross-specialty", time.perf_counter() - t)
    names = [m for m in summary["models"] if m != "base"]

    t = time.perf_counter()
    general = general_ability(
        base, args.model, xs_dir, names, ctrl_test, out / "general", args.general_shuffles, args.seed
    )
    timings.add("5 general ability", time.perf_counter() - t)

    t = time.perf_counter()
    shift_md = token_shift_step(base, xs_dir, names, ctrl_train, out / "token_shift", args.max_terms)
    timings.add("6 token shift", time.perf_counter() - t)

    sel = json.loads((out / "selection.json").read_text())
    page = [
        f"# S-MedQA study on MedMCQA dev ({'small check' if args.small else 'full'})",
        "",
        f"Model `{args.model}`; {machine()}; settings in study.json.",
        "",
        f"1. MiniLM annotator (trained on bundled:all, 15 specialties) on {len(rows)} MedMCQA dev questions: "
        f"{100 * in_six:.1f}% get one of the six experiment specialties.",
        "2. Selected per specialty (balanced): "
        + ", ".join(f"{s} {v['selected']} of {v['labelled']}" for s, v in sel["specialties"].items())
        + f"; train sizes {summary['train_sizes']}, test sizes {summary['test_sizes']}.",
        "",
        "## Cross-specialty matrix and pooled tests",
        "",
        (xs_dir / "summary.md").read_text(),
        "",
        "## General ability (control set)",
        "",
        general_markdown(general),
        "",
        "## Token shift on the held-out questions",
        "",
        shift_md,
        "",
        "## Time",
        "",
        "| step | seconds |",
        "|---|---:|",
    ]
    page += [f"| {k} | {v:.0f} |" for k, v in timings.data.items()]
    (out / "study.md").write_text("\n".join(page) + "\n")
    log(f"wrote {out}/study.md")


if __name__ == "__main__":
    main()
