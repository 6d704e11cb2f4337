"""How adapters shift the probability of clinical terms: domain shift or knowledge injection?

If medical adapters raise clinical-term log-probability in every specialty (not only their own) and
a non-medical control adapter does not, the gain from specialty fine-tuning is a general shift
toward medical language rather than specialty knowledge (the S-MedQA hypothesis). Both are tested
directly as paired contrasts over the same term occurrences: an adapter named after a specialty on its
own specialty's terms vs the other specialty adapters on the same terms, and the specialty adapters vs
the control adapter. One model object serves all adapters (switched, never copied); each text is read
in one forward pass.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate.metrics import grouped_bootstrap_ci
from clinqa.models.base import ReadsTokenLogprobs
from clinqa.specialties.taxonomy import resolve_specialty


def question_text(q: Question) -> str:
    """The text whose terms are read: the question and its correct answer."""
    return f"{q.question.strip()} Answer: {q.options[q.answer]}"


def clinical_terms(
    questions: Sequence[Question], control: Sequence[Question] = (), *, min_count: int = 2, max_terms: int = 40
) -> dict[str, list[str]]:
    """Per specialty, the frequent content words of its questions and answers that are medical
    vocabulary: not English stop words, at least 4 letters, and never used in the non-medical control set."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    def words(text: str) -> list[str]:
        return [w for w in re.findall(r"[a-z][a-z\-]{3,}", text.lower()) if w not in ENGLISH_STOP_WORDS]

    general = {w for q in control for w in words(question_text(q) + " " + " ".join(q.options.values()))}
    by_spec: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for q in questions:
        if not q.specialties:
            continue
        for w in set(words(question_text(q))):
            if w not in general:
                by_spec[q.specialties[0]][w] += 1
    out = {}
    for spec, counts in sorted(by_spec.items()):
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        out[spec] = ranked[:max_terms]
    return out


def term_occurrences(text: str, terms: Sequence[str]) -> list[tuple[str, int, int]]:
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(terms, key=len, reverse=True))) + r")\b", re.I)
    return [(m.group(1).lower(), m.start(), m.end()) for m in pattern.finditer(text)] if terms else []


def occurrence_logprobs(predictor, texts: Sequence[str], terms: Sequence[str]) -> list[list[tuple[str, float]]]:
    """Per text, (term, log P(term | preceding text)) for every occurrence: the sum over the tokens
    that overlap the term's characters (a term that starts the text has no context and is skipped)."""
    if not isinstance(predictor, ReadsTokenLogprobs):
        raise ClinqaError("token-probability analysis needs a local model backend (token log-probabilities)")
    read = predictor.token_logprobs(list(texts))
    out = []
    for text, r in zip(texts, read):
        occ = []
        for term, start, end in term_occurrences(text, terms):
            idx = [k for k, (a, b) in enumerate(r["offsets"]) if a < end and b > start and b > a]
            lps = [float(r["logprobs"][k]) for k in idx]
            if idx and not any(np.isnan(lps)):
                occ.append((term, sum(lps)))
        out.append(occ)
    return out


@dataclass
class ShiftRow:
    specialty: str  # or "pooled"
    model: str
    n: int  # term occurrences
    base: float  # mean log-probability under the base model
    adapted: float
    shift: float
    ci_low: float
    ci_high: float


@dataclass
class Contrast:
    """A paired difference in log-probability (nats) over term occurrences, pooled across specialties."""

    name: str  # own_vs_other | medical_vs_control
    description: str
    n: int
    diff: float
    ci_low: float
    ci_high: float


@dataclass
class TokenShiftResult:
    rows: list[ShiftRow] = field(default_factory=list)
    terms: dict[str, list[str]] = field(default_factory=dict)
    contrasts: list[Contrast] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [
            "| specialty | model | occurrences | base mean log p | adapted | shift | 95% CI |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.specialty} | {r.model} | {r.n} | {r.base:.3f} | {r.adapted:.3f} | {r.shift:+.3f} | {r.ci_low:+.3f} to {r.ci_high:+.3f} |"
            )
        if self.contrasts:
            lines += [
                "",
                "| contrast (same term occurrences, nats) | occurrences | difference | 95% CI |",
                "|---|---:|---:|---:|",
            ]
            for c in self.contrasts:
                lines.append(f"| {c.description} | {c.n} | {c.diff:+.3f} | {c.ci_low:+.3f} to {c.ci_high:+.3f} |")
        return "\n".join(lines) + "\n"


def _specialty_of(name: str, specs: Sequence[str]) -> str | None:
    """The specialty an adapter is named after (its folder name: an id or alias), if it is one of ``specs``."""
    try:
        sid = resolve_specialty(name)
    except ClinqaError:
        return None
    return sid if sid in specs else None


def _group_labels(groups: dict[str, list] | None, s: str, n: int) -> list:
    """The question of each of specialty ``s``'s ``n`` occurrences; without ``groups`` each stands alone."""
    return [(s, g) for g in groups[s]] if groups else [(s, k) for k in range(n)]


