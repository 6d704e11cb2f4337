"""Stage 1 of the records pipeline: the `Selector` protocol and the selectors that pick the record lines
a question needs.

A selector takes a question and a record's lines (``[(resource id, rendered line)]``, `render_record`)
and returns the chosen lines with their scores, best first (`select`); `run` also says how many LLM
tokens that cost, `scores` gives every line's score (what `tune_threshold` sweeps), and `describe`
is the selector's settings as stored in a run folder's config (a changed selector is a new run).

- `LLMSelector(predictor, threshold=0.5)`: P(" yes") normalised over " yes"/" no" after SELECT_PROMPT.
- `RetrievalSelector("bm25" | "embedding", top_k=10, threshold=None)`: bm25s or MiniLM cosine, no LLM.
- `FullRecordBaseline()`: every line (stage 2 truncates to the window).

`clinqa.records.selector_factory.make_selector` builds any of them from settings (the CLI and the
service both use it)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from clinqa.errors import ClinqaError
from clinqa.models.base import Predictor, SharesPrefix
from clinqa.records.fhir import PatientRecord
from clinqa.records.lines import Line, _by_patient, _clean_question, _LineCache, count_tokens, quote_line
from clinqa.records.metrics import prf
from clinqa.records.questions import RecordQuestion

SELECT_PROMPT = (
    "Question: {question}\nPatient record entry:\n<<<{line}>>>\nIs this entry needed to answer the question? Answer:"
)
YES, NO = " yes", " no"


@dataclass(frozen=True)
class Selected:
    """A record line chosen by stage 1: the resource id and the selector's score (higher = more relevant)."""

    id: str
    score: float


@runtime_checkable
class Selector(Protocol):
    """What stage 1 is: LLMSelector, RetrievalSelector and FullRecordBaseline all satisfy it
    (``isinstance(x, Selector)`` checks the methods are there). An object with only `select` is still
    accepted where a selector is taken (its token count is 0 and its description its class name)."""

    kind: str  # "llm" | "retrieval" | "full": the "kind" of `describe()`

    def describe(self) -> dict[str, Any]:
        """The settings that identify this selector in a run's config (JSON-able)."""
        ...

    def scores(self, question: str, lines: Sequence[Line]) -> list[float]:
        """Every line's score (higher = more relevant), in the order of `lines`."""
        ...

    def run(self, question: str, lines: Sequence[Line]) -> tuple[list[Selected], int]:
        """(the selected lines, best first; LLM tokens processed)."""
        ...

    def select(self, question: str, lines: Sequence[Line]) -> list[Selected]:
        """The selected lines, best first."""
        ...


def select_prompt(question: str, line: str) -> str:
    """The stage-1 prompt for one (question, line) pair (ends with "Answer:"; " yes"/" no" follow)."""
    return SELECT_PROMPT.format(question=_clean_question(question), line=quote_line(line)[3:-3])


