"""Answer extraction from generated text: explicit letter patterns first, then the option texts.

Never defaults: an answer that matches nothing is None, and runs count those as unparseable.
"""

from __future__ import annotations

import re


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def extract_answer(text: str, options: dict[str, str]) -> tuple[str | None, str]:
    """Return (letter or None, how it was found: 'pattern', 'text', 'ambiguous' or 'unparseable')."""
    letters = "".join(options)
    L = f"[{letters}]"
    patterns = [
        rf"(?i)\banswer\s*(?:is|:)?\s*(?:option\s*)?\(?({L})\)?(?![A-Za-z])",
        rf"(?i)\b(?:option|choice)\s*\(?({L})\)?(?![A-Za-z])",
        rf"^\s*\(?({L})\)?\s*(?:[.):\-]|$)",
        rf"(?m)^\s*\(?({L})[.)]\s",
        rf"\(({L})\)",
    ]
    for pat in patterns:
        found = re.findall(pat, text)
        if found:
            distinct = set(f.upper() for f in found)
            if len(distinct) == 1:
                return distinct.pop(), "pattern"
            # 'Answer: B' stated last is the model's final word after reasoning
            if pat == patterns[0]:
                return found[-1].upper(), "pattern"
            return None, "ambiguous"
    t = _norm(text)
    hits = [k for k, v in options.items() if _norm(v) and re.search(rf"\b{re.escape(_norm(v))}\b", t)]
    if len(hits) == 1:
        return hits[0], "text"
    if len(hits) > 1:
        # prefer the longest option text when one contains another ("aspirin" vs "aspirin and clopidogrel")
        longest = max(hits, key=lambda k: len(options[k]))
        others = [k for k in hits if k != longest]
        if all(_norm(options[k]) in _norm(options[longest]) for k in others):
            return longest, "text"
        return None, "ambiguous"
    return None, "unparseable"