def contrasts(
    values: dict[str, dict[str, list[float]]],
    specs: Sequence[str],
    adapted: Sequence[str],
    *,
    groups: dict[str, list] | None = None,
    control: str = "control",
    seed: int = 0,
) -> list[Contrast]:
    """own_vs_other: on each specialty's terms, its own adapter minus the mean of the other specialty
    adapters (knowledge injection predicts > 0); medical_vs_control: the mean of the specialty adapters
    minus the control adapter (a shift toward medical language predicts > 0). ``groups[s]`` names the
    question of each occurrence; the intervals resample questions (each occurrence alone without it)."""
    medical = {name: s for name in adapted if (s := _specialty_of(name, specs))}
    out = []
    own: list[float] = []
    own_groups: list = []
    for name, s in medical.items():
        others = [values[o][s] for o in medical if o != name]
        if others and all(len(v) == len(values[name][s]) for v in others):
            own += list(np.array(values[name][s]) - np.mean(others, axis=0))
            own_groups += _group_labels(groups, s, len(values[name][s]))
    if own:
        lo, hi = grouped_bootstrap_ci(own, own_groups, seed=seed)
        out.append(
            Contrast(
                "own_vs_other",
                "own-specialty adapter − other specialty adapters",
                len(own),
                float(np.mean(own)),
                lo,
                hi,
            )
        )
    if control in adapted and medical:
        med: list[float] = []
        med_groups: list = []
        for s in specs:
            rows = [values[m][s] for m in medical]
            if all(len(r) == len(values[control][s]) for r in rows):
                med += list(np.mean(rows, axis=0) - np.array(values[control][s]))
                med_groups += _group_labels(groups, s, len(values[control][s]))
        if med:
            lo, hi = grouped_bootstrap_ci(med, med_groups, seed=seed)
            out.append(
                Contrast(
                    "medical_vs_control",
                    "specialty adapters (mean) − control adapter",
                    len(med),
                    float(np.mean(med)),
                    lo,
                    hi,
                )
            )
    return out


def token_shift(
    base,
    adapted: dict[str, object],
    questions: Sequence[Question],
    terms: dict[str, list[str]],
    *,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> TokenShiftResult:
    """Mean clinical-term log-probability per specialty under base and each adapted predictor, with
    the paired shift and a bootstrap CI that resamples questions (a question's term occurrences stay
    together); plus a pooled row per model and the paired contrasts."""
    specs = [s for s in terms if terms[s]]
    texts = {s: [question_text(q) for q in questions if q.specialties and q.specialties[0] == s] for s in specs}
    models = {"base": base, **adapted}
    values: dict[str, dict[str, list[float]]] = {}
    groups: dict[str, list[int]] = {}  # per specialty, the text (question) index of each occurrence
    for i, (name, pred) in enumerate(models.items()):
        values[name] = {}
        for s in specs:
            occ = occurrence_logprobs(pred, texts[s], terms[s])
            values[name][s] = [lp for per_text in occ for _, lp in per_text]
            which = [t for t, per_text in enumerate(occ) for _ in per_text]
            if groups.setdefault(s, which) != which:
                raise ClinqaError(
                    f"{name} read a different set of {s} term occurrences than the base model; "
                    "adapters must share the base model's tokenizer"
                )
        if progress:
            progress(i + 1, len(models))
    result = TokenShiftResult(terms={s: terms[s] for s in specs})
    for name in adapted:
        pooled_b, pooled_a, pooled_g = [], [], []
        for s in specs + ["pooled"]:
            if s == "pooled":
                b, a, g = np.array(pooled_b), np.array(pooled_a), pooled_g
            else:
                b, a, g = np.array(values["base"][s]), np.array(values[name][s]), [(s, t) for t in groups[s]]
                pooled_b += list(b)
                pooled_a += list(a)
                pooled_g += g
            if len(b) == 0:
                continue
            lo, hi = grouped_bootstrap_ci(a - b, g, seed=seed)
            result.rows.append(
                ShiftRow(s, name, len(b), float(b.mean()), float(a.mean()), float((a - b).mean()), lo, hi)
            )
    result.contrasts = contrasts(values, specs, list(adapted), groups=groups, seed=seed)
    return result


def plot_shift(result: TokenShiftResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in result.rows))
    specs = list(dict.fromkeys(r.specialty for r in result.rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(specs) + 2), 4))
    width = 0.8 / max(len(models), 1)
    for j, m in enumerate(models):
        rows = {r.specialty: r for r in result.rows if r.model == m}
        xs = [i + j * width for i, s in enumerate(specs) if s in rows]
        ys = [rows[s].shift for s in specs if s in rows]
        err = [
            [rows[s].shift - rows[s].ci_low for s in specs if s in rows],
            [rows[s].ci_high - rows[s].shift for s in specs if s in rows],
        ]
        style = {"color": "0.6", "hatch": "//"} if m == "control" else {}  # the control adapter stands out
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=m, **style)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(
        [i + width * (len(models) - 1) / 2 for i in range(len(specs))],
        [s.replace("_", " ") for s in specs],
        rotation=30,
        ha="right",
    )
    ax.set_ylabel("shift in mean log p(term) vs base")
    ax.set_title("clinical-term probability shift by adapter")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
