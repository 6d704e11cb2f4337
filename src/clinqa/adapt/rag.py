"""Retrieval-augmented prediction: `RagPredictor` puts passages from a `clinqa.adapt.retrieval` index
before each prompt it is given:

    Reference passages:
    [doc#0] text of the best passage
    [doc#3] text of the second
    <blank line>
    <the original prompt, unchanged>

trimmed to a token budget, and records the passage ids as the sample's `retrieved` annotation. With
`mode=iterative` generation becomes a reason-search-observe loop (see RagPredictor). The spec
modifier is `MODEL+rag:INDEX@k=5,mode=fused`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clinqa.adapt.retrieval import SEARCH_MODES, Hit, Index, open_index
from clinqa.errors import ClinqaError
from clinqa.models.base import (
    ContinuationScore,
    Encodes,
    FormatsChat,
    GenerationConfig,
    HasContextLimit,
    HasTokenizer,
    Predictor,
    ReportsCost,
    annotations_of,
    forward_capabilities,
    logprobs_available,
)
from clinqa.models.request import Prompt, rewritten
from clinqa.models.spec import Modifier

RAG_MODES = (*SEARCH_MODES, "iterative")
WORDS_TO_TOKENS = 1.3  # token estimate when the base predictor has no tokenizer (`encode`)
RAG_HEADER = "Reference passages:\n"
MIN_TRIMMED_WORDS = 8  # a passage cut to fit the budget keeps at least this many words, else it is dropped

# how the question of a prompt typed as plain text is found for the retrieval query
_TRAILING_ANSWER = re.compile(r"(?:^|\n)[ \t]*Answer:[ \t]*$")
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.*\S)\s*$")
_QUESTION_PREFIX = re.compile(r"^\s*Question:\s*", re.IGNORECASE)
_INSTRUCTION_WORD = re.compile(r"\banswer\b", re.IGNORECASE)


def retrieval_query(prompt: str, *, include_options: bool = False) -> str:
    """The search query for a prompt: its question stem, whitespace-normalised, then (include_options)
    the texts of the options shown. A structured prompt (clinqa.models.request.Prompt, as every
    scoring method makes) is read; plain text typed by a user is parsed (retrieval_query_from_text)."""
    if isinstance(prompt, Prompt) and prompt.stem.strip():
        shown = list(prompt.options.values()) if include_options else []
        return " ".join(" ".join([prompt.stem, *shown]).split())
    return retrieval_query_from_text(prompt, include_options=include_options)


def retrieval_query_from_text(prompt: str, *, include_options: bool = False) -> str:
    """The fallback for plain text typed by a user (CLI, the service): the question guessed from it.

    Heuristic, matched to clinqa.evaluate.prompts (letter, cloze and generate prompts):
      1. a trailing "Answer:" line is removed;
      2. if the prompt has several paragraphs (blank-line separated) and the first mentions "answer"
         without a question mark, it is an instruction (the generate prompt's) and is dropped;
      3. "Context: ..." lines (PubMedQA abstracts) are dropped: the question, not the context, is searched;
      4. the trailing block of option lines ("A. text", "B) text") is removed, its texts appended to
         the query only when include_options is True;
      5. a leading "Question:" is removed and the remaining lines joined with spaces.
    If nothing is left the whole prompt (minus a trailing "Answer:") is the query.
    """
    text = _TRAILING_ANSWER.sub("", prompt.strip()).strip()
    paragraphs = re.split(r"\n[ \t]*\n", text)
    if len(paragraphs) > 1 and _INSTRUCTION_WORD.search(paragraphs[0]) and "?" not in paragraphs[0]:
        paragraphs = paragraphs[1:]
    lines = [ln for ln in "\n".join(paragraphs).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.lstrip().startswith("Context:")]
    options: list[str] = []
    while lines and (m := _OPTION_LINE.match(lines[-1])) and len(lines) > 1:
        options.insert(0, m.group(2))
        lines.pop()
    stem = " ".join(_QUESTION_PREFIX.sub("", ln).strip() for ln in lines)
    query = " ".join([stem, *options]) if include_options else stem
    query = " ".join(query.split())
    return query or " ".join(text.split())


# -- the predictor wrapper ---------------------------------------------------------------------------
ITERATIVE_INSTRUCTION = (
    "You can search a library of medical reference passages before answering. Work in steps. In each "
    "step write one line 'Thought: <what you still need to know>' and then one line 'Search: <a short "
    "search query>'; the passages found are then shown to you as 'Observation:' lines. When you know "
    "enough, write 'Answer:' instead of 'Search:'."
)
_SEARCH_TAG = re.compile(r"\bsearch\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"\b(?:final\s+)?answer\s*:", re.IGNORECASE)
_THOUGHT_TAG = re.compile(r"\bthought\s*:\s*", re.IGNORECASE)


def parse_step(output: str) -> tuple[str, str | None, bool]:
    """(thought, search query or None, answered) from one reason-search step of the model.

    Anything from an "Observation:" the model invents on its own is ignored. The first of "Search:"
    and "Answer:" wins; a model following neither gives (its text, None, False)."""
    text = re.split(r"\bobservation\s*:", output, maxsplit=1, flags=re.IGNORECASE)[0]
    s, a = _SEARCH_TAG.search(text), _ANSWER_TAG.search(text)
    cut = min([m.start() for m in (s, a) if m] or [len(text)])
    thought = _THOUGHT_TAG.sub("", text[:cut], count=1)
    thought = " ".join(thought.split())[:1000]
    if a and (not s or a.start() < s.start()):
        return thought, None, True
    if s:
        query = s.group(1).strip().strip("<>\"'`*").strip()
        return thought, (" ".join(query.split())[:300] or None), False
    return thought, None, False


@dataclass
class _Retrieval:
    query: str
    hits: list[Hit]  # the passages in the block, in order
    block: str  # RAG_HEADER ... "\n\n", or "" when nothing fits


@dataclass
class _Trace:
    prompt: str
    question: str
    steps: list[dict] = field(default_factory=list)
    observed: list[Hit] = field(default_factory=list)
    transcript: str = ""
    done: bool = False
    stopped: str = "max_steps"

    @property
    def seen(self) -> set[str]:
        return {h.passage_id for h in self.observed}


class _LRU(OrderedDict):
    def __init__(self, maxsize: int):
        super().__init__()
        self.maxsize = maxsize

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


class RagPredictor:
    """Any predictor with retrieved passages put before its prompts.

    Every context (score_continuations), prompt (next_token_logprobs, generate) and text
    (hidden_states) becomes `RAG_HEADER + "[id] text\\n" per passage + "\\n" + original`; continuations
    and candidates are unchanged. The query is the prompt's question (see retrieval_query;
    `include_options` adds the option texts). Passages are taken best first while the
    block fits `budget_tokens` (counted with the base's `encode` when it has one, else 1.3 tokens per
    word); the first one that does not fit is cut to the remaining budget (or dropped if under 8 words).
    Retrievals are cached per prompt and per query; `annotations(prompt)` reports them.

    mode=iterative turns generate into a reason-search-observe loop: the model is asked for
    "Thought: ... Search: <query>", the wrapper appends "Observation: [id] text" lines (passages not
    seen before, `budget_tokens // steps` per step) and asks again, for up to `steps` steps or until it
    writes "Answer:". A step without a usable "Search:" searches the question itself, so a model that
    ignores the format still gets passages; a model answering before any search gets one such search.
    Then the original prompt, prefixed by every observed passage (within the budget), is generated
    with the caller's config, so the answer comes in the format the caller asked for. Scoring methods
    in iterative mode retrieve once with `search_mode`.

    Capabilities: Annotates and ReportsLogprobs (the base's answer) of its own; FORWARDED ones are the
    base's, when it has them. Nothing else passes through (shared-prefix scoring, token
    log-probabilities, adapters would bypass the passages).
    """

    FORWARDED = (Encodes, HasTokenizer, FormatsChat, HasContextLimit, ReportsCost)

    def __init__(
        self,
        base: Predictor,
        index: Index | str | Path,
        k: int = 5,
        mode: str = "fused",
        budget_tokens: int = 768,
        *,
        include_options: bool = False,
        steps: int = 3,
        search_mode: str = "fused",
        step_tokens: int = 128,
        cache_size: int = 10000,
        spec_suffix: str | None = None,
    ):
        if mode not in RAG_MODES:
            raise ClinqaError(f"unknown retrieval mode {mode!r}: use one of {', '.join(RAG_MODES)}")
        if search_mode not in SEARCH_MODES:
            raise ClinqaError(f"unknown search mode {search_mode!r}: use one of {', '.join(SEARCH_MODES)}")
        if k < 1:
            raise ClinqaError(f"k must be at least 1, got {k}")
        if budget_tokens < 1:
            raise ClinqaError(f"the token budget must be at least 1, got {budget_tokens}")
        if steps < 1:
            raise ClinqaError(f"steps must be at least 1, got {steps}")
        self.base = base
        self.index = open_index(index)
        self.k, self.mode, self.budget_tokens = int(k), mode, int(budget_tokens)
        self.include_options, self.steps, self.step_tokens = bool(include_options), int(steps), int(step_tokens)
        self.search_mode = mode if mode in SEARCH_MODES else search_mode
        self.index._check_mode(self.search_mode)
        self._records: _LRU = _LRU(cache_size)  # prompt -> _Retrieval
        self._hits: _LRU = _LRU(cache_size)  # query -> hits (before trimming)
        self._traces: _LRU = _LRU(cache_size)  # prompt -> iterative annotations
        suffix = spec_suffix or f"rag:{self.index.path}@k={self.k},mode={mode}"
        extra = {
            **base.info.extra,
            "rag": {"index": str(self.index.path), "k": self.k, "mode": mode, "budget_tokens": self.budget_tokens},
        }
        self.info = dataclasses.replace(base.info, spec=f"{base.info.spec}+{suffix}", extra=extra)
        self._encode = base.encode if isinstance(base, Encodes) else None
        forward_capabilities(self, base, self.FORWARDED)

    @property
    def logprobs_available(self) -> bool:
        return logprobs_available(self.base)

    def __repr__(self) -> str:
        return f"RagPredictor({self.base!r}, {self.index!r}, k={self.k}, mode={self.mode!r})"

    # -- budget ---------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        if self._encode is not None:
            return len(self._encode(text))
        return math.ceil(WORDS_TO_TOKENS * len(text.split()))

    def passage_block(
        self,
        hits: Sequence[Hit],
        budget: int | None = None,
        *,
        prefix: str = RAG_HEADER,
        line: str = "[{id}] {text}",
        suffix: str = "\n",
    ) -> tuple[str, list[Hit]]:
        """(block, hits kept): as many passages as fit the budget, best first, the last maybe cut."""
        budget = self.budget_tokens if budget is None else budget
        lines: list[str] = []
        kept: list[Hit] = []

        def render(extra: str | None = None) -> str:
            body = lines + ([extra] if extra is not None else [])
            return prefix + "".join(f"{ln}\n" for ln in body) + suffix

        for h in hits:
            text = " ".join(h.text.split())
            full = line.format(id=h.passage_id, text=text)
            if self.count_tokens(render(full)) <= budget:
                lines.append(full)
                kept.append(h)
                continue
            words = text.split()
            lo, hi = 0, len(words) - 1  # the most words that fit, by bisection
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if (
                    self.count_tokens(render(line.format(id=h.passage_id, text=" ".join(words[:mid]) + " ...")))
                    <= budget
                ):
                    lo = mid
                else:
                    hi = mid - 1
            if lo >= MIN_TRIMMED_WORDS:
                lines.append(line.format(id=h.passage_id, text=" ".join(words[:lo]) + " ..."))
                kept.append(h)
            break
        return (render() if lines else ""), kept

    # -- single-shot retrieval ------------------------------------------------------------------
    def _search(self, queries: Sequence[str], k: int) -> dict[str, list[Hit]]:
        got = {q: self._hits[(q, k)] for q in dict.fromkeys(queries) if (q, k) in self._hits}
        todo = [q for q in dict.fromkeys(queries) if q not in got]
        if todo:
            for q, hits in zip(todo, self.index.search_many(todo, k=k, mode=self.search_mode)):
                got[q] = hits
                self._hits.put((q, k), hits)
        return got

    def retrieve(self, prompts: Sequence[str]) -> list[_Retrieval]:
        got = {p: self._records[p] for p in dict.fromkeys(prompts) if p in self._records}
        todo = [p for p in dict.fromkeys(prompts) if p not in got]
        if todo:
            queries = {p: retrieval_query(p, include_options=self.include_options) for p in todo}
            found = self._search(list(queries.values()), self.k)
            for p in todo:
                block, kept = self.passage_block(found[queries[p]])
                got[p] = _Retrieval(queries[p], kept, block)
                self._records.put(p, got[p])
        return [got[p] for p in prompts]

    def rewrite(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt with its retrieved passages put before it (unchanged when none fit)."""
        return [rewritten(p, r.block + p) for p, r in zip(prompts, self.retrieve(prompts))]

    # -- the Predictor protocol -----------------------------------------------------------------
    def score_continuations(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[ContinuationScore]]:
        contexts = self.rewrite([ctx for ctx, _ in groups])
        return self.base.score_continuations([(c, conts) for c, (_, conts) in zip(contexts, groups)])

    def next_token_logprobs(self, contexts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        return self.base.next_token_logprobs(self.rewrite(contexts), candidates)

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
        if self.mode == "iterative":
            return self._generate_iterative(list(prompts), config or GenerationConfig())
        return self.base.generate(self.rewrite(prompts), config)

    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[np.ndarray]:
        return self.base.hidden_states(self.rewrite(texts), layers)

    def annotations(self, prompt: str) -> dict:
        """{"retrieved": [passage ids], "rag_mode": mode, "rag_query": query}; for a prompt generated
        in iterative mode {"steps": [...], "retrieved": [...], "rag_mode": "iterative", "stopped": why}.
        The wrapped predictor's own annotations (of the rewritten prompt) are kept."""
        if prompt in self._traces:
            out = dict(self._traces[prompt])
            rewritten_prompt = out.pop("_final_prompt")
        else:
            r = self.retrieve([prompt])[0]
            rewritten_prompt = rewritten(prompt, r.block + prompt)
            out = {"retrieved": [h.passage_id for h in r.hits], "rag_mode": self.search_mode, "rag_query": r.query}
        return {**annotations_of(self.base, rewritten_prompt), **out}

    # -- iterative reason-search-observe ---------------------------------------------------------
    def step_prompt(self, trace: _Trace) -> str:
        return rewritten(
            trace.prompt, f"{ITERATIVE_INSTRUCTION}\n\nTask:\n{trace.prompt}\n\n{trace.transcript}Thought:"
        )

    def _generate_iterative(self, prompts: list[str], config: GenerationConfig) -> list[str]:
        traces = [_Trace(p, retrieval_query(p, include_options=self.include_options)) for p in prompts]
        step_config = dataclasses.replace(
            config, max_new_tokens=self.step_tokens, stop=tuple(dict.fromkeys([*config.stop, "Observation:"]))
        )
        step_budget = max(self.budget_tokens // self.steps, 1)
        for step in range(1, self.steps + 1):
            active = [t for t in traces if not t.done]
            if not active:
                break
            outputs = self.base.generate([self.step_prompt(t) for t in active], step_config)
            searches: list[tuple[_Trace, dict]] = []
            for t, out in zip(active, outputs):
                out = out or ""
                thought, query, answered = parse_step(out)
                rec = {
                    "step": step,
                    "thought": thought,
                    "query": query,
                    "query_source": "model" if query else None,
                    "retrieved": [],
                    "output": out[:1000],
                }
                t.steps.append(rec)
                if answered:
                    t.done, t.stopped = True, "answer"
                    if t.observed:
                        continue
                    rec["note"] = "answered before any search: searched the question once"
                if not query:
                    rec["query"], rec["query_source"] = t.question, "fallback"
                searches.append((t, rec))
            if not searches:
                continue
            depth = self.k + max(len(t.observed) for t, _ in searches)
            found = self.index.search_many([rec["query"] for _, rec in searches], k=depth, mode=self.search_mode)
            for (t, rec), hits in zip(searches, found):
                seen = t.seen
                new = [h for h in hits if h.passage_id not in seen][: self.k]
                obs, kept = self.passage_block(
                    new, step_budget, prefix="", line="Observation: [{id}] {text}", suffix=""
                )
                if not kept:
                    obs = "Observation: (no new passages)\n"
                rec["retrieved"] = [h.passage_id for h in kept]
                t.observed += kept
                t.transcript += f"Thought: {rec['thought']}\nSearch: {rec['query']}\n{obs}"
        finals = []
        for t in traces:
            block, kept = self.passage_block(t.observed)
            finals.append(rewritten(t.prompt, block + t.prompt))
            self._traces.put(
                t.prompt,
                {
                    "rag_mode": "iterative",
                    "steps": t.steps,
                    "retrieved": [h.passage_id for h in t.observed],
                    "in_prompt": [h.passage_id for h in kept],
                    "stopped": t.stopped,
                    "_final_prompt": finals[-1],
                },
            )
        return self.base.generate(finals, config)


# -- the spec modifier ---------------------------------------------------------------------------------
_PARAMS = {
    "k": "passages per prompt (int)",
    "mode": "/".join(RAG_MODES),
    "budget": "token budget for the passages (int)",
    "steps": "iterative steps (int)",
    "options": "include option texts in the query (true/false)",
    "search": "search mode for iterative steps (bm25/dense/fused)",
}


def _int_param(params: Mapping[str, str], key: str, default: int, where: str) -> int:
    if key not in params:
        return default
    try:
        v = int(params[key])
    except ValueError:
        raise ClinqaError(f"{where}: {key} must be an integer, got {params[key]!r}") from None
    if v < 1:
        raise ClinqaError(f"{where}: {key} must be at least 1, got {v}")
    return v


def _bool_param(params: Mapping[str, str], key: str, default: bool, where: str) -> bool:
    if key not in params:
        return default
    v = params[key].strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ClinqaError(f"{where}: {key} must be true or false, got {params[key]!r}")


def apply_modifier(predictor: Predictor, modifier: Modifier) -> RagPredictor:
    """`+rag:INDEX@k=5,mode=fused,budget=768` (also steps=3, options=true, search=fused for iterative).

    INDEX is a folder made by build_index, or `bundled` (the bundled corpus, indexed on first use
    into the clinqa cache)."""
    where = str(modifier)
    unknown = sorted(set(modifier.params) - set(_PARAMS) - {"budget_tokens"})
    if unknown:
        raise ClinqaError(
            f"{where}: unknown parameter(s) {', '.join(unknown)}; rag takes "
            + ", ".join(f"{k} ({v})" for k, v in _PARAMS.items())
        )
    p = modifier.params
    mode = p.get("mode", "fused")
    if mode not in RAG_MODES:
        raise ClinqaError(f"{where}: unknown mode {mode!r}: use one of {', '.join(RAG_MODES)}")
    search = p.get("search", "fused")
    if search not in SEARCH_MODES:
        raise ClinqaError(f"{where}: unknown search mode {search!r}: use one of {', '.join(SEARCH_MODES)}")
    budget = _int_param(p, "budget", _int_param(p, "budget_tokens", 768, where), where)
    return RagPredictor(
        predictor,
        open_index(modifier.target),
        k=_int_param(p, "k", 5, where),
        mode=mode,
        budget_tokens=budget,
        include_options=_bool_param(p, "options", False, where),
        steps=_int_param(p, "steps", 3, where),
        search_mode=search,
        spec_suffix=where,
    )


# -- CLI helpers ----------------------------------------------------------------------------------------

__all__ = [
    "ITERATIVE_INSTRUCTION",
    "RAG_HEADER",
    "RAG_MODES",
    "RagPredictor",
    "apply_modifier",
    "parse_step",
    "retrieval_query",
    "retrieval_query_from_text",
]