class LLMSelector:
    """Stage 1 by a language model: P(yes) that a line is needed, normalised over " yes" and " no".

    `threshold`: lines with P(yes) >= threshold are selected (tune it with `tune_threshold`).
    `max_lines`: optionally keep only the best-scoring lines. `min_lines`: when fewer lines than this
    pass the threshold, the best-scoring ones up to `min_lines` are kept anyway (a record always gives
    stage 2 something to read; 0, the default, lets stage 1 select nothing, and stage 2 then says the
    answer is not in the record). `chunk`: pairs per predictor call."""

    kind = "llm"

    def __init__(self, predictor: Predictor, threshold: float = 0.5, *, max_lines: int | None = None,
                 min_lines: int = 0, chunk: int = 512):  # fmt: skip
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if min_lines < 0 or (max_lines is not None and min_lines > max_lines):
            raise ValueError(f"min_lines must be between 0 and max_lines, got {min_lines}")
        self.predictor = predictor
        self.threshold = float(threshold)
        self.max_lines = max_lines
        self.min_lines = int(min_lines)
        self.chunk = max(1, int(chunk))

    def describe(self) -> dict[str, Any]:
        d = {"kind": self.kind, "model": self.predictor.info.spec, "threshold": self.threshold,
             "max_lines": self.max_lines, "prompt": SELECT_PROMPT}  # fmt: skip
        if self.min_lines:  # only when set: runs made before min_lines existed keep their identity
            d["min_lines"] = self.min_lines
        return d

    def prompts(self, question: str, lines: Sequence[Line]) -> list[str]:
        return [select_prompt(question, text) for _, text in lines]

    def _scores(self, question: str, lines: Sequence[Line]) -> tuple[list[float], int]:
        prompts = self.prompts(question, lines)
        # the question comes first, so a backend that can share it computes it once per packed batch
        shared = self.predictor.next_token_logprobs_shared if isinstance(self.predictor, SharesPrefix) else None
        cut = prompts[0].find("<<<") if prompts else -1
        prefix = prompts[0][:cut] if cut > 0 else ""
        scores: list[float] = []
        for start in range(0, len(prompts), self.chunk):
            chunk = prompts[start : start + self.chunk]
            if shared is not None and prefix and all(p.startswith(prefix) for p in chunk):
                lp = shared(prefix, [p[len(prefix) :] for p in chunk], [YES, NO])
            else:
                lp = self.predictor.next_token_logprobs(chunk, [YES, NO])
            lp = np.asarray(lp, dtype=np.float64)
            scores += (1.0 / (1.0 + np.exp(lp[:, 1] - lp[:, 0]))).tolist()
        return scores, sum(count_tokens(self.predictor, prompts))

    def scores(self, question: str, lines: Sequence[Line]) -> list[float]:
        """P(yes) for every line, in order."""
        return self._scores(question, lines)[0]

    def run_scored(self, question: str, lines: Sequence[Line]) -> tuple[list[Selected], int, list[float]]:
        """(selected lines, best first; LLM tokens processed; P(yes) of every line, in order): `run` with
        the scores it chose from, for measures that need no threshold (the forgetting experiment's
        average precision)."""
        scores, tokens = self._scores(question, lines)
        picked = _pick(lines, scores, threshold=self.threshold, top_k=self.max_lines)
        if len(picked) < self.min_lines:
            picked = _pick(lines, scores, threshold=None, top_k=self.min_lines)
        return picked, tokens, scores

    def run(self, question: str, lines: Sequence[Line]) -> tuple[list[Selected], int]:
        """(selected lines, best first; LLM tokens processed)."""
        picked, tokens, _ = self.run_scored(question, lines)
        return picked, tokens

    def select(self, question: str, lines: Sequence[Line]) -> list[Selected]:
        return self.run(question, lines)[0]


def _pick(lines: Sequence[Line], scores: Sequence[float], *, threshold: float | None, top_k: int | None,
          min_score: float | None = None) -> list[Selected]:  # fmt: skip
    order = sorted(range(len(lines)), key=lambda i: (-scores[i], i))
    out = []
    for i in order:
        s = float(scores[i])
        if threshold is not None and s < threshold:
            break
        if min_score is not None and s <= min_score:
            break
        if top_k is not None and len(out) >= top_k:
            break
        out.append(Selected(lines[i][0], s))
    return out


