"""Read the question files people already have into clinqa `Question`s, with errors they can act on.

Why this module exists: clinical QA sets come in many layouts (MedQA JSONL, MedMCQA JSON lines,
MMLU headerless CSVs, PubMedQA and MIRAGE JSON keyed by id, everyone's own spreadsheet), and an
evaluation is only as good as its input. So every format is one small function (in its own module
of `clinqa.data.formats`) turning one raw record into a Question, and everything else is shared:
reading files, validating through the Question schema, resolving specialty labels, catching
duplicate ids, filtering, and reporting a bad row the same way in every format -- naming the file,
the line (or the JSON key) and the field.

One entry point, `load_questions(spec, ...)`:

    load_questions("bundled")                       # the bundled clinical questions
    load_questions("bundled:control")               # also bundled:statements, bundled:clinical_<specialty>
    load_questions("medqa/US/test.jsonl")           # format detected from the extension and first record
    load_questions("mmlu/data/test", format="mmlu") # a folder: every CSV in it (subfolders are not searched)
    load_questions("mine.csv", mapping={"question": "stem", "options": "a,b,c,d", "answer": "key"})

Formats (`FORMATS`; see each module's `from_*` function in `clinqa.data.formats` for the exact fields):

- clinqa      native JSONL, one Question per line (id, question, options, answer, specialties, source, meta)
- medqa       JSONL: question, options {letter: text} (4 or 5), answer_idx (letter), optional answer text, meta_info
- medmcqa     JSON lines: id, question, opa..opd, cop (0-based 0-3 as in the Hugging Face release, or a letter a-d),
              subject_name, topic_name, exp; a few subjects map to specialties (MEDMCQA_SPECIALTIES)
- mmlu        headerless CSV: question, A, B, C, D, answer letter; the subject comes from the file name
- pubmedqa    ori_pqal.json: {PMID: {QUESTION, CONTEXTS, final_decision, LONG_ANSWER, MESHES, ...}}; options yes/no/maybe
- mirage      benchmark.json: {dataset: {id: {question, options, answer}}}
- jsonl, csv, parquet   your own columns via `mapping` (question, options, answer, id, specialties, source)
- statements  JSONL of true/false statements: id, statement, label (bool), specialties, source, meta

Without `skip_invalid` the first bad record raises a ClinqaError; with it, bad records are listed in
`LoadResult.skipped` and the good ones kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from clinqa.data.bundled import bundled_files, bundled_format, is_bundled_spec, parse_bundled_spec
from clinqa.data.formats.common import LoadResult, Problem, ProblemLog, Raw, RowError
from clinqa.data.formats.detect import detect_format, generic_by_extension
from clinqa.data.formats.medmcqa import MEDMCQA_SPECIALTIES
from clinqa.data.formats.mmlu import MMLU_MEDICAL, mmlu_subject
from clinqa.data.formats.pubmedqa import PUBMEDQA_OPTIONS
from clinqa.data.formats.registry import ALL_EXTENSIONS, FORMATS, GENERIC_FORMATS, Format
from clinqa.data.formats.table import MAPPING_KEYS, check_mapping
from clinqa.data.schema import Question
from clinqa.data.taxonomy import resolve_specialty
from clinqa.errors import ClinqaError

__all__ = [
    "DEFAULT_MAX_QUESTION_CHARS",
    "FORMATS",
    "GENERIC_FORMATS",
    "MAPPING_KEYS",
    "MAX_QUESTION_ENV",
    "MEDMCQA_SPECIALTIES",
    "MMLU_MEDICAL",
    "PUBMEDQA_OPTIONS",
    "Format",
    "LoadResult",
    "Problem",
    "detect_format",
    "load_questions",
    "max_question_chars",
    "mmlu_subject",
    "write_questions",
]


def _files(spec: str | Path, format: str | None, mapping: dict[str, str] | None) -> list[tuple[Path, str]]:
    """(file, format) pairs to read for a spec."""
    if is_bundled_spec(spec):
        name = parse_bundled_spec(str(spec))
        return [(p, format or bundled_format(name)) for p in bundled_files(name)]
    path = Path(spec).expanduser()
    if not path.exists():
        raise ClinqaError(f"no such file or folder: {spec}")
    if path.is_dir():
        extensions = FORMATS[format].extensions if format else ALL_EXTENSIONS
        found = sorted(
            p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
        )
        if not found:
            raise ClinqaError(
                f"no question files in folder {path} (looked for {', '.join('*' + e for e in extensions)}; subfolders are not searched)"
            )
    else:
        found = [path]
    return [(p, format or (generic_by_extension(p) if mapping else detect_format(p))) for p in found]


def _questions_in(
    path: Path, fmt: str, mapping: dict[str, str] | None
) -> Iterator[tuple[Question | Problem, Raw | None]]:
    """Each record of one file as a Question or a Problem, with the raw record it came from."""
    spec = FORMATS[fmt]
    try:
        for raw in spec.read(path):
            if isinstance(raw, Problem):
                yield raw, None
                continue
            try:
                yield spec.convert(raw, mapping), raw
            except RowError as e:
                yield Problem(str(path), raw.line, e.field, e.message, raw.key), raw
    except UnicodeDecodeError:
        raise ClinqaError(f"{path}: not a UTF-8 text file") from None


DEFAULT_MAX_QUESTION_CHARS = 20_000
MAX_QUESTION_ENV = "CLINQA_MAX_QUESTION_CHARS"


def max_question_chars(value: int | None = None) -> int:
    """The size cap of one question (its text plus its options), in characters: ``value``, else
    $CLINQA_MAX_QUESTION_CHARS, else 20,000 (generous: the longest bundled or benchmark question is far
    shorter; a 100 KB question would only be left-truncated to the model's context window)."""
    if value is None:
        text = os.environ.get(MAX_QUESTION_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_QUESTION_CHARS
        try:
            value = int(text)
        except ValueError:
            raise ClinqaError(f"{MAX_QUESTION_ENV}={text!r}: give a whole number of characters") from None
    if value < 1:
        raise ClinqaError(f"the question size limit must be at least 1 character, got {value}")
    return value


def _oversized(q: Question, cap: int) -> str | None:
    size = len(q.question) + sum(len(t) for t in q.options.values())
    if size <= cap:
        return None
    return (
        f"question and options are {size:,} characters, over the limit of {cap:,} (set {MAX_QUESTION_ENV} to raise it)"
    )


def load_questions(
    spec: str | Path,
    *,
    format: str | None = None,
    mapping: dict[str, str] | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    specialties: list[str] | None = None,
    max_chars: int | None = None,
) -> LoadResult:
    """Load questions from a file, a folder, or a bundled set (`bundled`, `bundled:control`, ...).

    format: a name in FORMATS; by default detected per file (a mapping implies jsonl/csv/parquet by extension).
    mapping: for the generic formats, {question, options, answer, id, specialties, source} -> column(s).
    skip_invalid: list bad records in `skipped` instead of raising a ClinqaError on the first one.
    specialties: keep questions having any of these (ids, aliases or names); limit: keep the first N after
    filtering -- reading stops there, so problems further down are not reported.
    max_chars: a question whose text plus options is longer is a bad row (see `max_question_chars`).
    """
    cap = max_question_chars(max_chars)
    if format is not None and format not in FORMATS:
        raise ClinqaError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    if limit is not None and limit < 0:
        raise ClinqaError(f"limit must be 0 or more, got {limit}")
    wanted = {resolve_specialty(s) for s in specialties} if specialties else None
    files = _files(spec, format, mapping)
    if mapping:
        check_mapping(mapping, {fmt for _, fmt in files})

    questions: list[Question] = []
    problem = ProblemLog(skip_invalid)
    seen: dict[str, str] = {}  # id -> where it was first seen

    for path, fmt in files:
        if limit is not None and len(questions) >= limit:
            break
        for item, raw in _questions_in(path, fmt, mapping):
            if isinstance(item, Problem):
                problem(item)
                continue
            too_big = _oversized(item, cap)
            if too_big:
                problem(Problem(str(path), raw.line, "question", too_big, raw.key))
                continue
            if item.id in seen:
                problem(
                    Problem(
                        str(path),
                        raw.line,
                        "id",
                        f"duplicate question id {item.id!r} (first seen at {seen[item.id]})",
                        raw.key,
                    )
                )
                continue
            seen[item.id] = f"{path}:{raw.line}" if raw.line is not None else f"{path}: record {raw.key!r}"
            if wanted and not wanted & set(item.specialties):
                continue
            questions.append(item)
            if limit is not None and len(questions) >= limit:
                break

    return LoadResult(
        questions=questions, skipped=problem.skipped, format="+".join(dict.fromkeys(fmt for _, fmt in files))
    )


def write_questions(path: str | Path, questions: Iterable[Question]) -> Path:
    """Questions as clinqa native JSONL (what ``load_questions`` reads back), replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for q in questions:
            fh.write(json.dumps(q.model_dump(), ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
