"""The question file formats `clinqa.data.loaders.load_questions` reads, one module per format.

- clinqa      native JSONL (`native.py`)            - medqa     MedQA JSONL (`medqa.py`)
- medmcqa     MedMCQA JSON lines (`medmcqa.py`)     - mmlu      MMLU headerless CSV (`mmlu.py`)
- pubmedqa    PubMedQA ori_pqal.json (`pubmedqa.py`) - mirage    MIRAGE benchmark.json (`mirage.py`)
- statements  true/false statements (`statements.py`)
- jsonl, csv, parquet  your own columns via a mapping (`table.py`)

`common.py` holds what they share (raw records, row errors naming file/line/field, validation, the
`skip_invalid` log, shared readers); `registry.py` the name -> Format table; `detect.py` detection.
"""

from clinqa.data.formats.common import LoadResult, Problem
from clinqa.data.formats.detect import detect_format
from clinqa.data.formats.registry import ALL_EXTENSIONS, FORMATS, GENERIC_FORMATS, Format

__all__ = ["ALL_EXTENSIONS", "FORMATS", "GENERIC_FORMATS", "Format", "LoadResult", "Problem", "detect_format"]
