"""The formats `load_questions` knows: name -> how to read a file and how to turn a record into a Question.

A new format is one module in this package (a reader, or a shared one from `common`, plus a
`from_*` converter raising `RowError`) and one line here; detection is in `detect.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from clinqa.data.formats.common import JSONL_EXTENSIONS, Problem, Raw, read_jsonl
from clinqa.data.formats.medmcqa import from_medmcqa
from clinqa.data.formats.medqa import from_medqa
from clinqa.data.formats.mirage import from_mirage, read_mirage
from clinqa.data.formats.mmlu import from_mmlu, read_headerless_csv
from clinqa.data.formats.native import from_clinqa
from clinqa.data.formats.pubmedqa import from_pubmedqa, read_pubmedqa
from clinqa.data.formats.statements import from_statements
from clinqa.data.formats.table import GENERIC_FORMATS, from_table, read_csv, read_parquet
from clinqa.data.schema import Question

__all__ = ["ALL_EXTENSIONS", "FORMATS", "GENERIC_FORMATS", "Format"]


@dataclass(frozen=True)
class Format:
    read: Callable[[Path], Iterator[Raw | Problem]]
    convert: Callable[[Raw, dict[str, str] | None], Question]
    extensions: tuple[str, ...]  # which files of a folder this format reads
    description: str


_JSONL = JSONL_EXTENSIONS

FORMATS: dict[str, Format] = {
    "clinqa": Format(read_jsonl, from_clinqa, _JSONL, "native JSONL, one question per line"),
    "medqa": Format(read_jsonl, from_medqa, _JSONL, "MedQA JSONL (question, options, answer_idx)"),
    "medmcqa": Format(read_jsonl, from_medmcqa, _JSONL, "MedMCQA JSON lines (opa..opd, cop 0-3)"),
    "mmlu": Format(read_headerless_csv, from_mmlu, (".csv",), "MMLU headerless CSV (question, A-D, answer)"),
    "pubmedqa": Format(read_pubmedqa, from_pubmedqa, (".json",), "PubMedQA ori_pqal.json keyed by PMID"),
    "mirage": Format(read_mirage, from_mirage, (".json",), "MIRAGE benchmark.json"),
    "jsonl": Format(read_jsonl, from_table, _JSONL, "your own JSONL, columns named by a mapping"),
    "csv": Format(read_csv, from_table, (".csv",), "your own CSV with a header, columns named by a mapping"),
    "parquet": Format(read_parquet, from_table, (".parquet",), "your own parquet, columns named by a mapping"),
    "statements": Format(read_jsonl, from_statements, _JSONL, "true/false statements JSONL"),
}
ALL_EXTENSIONS = tuple(sorted({e for f in FORMATS.values() for e in f.extensions}))
