"""Answer shuffling: seeded option permutations, so position bias shows up as inconsistency
instead of hiding inside accuracy. Shuffle 0 is the original order."""

from __future__ import annotations

import hashlib
import itertools
import math
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


def permutations(question_id: str, shuffles: int, n: int, seed: int) -> list[list[int]]:
    """The option orders of a question's `shuffles` shuffles: `permutation(.., k, ..)` for k < shuffles,
    unless that asks for at least as many orders as exist (n!): then every distinct order once, the
    original first, the rest in a seeded order."""
    if shuffles < math.factorial(n):
        return [permutation(question_id, k, n, seed) for k in range(shuffles)]
    rest = [list(p) for p in itertools.permutations(range(n))][1:]
    digest = hashlib.sha256(f"{seed}|{question_id}|all".encode()).digest()
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(rest)
    return [list(range(n))] + rest


def too_many_shuffles(questions, shuffles: int) -> str | None:
    """A note when `shuffles` exceeds the distinct option orders of some questions (n! for n options)."""
    short: dict[int, int] = {}
    for q in questions:
        n = len(q.options)
        if shuffles > math.factorial(n):
            short[n] = short.get(n, 0) + 1
    if not short:
        return None
    parts = [
        f"{c} question{'s' if c > 1 else ''} with {n} options ha{'ve' if c > 1 else 's'} only {math.factorial(n)} "
        "distinct orders"
        for n, c in sorted(short.items())
    ]
    return f"--shuffles {shuffles}: {'; '.join(parts)}: each of their orders is used once"
