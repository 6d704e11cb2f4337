"""Prompt formats. The `letter` and `option` prompts are lm-evaluation-harness's MMLU formats, so
per-question predictions match lm-eval on the same model and questions."""

from __future__ import annotations

from clinqa.data.schema import Question


def context_block(q: Question) -> str:
    """PubMedQA-style abstracts (meta['contexts']) go before the question; others have none."""
    ctx = q.meta.get("contexts")
    if not ctx:
        return ""
    if isinstance(ctx, list):
        ctx = " ".join(ctx)
    return f"Context: {ctx.strip()}\n"


def letter_prompt(q: Question, options: dict[str, str]) -> str:
    """`question\\nA. ..\\nB. ..\\nAnswer:`, scored by the next token " A", " B", ..."""
    lines = [context_block(q) + q.question.strip()]
    lines += [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines) + "\nAnswer:"


def cloze_prompt(q: Question) -> str:
    """`Question: {question}\\nAnswer:`, scored by the continuation " " + option text."""
    return f"{context_block(q)}Question: {q.question.strip()}\nAnswer:"


GENERATE_INSTRUCTION = (
    "Answer the following multiple-choice question. Think briefly if you need to, then give your final "
    "answer as 'Answer: X' where X is the letter of the correct option."
)


def generate_prompt(q: Question, options: dict[str, str], instruction: str = GENERATE_INSTRUCTION) -> str:
    body = "\n".join([context_block(q) + q.question.strip(), *[f"{k}. {v}" for k, v in options.items()]])
    return f"{instruction}\n\n{body}"
