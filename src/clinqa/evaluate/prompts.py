"""Prompt formats. The `letter` and `option` prompts are lm-evaluation-harness's MMLU formats, so
per-question predictions match lm-eval on the same model and questions.

Each returns a `clinqa.models.request.Prompt`: the text (a str, byte for byte the format below)
carrying the question stem, the options shown, the method it is for, the question id and metadata,
so modifiers down the chain (retrieval, routed steering) read the question instead of parsing it."""

from __future__ import annotations

from clinqa.data.schema import Question
from clinqa.models.request import Prompt


def context_block(q: Question) -> str:
    """PubMedQA-style abstracts (meta['contexts']) go before the question; others have none."""
    ctx = q.meta.get("contexts")
    if not ctx:
        return ""
    if isinstance(ctx, list):
        ctx = " ".join(ctx)
    return f"Context: {ctx.strip()}\n"


def _prompt(text: str, q: Question, kind: str, options: dict[str, str] | None = None) -> Prompt:
    return Prompt(text, stem=q.question.strip(), kind=kind, options=options, question_id=q.id, meta=q.meta)


def letter_prompt(q: Question, options: dict[str, str]) -> Prompt:
    """`question\\nA. ..\\nB. ..\\nAnswer:`, scored by the next token " A", " B", ..."""
    lines = [context_block(q) + q.question.strip()]
    lines += [f"{k}. {v}" for k, v in options.items()]
    return _prompt("\n".join(lines) + "\nAnswer:", q, "letter", options)


def cloze_prompt(q: Question) -> Prompt:
    """`Question: {question}\\nAnswer:`, scored by the continuation " " + option text."""
    return _prompt(f"{context_block(q)}Question: {q.question.strip()}\nAnswer:", q, "option")


GENERATE_INSTRUCTION = (
    "Answer the following multiple-choice question. Think briefly if you need to, then give your final "
    "answer as 'Answer: X' where X is the letter of the correct option."
)


def generate_prompt(q: Question, options: dict[str, str], instruction: str = GENERATE_INSTRUCTION) -> Prompt:
    body = "\n".join([context_block(q) + q.question.strip(), *[f"{k}. {v}" for k, v in options.items()]])
    return _prompt(f"{instruction}\n\n{body}", q, "generate", options)
