"""Reading append-only JSONL files that a kill may have cut mid-line (runs, annotations, record runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

from clinqa.errors import ClinqaError

T = TypeVar("T")


def read_appended(path: Path, parse: Callable[[bytes], T], *, corrupt: str, repair: bool = True) -> list[T]:
    """Every line `parse`d (it raises ValueError on a bad one). A bad *final* line is a write torn by
    a kill: it is dropped and, with `repair`, cut off the file so appends continue cleanly. A bad line
    anywhere else is real corruption: ClinqaError "{path}:{line}: {corrupt}"."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    out: list[T] = []
    good = 0
    for i, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            out.append(parse(line))
        except ValueError:
            if i >= len(lines) - 2:
                if repair:
                    with open(path, "r+b") as fh:
                        fh.truncate(min(good, len(raw)))
                break
            raise ClinqaError(f"{path}:{i + 1}: {corrupt}") from None
        good += len(line) + 1
    return out
