"""Two-stage question answering over one patient's FHIR record, with a full-record baseline.

Stage 1 picks the record lines (one rendered line per resource, `render_record`) a question needs;
stage 2 answers from those lines only, citing them:

    from clinqa.adapt import load_predictor
    from clinqa.records import load_records
    from clinqa.records.pipeline import LLMSelector, RetrievalSelector, FullRecordBaseline, answer_question

    model = load_predictor("default")
    record = load_records("bundle.json")[0]
    result = answer_question(model, record, "What is the patient's most recent hemoglobin A1c?",
                             selector=RetrievalSelector("bm25", top_k=8))
    result.answer, result.citations, result.timings, result.tokens

Selectors (`select(question, lines) -> [Selected(id, score)]`, `lines` = [(resource id, line)]):

- `LLMSelector(predictor, threshold=0.5)`: for each line, P(" yes") normalised over " yes"/" no" as
  the next token after SELECT_PROMPT, one forward pass per (question, line) pair, all pairs of a
  question in one batched call. The question comes first in the prompt, so backends with prefix
  caching (vLLM, llama.cpp server) share it across a record's lines. `tune_threshold` picks the
  threshold with the best micro F1 on validation questions. A fine-tuned selector is the same class
  on a LoRA predictor: `LLMSelector(load_predictor("default+lora:adapters/selector"))`, with the
  adapter trained on `stage1_examples` (prompt -> " yes" / " no").
- `RetrievalSelector("bm25" | "embedding", top_k=10, threshold=None)`: bm25s over the record's lines,
  or cosine similarity of MiniLM embeddings (`clinqa.specialties.embed.embed_texts`); no LLM tokens.
- `FullRecordBaseline()`: every line, truncated to the model's window by tokens (the Patient line and
  the most recent lines are kept).

Stage 2 (`answer`) puts each selected line inside a <<< >>> block, says in the system message and
the prompt that record text is data and not instructions, and asks for citations as [Type/id] and
for exactly "Not in the record." when the lines do not answer. When stage 1 selects nothing, the
pipeline answers "Not in the record." without calling the model.

`answer_question` is what the HTTP service calls. `evaluate_records` runs a question set into a
resumable run folder (`clinqa.runs.RunFolder` of `RecordSample`s: run.json, one JSON line per question
in records.jsonl, summary.json). `stage1_examples` / `stage2_examples` build (prompt, target) pairs for
fine-tuning either stage; `write_examples` saves them as JSON Lines.

The code lives in focused modules, re-exported here under the names it always had:
`clinqa.records.selectors` (stage 1: the `Selector` protocol, the selectors, `tune_threshold`),
`clinqa.records.selector_factory` (`make_selector`, the one factory of the CLI and the service),
`clinqa.records.answering` (stage 2 and `answer_question`), `clinqa.records.examples` (training pairs),
`clinqa.records.evaluation` (`evaluate_records` and its run folders) and `clinqa.records.lines`
(quoting, token counting and citation handles shared by both stages).
"""

from __future__ import annotations

from clinqa.records.answering import (
    ANSWER_PROMPT,
    ANSWER_SYSTEM,
    RecordAnswer,
    _answer,
    _formatted,
    _generation_config,
    answer,
    answer_prompt,
    answer_question,
    fit_lines,
    resolve_citations,
)
from clinqa.records.evaluation import (
    RECORDS_FILE,
    SUMMARY_FILE,
    RecordSample,
    _questions_digest,
    evaluate_records,
    read_records_run,
    records_fingerprint,
    summarize_records,
)
from clinqa.records.examples import (
    read_examples,
    reference_with_citations,
    stage1_examples,
    stage2_examples,
    write_examples,
)
from clinqa.records.lines import (
    DEFAULT_WINDOW,
    WORDS_TO_TOKENS,
    Line,
    _by_patient,
    _clean_question,
    _handle,
    _LineCache,
    _question_text,
    _resource_type,
    _tokenizer,
    context_window,
    count_tokens,
    handle_map,
    quote_line,
)
from clinqa.records.metrics import NOT_IN_RECORD_ANSWER
from clinqa.records.selectors import (
    BM25_EXTRA_STOPWORDS,
    NO,
    SELECT_PROMPT,
    YES,
    FullRecordBaseline,
    LLMSelector,
    RetrievalSelector,
    Selected,
    Selector,
    _bm25_tokens,
    _describe,
    _pick,
    _run_selector,
    _stem,
    earlier_tuning,
    select_prompt,
    selection_examples,
    tune_threshold,
    tuning_key,
)

__all__ = [
    "ANSWER_PROMPT", "ANSWER_SYSTEM", "BM25_EXTRA_STOPWORDS", "DEFAULT_WINDOW", "NO", "NOT_IN_RECORD_ANSWER",
    "RECORDS_FILE", "SELECT_PROMPT", "SUMMARY_FILE", "WORDS_TO_TOKENS", "YES", "FullRecordBaseline", "LLMSelector",
    "Line", "RecordAnswer", "RecordSample", "RetrievalSelector", "Selected", "Selector", "answer", "answer_prompt",
    "answer_question", "context_window", "count_tokens", "evaluate_records", "fit_lines", "handle_map", "quote_line",
    "read_examples", "read_records_run", "records_fingerprint", "reference_with_citations", "resolve_citations",
    "select_prompt", "selection_examples", "stage1_examples", "stage2_examples", "summarize_records",
    "tune_threshold", "tuning_key", "earlier_tuning", "write_examples",
    # private names that other modules and tests import from here
    "_LineCache", "_answer", "_bm25_tokens", "_by_patient", "_clean_question", "_describe", "_formatted",
    "_generation_config", "_handle", "_pick", "_question_text", "_questions_digest", "_resource_type",
    "_run_selector", "_stem", "_tokenizer",
]  # fmt: skip
