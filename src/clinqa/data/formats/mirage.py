"""MIRAGE benchmark.json: {dataset: {id: {question, options, answer}}}."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from clinqa.data.formats.common import Problem, Raw, json_object, kind, letter_options, question, record, require, text
from clinqa.data.schema import Question


def read_mirage(path: Path) -> Iterator[Raw | Problem]:
    data, problem = json_object(path, "dataset name")
    if problem:
        yield problem
        return
    for dataset, items in data.items():
        if not isinstance(items, dict):
            yield Problem(
                str(path), None, None, f"expected an object of questions keyed by id, got {kind(items)}", key=dataset
            )
            continue
        for qid, rec in items.items():
            yield Raw(path, None, f"{dataset}/{qid}", rec)


def from_mirage(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """MIRAGE benchmark.json: id mirage-{dataset}-{id}, source mirage:{dataset}."""
    rec = record(raw)
    dataset, qid = raw.key.split("/", 1)
    options = letter_options(rec)
    fields = {
        "id": f"mirage-{dataset}-{qid}",
        "question": require(rec, "question"),
        "options": {k: text(v) for k, v in options.items()},
        "answer": require(rec, "answer"),
        "source": f"mirage:{dataset}",
        "meta": {k: v for k, v in rec.items() if k not in ("question", "options", "answer")},
    }
    return question(fields)