class RetrievalSelector:
    """Stage 1 by retrieval over the record's lines: BM25 (bm25s, English stopwords) or cosine similarity
    of MiniLM embeddings. Keeps the `top_k` best lines, or (with `threshold`) every line scoring at
    least `threshold` (capped at `top_k` if both are given). BM25 never selects a line with score 0 (no
    word in common with the question), so a question about something absent can select nothing.
    Indexes and line embeddings are cached per record (by content) for repeated questions."""

    kind = "retrieval"

    def __init__(
        self, mode: str = "bm25", top_k: int | None = 10, threshold: float | None = None, *, cache_size: int = 8
    ):
        if mode not in ("bm25", "embedding"):
            raise ValueError(f"mode must be 'bm25' or 'embedding', got {mode!r}")
        if top_k is None and threshold is None:
            raise ValueError("give top_k, threshold or both")
        self.mode = mode
        self.top_k = top_k
        self.threshold = threshold
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "mode": self.mode, "top_k": self.top_k, "threshold": self.threshold}

    def _cached(self, lines: Sequence[Line], build: Callable[[], Any]) -> Any:
        key = hashlib.sha1("\n".join(f"{i}\t{t}" for i, t in lines).encode()).hexdigest()
        with self._lock:  # the service may call one selector from several threads
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = build()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return value

    def scores(self, question: str, lines: Sequence[Line]) -> list[float]:
        if not lines:
            return []
        if self.mode == "bm25":
            from clinqa.adapt.retrieval import import_bm25s

            bm25s = import_bm25s()

            def build():
                retriever = bm25s.BM25()
                retriever.index(_bm25_tokens([t for _, t in lines]), show_progress=False)
                return retriever

            retriever = self._cached(lines, build)
            query = _bm25_tokens([question])[0]
            if not query:
                return [0.0] * len(lines)
            return [float(s) for s in retriever.get_scores(query)]
        from clinqa.models.embed import embed_texts

        vectors = self._cached(lines, lambda: embed_texts([t for _, t in lines]))
        q = embed_texts([question])[0]
        return [float(s) for s in vectors @ q]

    def run(self, question: str, lines: Sequence[Line]) -> tuple[list[Selected], int]:
        scores = self.scores(question, lines)
        return _pick(lines, scores, threshold=self.threshold, top_k=self.top_k,
                     min_score=0.0 if self.mode == "bm25" else None), 0  # fmt: skip

    def select(self, question: str, lines: Sequence[Line]) -> list[Selected]:
        return self.run(question, lines)[0]


# Words of nearly every question that say nothing about which line answers it (the Patient line would
# match "patient" for every question), on top of bm25s's English stopwords.
BM25_EXTRA_STOPWORDS = ("patient", "record", "recorded", "records", "what", "which", "when", "how", "has", "have",
                        "does", "did", "ever", "value", "values", "result", "results")  # fmt: skip


def _stem(token: str) -> str:
    """A crude plural folding so "medications" meets "medication": enough for short clinical lines."""
    if len(token) > 4 and token.endswith("ies"):
        return token[:-3] + "y"
    if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


def _bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    """The shared BM25 tokenizer with the records settings: English stopwords plus BM25_EXTRA_STOPWORDS,
    CamelCase resource types split ("MedicationRequest" -> "Medication Request"), plurals folded."""
    from clinqa.adapt.retrieval import bm25_tokenize

    return bm25_tokenize(texts, extra_stopwords=BM25_EXTRA_STOPWORDS, split_camel_case=True, fold=_stem)


class FullRecordBaseline:
    """Not a selection: every line goes to stage 2, which truncates to the model's window (keeping the
    Patient line and the most recent lines)."""

    kind = "full"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def scores(self, question: str, lines: Sequence[Line]) -> list[float]:
        return [1.0] * len(lines)

    def run(self, question: str, lines: Sequence[Line]) -> tuple[list[Selected], int]:
        return [Selected(rid, 1.0) for rid, _ in lines], 0

    def select(self, question: str, lines: Sequence[Line]) -> list[Selected]:
        return self.run(question, lines)[0]


def _run_selector(selector: Selector, question: str, lines: Sequence[Line]) -> tuple[list[Selected], int]:
    run = getattr(selector, "run", None)
    if callable(run):
        return run(question, lines)
    return list(selector.select(question, lines)), 0


def _describe(selector: Selector) -> dict[str, Any]:
    d = getattr(selector, "describe", None)
    return d() if callable(d) else {"kind": type(selector).__name__}


def selection_examples(records: Mapping[str, PatientRecord] | Sequence[PatientRecord],
                       questions: Sequence[RecordQuestion]) -> list[tuple[str, list[Line], list[str]]]:  # fmt: skip
    """(question, the patient's lines, relevant ids) for each question, the input of `tune_threshold`."""
    by_patient = _by_patient(records)
    lines = _LineCache(by_patient)
    return [(q.question, lines[q.patient_id], list(q.relevant_ids)) for q in questions]


