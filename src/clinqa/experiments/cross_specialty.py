"""The cross-specialty experiment (S-MedQA): does training on one specialty help that specialty,
or is the gain a general shift toward medicine?

Each specialty is split into train/test (seeded, by primary label); one LoRA adapter is trained per
specialty, plus a control adapter on non-medical questions; every adapter (and the base model) is
evaluated on every specialty's test split with the ordinary harness. The result is the
train x test accuracy matrix with CIs, deltas over base, a heatmap, paired tests of whether an
off-diagonal cell beats the diagonal, the clinical-term overlap between splits, and pooled paired
tests over all test questions (``pooled_effects``): single cells are small, the pooled questions
are where the power is.
Loss of general ability (the generalist-vs-specialist question: does medical fine-tuning cost general
ability?): every adapter and the base model are also evaluated on a non-medical control set
(``control_eval``; the bundled control questions by default, any question file such as an MMLU CSV
folder otherwise), minus the questions the control adapter was trained on, with a paired test of each
adapter against the base model there (bootstrap over questions and McNemar, evaluate.metrics).
Everything is a folder of adapters and runs (plus test_questions.jsonl, the held-out questions): a
killed experiment redoes nothing already finished. A folder made before a config field existed
resumes with that field's old behaviour (NEW_FIELDS); one made with other settings is refused.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from clinqa.data.loaders import write_questions
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate import metrics as M
from clinqa.evaluate.harness import evaluate
from clinqa.evaluate.runs import EvalConfig
from clinqa.specialties.taxonomy import resolve_specialty

CONTROL = "control"
CONTROL_SET = "control set"  # the column of the general-ability evaluation
# Fields added after the first release, with the value an experiment folder made before them had:
# such a folder resumes (control_eval only adds runs, it changes none).
NEW_FIELDS = {"matcher": "regex", "preset": None}
ADDITIVE_FIELDS = ("control_eval",)


@dataclass
class CrossSpecialtyConfig:
    model: str
    data: str
    specialties: tuple[str, ...]
    control_data: str | None = "bundled:control"
    test_fraction: float = 0.3
    balance: bool = True
    method: str = "option"
    shuffles: int = 1
    seed: int = 0
    lora: dict = field(default_factory=lambda: {"epochs": 3})
    matcher: str = "regex"  # --method generate: how answers are mapped to options (evaluate.matcher)
    preset: str | None = None  # the --preset the settings came from (experiments.presets)
    control_eval: str | None = "bundled:control"  # general-ability set every model is also tested on


def split_by_specialty(
    questions: Sequence[Question], specialties: Sequence[str], test_fraction: float, seed: int
) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
    """Seeded train/test split within each specialty (by primary label), so every test split has the
    same share of its specialty."""
    train, test = {}, {}
    for spec in specialties:
        qs = sorted((q for q in questions if q.specialties and q.specialties[0] == spec), key=lambda q: q.id)
        if len(qs) < 4:
            raise ClinqaError(f"specialty {spec} has {len(qs)} questions: at least 4 are needed to split train/test")
        random.Random(f"{seed}|{spec}").shuffle(qs)
        n_test = max(1, round(len(qs) * test_fraction))
        test[spec], train[spec] = qs[:n_test], qs[n_test:]
    return train, test


_STOP = None


def term_set(questions: Sequence[Question]) -> set[str]:
    """Content words (not English stop words, >= 4 letters) of questions and their correct answers."""
    global _STOP
    if _STOP is None:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        _STOP = ENGLISH_STOP_WORDS
    text = " ".join(f"{q.question} {q.options[q.answer]}" for q in questions).lower()
    return {w for w in re.findall(r"[a-z][a-z\-]{3,}", text) if w not in _STOP}


def term_overlap(train: dict[str, list[Question]], test: dict[str, list[Question]], general: set[str]) -> dict:
    """Share of each test split's clinical terms (minus general vocabulary) that occur in each train split."""
    out = {}
    for a, tr in train.items():
        ta = term_set(tr) - general
        out[a] = {}
        for b, te in test.items():
            tb = term_set(te) - general
            out[a][b] = len(ta & tb) / len(tb) if tb else float("nan")
    return out


