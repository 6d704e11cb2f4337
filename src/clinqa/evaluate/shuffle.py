"""Answer shuffling: seeded option permutations, so position bias shows up as inconsistency
instead of hiding inside accuracy. Shuffle 0 is the original order."""

from __future__ import annotations

import hashlib
import random

from clinqa.data.schema import Question, letters


def permutation(question_id: str, shuffle: int, n: int, seed: int) -> list[int]:
    """permutation[i] = original index of the option shown at position i (identity for shuffle 0)."""
    if shuffle == 0:
        return list(range(n))
    digest = hashlib.sha256(f"{seed}|{question_id}|{shuffle}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    perm = list(range(n))
    rng.shuffle(perm)
    return perm


def apply(q: Question, perm: list[int]) -> tuple[dict[str, str], str, dict[str, str]]:
    """Options as shown, the gold letter as shown, and the mapping shown letter -> original letter."""
    original = list(q.options)
    shown_letters = letters(len(original))
    shown = {shown_letters[i]: q.options[original[j]] for i, j in enumerate(perm)}
    to_original = {shown_letters[i]: original[j] for i, j in enumerate(perm)}
    gold = next(s for s, o in to_original.items() if o == q.answer)
    return shown, gold, to_original