def tune_threshold(selector: Selector, examples: Sequence[tuple[str, Sequence[Line], Iterable[str]]],
                   *, grid: Sequence[float] | None = None, max_candidates: int = 2000) -> dict[str, float]:  # fmt: skip
    """Set `selector.threshold` to the value that maximises micro F1 of the selection over `examples`
    ((question, lines, relevant ids), validation questions) and return {"threshold", "precision",
    "recall", "f1"}. Candidate thresholds: the distinct scores (at most `max_candidates` quantiles of
    them) or `grid`; ties go to the higher threshold (fewer lines for stage 2). The selector's own cap
    (`max_lines` / `top_k`), an LLM selector's `min_lines` and BM25's no-zero-score rule apply as in
    `select`."""
    llm = isinstance(selector, LLMSelector)
    cap = getattr(selector, "max_lines", None) if llm else getattr(selector, "top_k", None)
    least = selector.min_lines if llm else 0
    floor = 0.0 if getattr(selector, "mode", None) == "bm25" else None
    per_example = []
    n_relevant = 0
    all_scores = []
    for question, lines, relevant in examples:
        scores = np.asarray(selector.scores(question, lines), dtype=np.float64)
        rel = set(relevant)
        flags = np.array([lid in rel for lid, _ in lines], dtype=bool)
        n_relevant += int(flags.sum())
        keep = scores > floor if floor is not None else np.ones(len(scores), dtype=bool)
        order = np.argsort(-scores[keep], kind="stable")
        ranked, ranked_rel = scores[keep][order], flags[keep][order]
        per_example.append((ranked, np.concatenate([[0], np.cumsum(ranked_rel)])))
        all_scores.append(ranked)
    pool = np.unique(np.concatenate(all_scores)) if all_scores else np.zeros(0)
    if grid is not None:
        cands = np.unique(np.asarray(list(grid), dtype=np.float64))
    elif len(pool) > max_candidates:
        cands = np.unique(np.quantile(pool, np.linspace(0, 1, max_candidates)))
    else:
        cands = pool
    if len(cands) == 0:
        raise ClinqaError("tune_threshold needs at least one example with scored record lines")
    cands = cands[::-1]  # high to low: ties keep the higher threshold
    tp = np.zeros(len(cands))
    chosen = np.zeros(len(cands))
    for ranked, cum in per_example:
        n = np.searchsorted(-ranked, -cands, side="right")  # lines scoring >= each threshold
        n = np.maximum(n, min(least, len(ranked)))  # an LLM selector's floor: its best min_lines lines
        if cap is not None:
            n = np.minimum(n, cap)
        tp += cum[n]
        chosen += n
    best_i, best = 0, None
    for i in range(len(cands)):
        m = prf(int(tp[i]), int(chosen[i] - tp[i]), int(n_relevant - tp[i]))
        if best is None or m["f1"] > best["f1"] + 1e-12:
            best_i, best = i, m
    t = float(cands[best_i])
    selector.threshold = t
    return {"threshold": t, "precision": best["precision"], "recall": best["recall"], "f1": best["f1"]}  # type: ignore[index]


def tuning_key(selector: Selector, examples: Sequence[tuple[str, Sequence[Line], Iterable[str]]]) -> dict[str, Any]:
    """What a `tune_threshold` result depends on: the selector's settings other than the threshold and
    a digest of the examples (questions, every record line, relevant ids). `records eval --tune`
    records it with the result in the run's run.json ("tuning"), so a rerun finds it (`earlier_tuning`)."""
    from clinqa.runs import digest

    settings = {k: v for k, v in _describe(selector).items() if k != "threshold"}
    return {
        "selector": settings,
        "examples": digest([[q, [list(line) for line in lines], sorted(rel)] for q, lines, rel in examples]),
    }


def earlier_tuning(out: str | Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The tuning a run folder recorded (run.json "tuning") with the same `tuning_key`, or None (no
    run there yet, or tuned with other examples or selector settings): a resumed run need not score
    every line of its tuning questions again."""
    from clinqa.runs import RUN_FILE, read_meta

    if not (Path(out) / RUN_FILE).is_file():
        return None
    return matching_tuning(read_meta(out).get("tuning"), key)


def matching_tuning(tuning: Any, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """`tuning` (a `tune_threshold` result stored as JSON with its `tuning_key`) when it holds a
    threshold and the same key, else None."""
    from clinqa.runs import plain

    if not isinstance(tuning, dict) or "threshold" not in tuning:
        return None
    same = all(tuning.get(k) == json.loads(json.dumps(plain(v))) for k, v in key.items())  # as JSON holds it
    return tuning if same else None