def _comparable(cfg: dict) -> dict:
    """An experiment's config without LoRA's memory/speed knobs, which do not change the adapters."""
    from clinqa.adapt.lora import identity_config

    full = {**NEW_FIELDS, **cfg, "lora": identity_config(cfg.get("lora") or {})}
    return {k: v for k, v in full.items() if k not in ADDITIVE_FIELDS}


def cross_specialty(
    config: CrossSpecialtyConfig,
    questions: Sequence[Question],
    out: str | Path,
    *,
    base,
    control_questions: Sequence[Question] = (),
    control_eval_questions: Sequence[Question] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Run (or resume) the whole experiment in `out`; `base` is a LocalModel (adapters are loaded into it).
    `control_eval_questions` (the `control_eval` set, loaded) adds the general-ability column."""
    from clinqa.runs import lock_path

    with lock_path(out, folder=True):  # one writer per experiment folder
        return _cross_specialty(
            config,
            questions,
            Path(out),
            base=base,
            control_questions=control_questions,
            control_eval_questions=control_eval_questions,
            progress=progress,
        )


def _check_experiment(out: Path, cfg: dict) -> None:
    """Refuse a folder holding an experiment with another config, naming what differs; record ours."""
    from clinqa.runs import atomic_write_text, describe_config_change, read_json_object

    cfg_file = out / "experiment.json"
    if cfg_file.exists():
        old = read_json_object(cfg_file)
        if _comparable(old) != _comparable(cfg):
            diff = "; ".join(describe_config_change(_comparable(old), _comparable(cfg)))
            raise ClinqaError(
                f"{out} holds a cross-specialty experiment with a different config ({diff}): "
                f"choose another --out or delete {out}"
            )
    atomic_write_text(cfg_file, json.dumps(cfg, indent=2))


def _cross_specialty(
    config: CrossSpecialtyConfig,
    questions: Sequence[Question],
    out: Path,
    *,
    base,
    control_questions: Sequence[Question] = (),
    control_eval_questions: Sequence[Question] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    from clinqa.adapt.lora import LoraTrainConfig, finetune

    specs = [resolve_specialty(s) for s in config.specialties]
    cfg = json.loads(json.dumps(asdict(config)))
    _check_experiment(out, cfg)

    train, test = split_by_specialty(questions, specs, config.test_fraction, config.seed)
    # The held-out questions, for analyses that must not see an adapter's training data (token-shift).
    write_questions(out / "test_questions.jsonl", [q for s in specs for q in test[s]])
    if config.balance:
        n = min(len(v) for v in train.values())
        train = {
            s: sorted(random.Random(f"{config.seed}|bal|{s}").sample(v, n), key=lambda q: q.id)
            for s, v in train.items()
        }
    adapters_to_train = dict(train)
    if control_questions:
        n = min(len(v) for v in train.values())
        ctrl = sorted(
            random.Random(f"{config.seed}|control").sample(list(control_questions), min(n, len(control_questions))),
            key=lambda q: q.id,
        )
        adapters_to_train[CONTROL] = ctrl

    lora_cfg = LoraTrainConfig(**{"seed": config.seed, **config.lora})
    views = {"base": base}
    for _i, (name, qs) in enumerate(adapters_to_train.items()):
        result = finetune(
            base,
            qs,
            lora_cfg,
            out / "adapters" / name,
            progress=(lambda s, t, loss, n=name: progress(f"train {n}", s, t)) if progress else None,
            metadata={"control": name == CONTROL, "specialty": name},
        )
        views[name] = base.load_adapter(result.path, name=f"xs_{name}")

    cells: dict[str, dict[str, dict]] = {}
    samples: dict[tuple[str, str], list] = {}
    trained_on = {q.id for q in adapters_to_train.get(CONTROL, [])}
    general = [q for q in control_eval_questions if q.id not in trained_on]
    extra = {} if config.matcher == "regex" else {"matcher": config.matcher}
    for model_name, pred in views.items():
        cells[model_name] = {}
        for spec in specs:
            ev = EvalConfig(model=f"{config.model}" + ("" if model_name == "base" else f"+lora:{out / 'adapters' / model_name}"),
                            data=f"{config.data}#test:{spec}", method=config.method, shuffles=config.shuffles, seed=config.seed,
                            extra=extra)  # fmt: skip
            run = evaluate(
                pred,
                test[spec],
                ev,
                out / "runs" / f"{model_name}__{spec}",
                progress=(lambda d, t, m=model_name, s=spec: progress(f"eval {m}→{s}", d, t)) if progress else None,
            )
            ss = run.samples()
            samples[(model_name, spec)] = ss
            a = M.accuracy(ss, seed=config.seed)
            cells[model_name][spec] = {"acc": a.acc, "ci_low": a.ci_low, "ci_high": a.ci_high, "n": a.n}
    for model_name in views:
        for spec in specs:
            cells[model_name][spec]["delta_vs_base"] = cells[model_name][spec]["acc"] - cells["base"][spec]["acc"]
    beats = []
    for a in specs:
        for b in specs:
            if a == b:
                continue
            p = M.paired_comparison(samples[(b, b)], samples[(a, b)], seed=config.seed)
            cells[a][b]["vs_diagonal"] = {"diff": p.diff, "p": p.p_bootstrap, "p_mcnemar": p.p_mcnemar}
            if p.diff > 0 and p.p_bootstrap < 0.05:
                beats.append({"train": a, "test": b, "diff": p.diff, "p": p.p_bootstrap})
    control_set = general_ability(views, general, config, out, extra, progress) if general else None
    general_terms = term_set(control_questions) if control_questions else set()
    summary = {
        "config": cfg,
        "specialties": specs,
        "models": list(views),
        "cells": cells,
        "control_set": control_set,
        "off_diagonal_beats_diagonal": beats,
        "pooled": pooled_effects(samples, specs, control=CONTROL in views, seed=config.seed),
        "train_sizes": {k: len(v) for k, v in adapters_to_train.items()},
        "test_sizes": {k: len(v) for k, v in test.items()},
        "term_overlap": term_overlap(train, test, general_terms),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(summary))
    heatmap(summary, out / "matrix.png")
    return summary


def general_ability(
    views: dict,
    questions: Sequence[Question],
    config: CrossSpecialtyConfig,
    out: Path,
    extra: dict,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Every model on the held-out control questions, and each adapter against the base model there
    (paired: bootstrap over questions, McNemar)."""
    runs = {}
    for model_name, pred in views.items():
        ev = EvalConfig(model=f"{config.model}" + ("" if model_name == "base" else f"+lora:{out / 'adapters' / model_name}"),
                        data=f"{config.control_eval}#general", method=config.method, shuffles=config.shuffles, seed=config.seed,
                        extra=extra)  # fmt: skip
        runs[model_name] = evaluate(pred, questions, ev, out / "runs" / f"{model_name}__control-set",
                                    progress=(lambda d, t, m=model_name: progress(f"eval {m}→control set", d, t)) if progress else None
                                    ).samples()  # fmt: skip
    table = {}
    for model_name, ss in runs.items():
        a = M.accuracy(ss, seed=config.seed)
        table[model_name] = {"acc": a.acc, "ci_low": a.ci_low, "ci_high": a.ci_high, "n": a.n}
        if model_name != "base":
            p = M.paired_comparison(runs["base"], ss, seed=config.seed)
            table[model_name]["vs_base"] = {"diff": p.diff, "ci_low": p.ci_low, "ci_high": p.ci_high, "p": p.p_bootstrap,
                                            "p_mcnemar": p.p_mcnemar, "n": p.n}  # fmt: skip
    return {"data": config.control_eval, "n_questions": len(questions), "models": table}


def pooled_effects(samples: dict[tuple[str, str], list], specs: Sequence[str], *, control: bool, seed: int = 0) -> dict:
    """The experiment's hypotheses as paired tests pooled over every test question of every specialty.

    Per test question (its mean correctness over shuffles under each model):
    - ``own_vs_other``: own-specialty adapter minus the mean of the other specialties' adapters
      (knowledge injection predicts > 0);
    - ``medical_vs_base``: mean of all specialty adapters minus the base model (a shift toward medicine);
    - ``control_vs_base`` and ``medical_vs_control`` when a control adapter was trained.
    Each entry: mean difference (accuracy points as a fraction), 95% bootstrap CI over questions, p, n.
    """
    rows: dict[str, list[float]] = {"own_vs_other": [], "medical_vs_base": []}
    if control:
        rows.update(control_vs_base=[], medical_vs_control=[])
    for b in specs:
        per = {m: M.per_question(samples[(m, b)]) for m in ["base", *specs, *([CONTROL] if control else [])]}
        for qid in sorted(per["base"]):
            own = per[b][qid]
            med = [per[a][qid] for a in specs]
            others = [per[a][qid] for a in specs if a != b]
            if others:
                rows["own_vs_other"].append(own - sum(others) / len(others))
            rows["medical_vs_base"].append(sum(med) / len(med) - per["base"][qid])
            if control:
                rows["control_vs_base"].append(per[CONTROL][qid] - per["base"][qid])
                rows["medical_vs_control"].append(sum(med) / len(med) - per[CONTROL][qid])
    out = {}
    for name, diffs in rows.items():
        if diffs:
            mean, lo, hi, p = M.bootstrap_mean_test(diffs, seed=seed)
            out[name] = {"diff": mean, "ci_low": lo, "ci_high": hi, "p": p, "n": len(diffs)}
    return out


POOLED_LABELS = {
    "own_vs_other": "own-specialty adapter − other specialties' adapters",
    "medical_vs_base": "specialty adapters (mean) − base",
    "control_vs_base": "control adapter − base",
    "medical_vs_control": "specialty adapters (mean) − control adapter",
}


def markdown(summary: dict) -> str:
    specs = summary["specialties"]
    pct = lambda x: f"{100 * x:.1f}"
    general = summary.get("control_set")
    cols = specs + ([CONTROL_SET] if general else [])
    lines = [
        "Accuracy % on each specialty's test split (rows: adapter trained on; columns: tested on), 95% CI; "
        "Δ = change vs the base model."
        + (
            f" Control set: {general['n_questions']} non-medical questions ({general['data']}) none of the adapters "
            "was trained on, Δ with its paired bootstrap p."
            if general
            else ""
        ),
        "",
        "| trained on \\ tested on | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for m in summary["models"]:
        row = [
            f"{pct(c['acc'])} ({pct(c['ci_low'])}–{pct(c['ci_high'])})"
            + ("" if m == "base" else f" Δ{100 * c['delta_vs_base']:+.1f}")
            for c in (summary["cells"][m][s] for s in specs)
        ]
        if general:
            g = general["models"][m]
            row.append(
                f"{pct(g['acc'])} ({pct(g['ci_low'])}–{pct(g['ci_high'])})"
                + ("" if m == "base" else f" Δ{100 * g['vs_base']['diff']:+.1f} p={g['vs_base']['p']:.3f}")
            )
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Off-diagonal cells that beat the diagonal (paired bootstrap p < 0.05): "
        + (
            ", ".join(
                f"{b['train']}→{b['test']} (+{100 * b['diff']:.1f}, p={b['p']:.3f})"
                for b in summary["off_diagonal_beats_diagonal"]
            )
            or "none"
        ),
        "",
        "Pooled over every test question (paired, 95% bootstrap CI over questions), accuracy points:",
        "",
        "| comparison | Δ | 95% CI | p | questions |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, e in summary.get("pooled", {}).items():
        lines.append(
            f"| {POOLED_LABELS.get(name, name)} | {100 * e['diff']:+.1f} | {100 * e['ci_low']:+.1f} to "
            f"{100 * e['ci_high']:+.1f} | {e['p']:.3f} | {e['n']} |"
        )
    lines += [
        "",
        "Clinical-term overlap: share of a test split's terms found in a train split",
        "",
        "| train \\ test | " + " | ".join(specs) + " |",
        "|---|" + "---:|" * len(specs),
    ]
    for a, row in summary["term_overlap"].items():
        lines.append(f"| {a} | " + " | ".join(f"{row[b]:.2f}" for b in specs) + " |")
    return "\n".join(lines) + "\n"


def heatmap(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    specs, models = summary["specialties"], summary["models"]
    mat = np.array([[summary["cells"][m][s]["acc"] for s in specs] for m in models])
    fig, ax = plt.subplots(figsize=(1.4 * len(specs) + 2.5, 0.6 * len(models) + 2))
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=1)
    for i in range(len(models)):
        for j in range(len(specs)):
            ax.text(
                j, i, f"{100 * mat[i, j]:.0f}", ha="center", va="center", color="white" if mat[i, j] < 0.6 else "black"
            )
    ax.set_xticks(range(len(specs)), [s.replace("_", " ") for s in specs], rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
