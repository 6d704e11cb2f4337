"""Read the question files people already have into clinqa `Question`s, with errors they can act on.

Why this module exists: clinical QA sets come in many layouts (MedQA JSONL, MedMCQA JSON lines,
MMLU headerless CSVs, PubMedQA and MIRAGE JSON keyed by id, everyone's own spreadsheet), and an
evaluation is only as good as its input. So every format is one small function turning one raw
record into a Question, and everything else is shared: reading files, validating through the
Question schema, resolving specialty labels, catching duplicate ids, filtering, and reporting a bad
row the same way in every format -- naming the file, the line (or the JSON key) and the field.

One entry point, `load_questions(spec, ...)`:

    load_questions("bundled")                       # the bundled clinical questions
    load_questions("bundled:control")               # also bundled:statements, bundled:clinical_<specialty>
    load_questions("medqa/US/test.jsonl")           # format detected from the extension and first record
    load_questions("mmlu/data/test", format="mmlu") # a folder: every CSV in it (subfolders are not searched)
    load_questions("mine.csv", mapping={"question": "stem", "options": "a,b,c,d", "answer": "key"})

Formats (`FORMATS`, see each `_from_*` function for the exact fields):

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

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pydantic import ValidationError

from clinqa.data.bundled import bundled_files, bundled_format, is_bundled_spec, parse_bundled_spec
from clinqa.data.schema import LETTERS, Question
from clinqa.data.taxonomy import resolve_specialty
from clinqa.errors import ClinqaError

__all__ = [
    "FORMATS",
    "GENERIC_FORMATS",
    "MAPPING_KEYS",
    "MEDMCQA_SPECIALTIES",
    "MMLU_MEDICAL",
    "LoadResult",
    "Problem",
    "detect_format",
    "load_questions",
    "mmlu_subject",
    "write_questions",
]


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class Problem:
    """One record that could not become a Question (or a file-level problem when `line` is None).

    `key` is set instead of `line` for JSON files keyed by id (pubmedqa: the PMID, mirage: dataset/id).
    """

    file: str
    line: int | None
    field: str | None
    message: str
    key: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.key is not None:
            where += f": record {self.key!r}"
        what = f"field {self.field!r}: " if self.field else ""
        return f"{where}: {what}{self.message}"


@dataclass
class LoadResult:
    questions: list[Question]
    skipped: list[Problem]
    format: str  # the format used; several joined by '+' when a folder mixes formats


# --------------------------------------------------------------------------------------------------
# Shared plumbing: raw records, row errors, building a validated Question


class RowError(Exception):
    """One record cannot become a Question; `field` names the field as the input file calls it."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass
class Raw:
    """One raw record and where it came from."""

    path: Path
    line: int | None  # 1-based; CSV: the row's first line; parquet: the row number
    key: str | None  # the JSON key, for formats keyed by id
    data: Any


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _record(raw: Raw) -> dict[str, Any]:
    if not isinstance(raw.data, dict):
        raise RowError(None, f"expected a JSON object, got {_kind(raw.data)}")
    return raw.data


def _require(rec: dict[str, Any], key: str) -> Any:
    if rec.get(key) is None:
        raise RowError(key, "missing")
    return rec[key]


def _text(value: Any) -> Any:
    """Numbers as option text become strings; anything else is left for validation to judge."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _resolve_labels(labels: Any, field: str) -> list[str]:
    if labels is None:
        return []
    if not isinstance(labels, list):
        raise RowError(field, f"expected a list of specialty labels, got {_kind(labels)}")
    resolved: list[str] = []
    for label in labels:
        if not isinstance(label, str):
            raise RowError(field, f"expected specialty labels as strings, got {_kind(label)}")
        try:
            sid = resolve_specialty(label)
        except ClinqaError as e:
            raise RowError(field, str(e)) from None
        if sid not in resolved:
            resolved.append(sid)
    return resolved


def _question(fields: dict[str, Any], names: dict[str, str] | None = None) -> Question:
    """Validate fields through Question; errors name the input's own field (via `names`)."""
    names = names or {}
    if "specialties" in fields:
        fields = {
            **fields,
            "specialties": _resolve_labels(fields["specialties"], names.get("specialties", "specialties")),
        }
    try:
        return Question(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing"
        elif err["type"] == "extra_forbidden":
            msg = f"not a field of a question (expected {', '.join(Question.model_fields)})"
        if not loc and msg.startswith("answer"):  # the model-level check that the answer is an option
            loc = "answer"
        field = names.get(loc) or names.get(loc.split(".")[0]) or loc or None
        raise RowError(field, msg[:1].lower() + msg[1:]) from None


# --------------------------------------------------------------------------------------------------
# Readers: a file -> Raw records (or Problems for what cannot even be parsed)


def _read_jsonl(path: Path) -> Iterator[Raw | Problem]:
    with path.open(encoding="utf-8-sig") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                data = json.loads(text.rstrip("\r\n"))  # so the error's column is on this line
            except json.JSONDecodeError as e:
                yield Problem(str(path), n, None, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            yield Raw(path, n, None, data)


def _json_object(path: Path, keyed_by: str) -> tuple[dict[str, Any] | None, Problem | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        return None, Problem(str(path), e.lineno, None, f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(data, dict):
        return None, Problem(str(path), None, None, f"expected a JSON object keyed by {keyed_by}, got {_kind(data)}")
    return data, None


def _read_pubmedqa(path: Path) -> Iterator[Raw | Problem]:
    data, problem = _json_object(path, "PMID")
    if problem:
        yield problem
        return
    for pmid, rec in data.items():
        yield Raw(path, None, str(pmid), rec)


def _read_mirage(path: Path) -> Iterator[Raw | Problem]:
    data, problem = _json_object(path, "dataset name")
    if problem:
        yield problem
        return
    for dataset, items in data.items():
        if not isinstance(items, dict):
            yield Problem(
                str(path), None, None, f"expected an object of questions keyed by id, got {_kind(items)}", key=dataset
            )
            continue
        for qid, rec in items.items():
            yield Raw(path, None, f"{dataset}/{qid}", rec)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line of the row, cells) for each non-blank row; quoted cells may span lines."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        start = 1
        try:
            for row in reader:
                line, start = start, reader.line_num + 1
                if any(cell.strip() for cell in row):
                    yield line, row
        except csv.Error as e:
            raise ClinqaError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _read_headerless_csv(path: Path) -> Iterator[Raw | Problem]:
    for line, row in _csv_rows(path):
        yield Raw(path, line, None, row)


def _read_csv(path: Path) -> Iterator[Raw | Problem]:
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        return
    header = [h.strip() for h in first[1]]
    for line, row in rows:
        if len(row) != len(header):
            yield Problem(
                str(path), line, None, f"the row has {len(row)} cells but the header has {len(header)} columns"
            )
            continue
        yield Raw(path, line, None, dict(zip(header, row)))


def _read_parquet(path: Path) -> Iterator[Raw | Problem]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise ClinqaError("reading parquet files needs pyarrow: pip install pyarrow") from None
    try:
        batches = pq.ParquetFile(path).iter_batches()
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise ClinqaError(f"{path}: not a readable parquet file ({e})") from None
    n = 0
    for batch in batches:
        for rec in batch.to_pylist():
            n += 1
            yield Raw(path, n, None, rec)


# --------------------------------------------------------------------------------------------------
# Formats: one raw record -> one Question


def _from_clinqa(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """Native: the record is exactly Question's fields."""
    return _question(dict(_record(raw)))


def _from_medqa(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """MedQA: answer_idx is the letter; `answer` (text), when present, must agree with it.

    id is f"medqa-{line}" unless the record has an id; all other keys (meta_info, ...) go to meta.
    """
    rec = _record(raw)
    options = _require(rec, "options")
    if not isinstance(options, dict):
        raise RowError("options", f"expected an object of letter -> text, got {_kind(options)}")
    letter = _require(rec, "answer_idx")
    if letter not in options:
        raise RowError("answer_idx", f"{letter!r} is not one of the options {', '.join(options)}")
    if rec.get("answer") is not None and str(rec["answer"]).strip() != str(options[letter]).strip():
        raise RowError("answer", f"{rec['answer']!r} does not match option {letter} ({options[letter]!r})")
    meta = {k: v for k, v in rec.items() if k not in ("id", "question", "options", "answer_idx", "answer")}
    qid = str(rec["id"]) if rec.get("id") is not None else f"medqa-{raw.line}"
    fields = {
        "id": qid,
        "question": _require(rec, "question"),
        "options": options,
        "answer": letter,
        "source": "medqa",
        "meta": meta,
    }
    return _question(fields, {"answer": "answer_idx"})


# MedMCQA subject_name -> specialty, only where the subject clearly is one; others get none.
MEDMCQA_SPECIALTIES: dict[str, str] = {
    "Pediatrics": "pediatrics",
    "Gynaecology & Obstetrics": "obstetrics_gynecology",
    "Psychiatry": "psychiatry",
    "Skin": "dermatology",
    "Surgery": "surgery",
    "Microbiology": "infectious_diseases",
}
_MEDMCQA_OPTIONS = ("opa", "opb", "opc", "opd")


def _medmcqa_answer(cop: Any) -> str:
    if isinstance(cop, int) and not isinstance(cop, bool) and 0 <= cop <= 3:
        return "ABCD"[cop]
    if isinstance(cop, str) and cop.strip().upper() in ("A", "B", "C", "D"):
        return cop.strip().upper()
    raise RowError("cop", f"must be a 0-based index 0-3 (as in the Hugging Face release) or a letter a-d, got {cop!r}")


def _from_medmcqa(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """MedMCQA: opa..opd are options A-D; cop is 0-based (0-3) or a letter; source medmcqa:{subject_name}."""
    rec = _record(raw)
    options = {letter: _text(_require(rec, col)) for letter, col in zip("ABCD", _MEDMCQA_OPTIONS)}
    for letter, col in zip("ABCD", _MEDMCQA_OPTIONS):
        if isinstance(options[letter], str) and not options[letter].strip():
            raise RowError(col, f"option {letter} is empty")
    answer = _medmcqa_answer(_require(rec, "cop"))
    subject = str(rec.get("subject_name") or "").strip()
    meta = {k: rec[k] for k in ("subject_name", "topic_name", "exp", "choice_type") if rec.get(k) is not None}
    fields = {
        "id": str(rec["id"]) if rec.get("id") is not None else f"medmcqa-{raw.line}",
        "question": _require(rec, "question"),
        "options": options,
        "answer": answer,
        "specialties": [MEDMCQA_SPECIALTIES[subject]] if subject in MEDMCQA_SPECIALTIES else [],
        "source": f"medmcqa:{subject}" if subject else "medmcqa",
        "meta": meta,
    }
    names = {
        "answer": "cop",
        "specialties": "subject_name",
        **{f"options.{l}": c for l, c in zip("ABCD", _MEDMCQA_OPTIONS)},
    }
    return _question(fields, names)


# The usual medical subset of MMLU (the file names' subject part).
MMLU_MEDICAL: tuple[str, ...] = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)


def mmlu_subject(path: str | Path) -> str:
    """`clinical_knowledge_test.csv` -> `clinical_knowledge` (strips _test, _dev, _val)."""
    stem = Path(path).stem
    for suffix in ("_test", "_dev", "_val"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _from_mmlu(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """MMLU: headerless rows question, A, B, C, D, answer; id mmlu-{file stem}-{line}, source mmlu:{subject}."""
    row = raw.data
    if len(row) != 6:
        raise RowError(None, f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
    question, *opts, answer = row
    if answer.strip().upper() not in ("A", "B", "C", "D"):
        raise RowError("answer", f"must be A, B, C or D, got {answer!r}")
    subject = mmlu_subject(raw.path)
    fields = {
        "id": f"mmlu-{raw.path.stem}-{raw.line}",
        "question": question,
        "options": dict(zip("ABCD", opts)),
        "answer": answer.strip().upper(),
        "source": f"mmlu:{subject}",
        "meta": {"subject": subject},
    }
    return _question(fields, {f"options.{l}": l for l in "ABCD"})


PUBMEDQA_OPTIONS: dict[str, str] = {"A": "yes", "B": "no", "C": "maybe"}


def _from_pubmedqa(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """PubMedQA: options A yes, B no, C maybe; meta has contexts (joined with blank lines), long_answer, meshes."""
    rec = _record(raw)
    decision = _require(rec, "final_decision")
    answer = {v: k for k, v in PUBMEDQA_OPTIONS.items()}.get(str(decision).strip().lower())
    if answer is None:
        raise RowError("final_decision", f"must be yes, no or maybe, got {decision!r}")
    contexts = rec.get("CONTEXTS") or []
    meta = {
        "pmid": raw.key,
        "contexts": "\n\n".join(contexts) if isinstance(contexts, list) else str(contexts),
        "long_answer": rec.get("LONG_ANSWER") or "",
        "meshes": rec.get("MESHES") or [],
        "labels": rec.get("LABELS") or [],
        "year": rec.get("YEAR"),
        **{k: v for k, v in rec.items() if k.startswith("reasoning_")},
    }
    fields = {
        "id": f"pubmedqa-{raw.key}",
        "question": _require(rec, "QUESTION"),
        "options": dict(PUBMEDQA_OPTIONS),
        "answer": answer,
        "source": "pubmedqa",
        "meta": meta,
    }
    return _question(fields, {"question": "QUESTION", "answer": "final_decision"})


def _from_mirage(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """MIRAGE benchmark.json: id mirage-{dataset}-{id}, source mirage:{dataset}."""
    rec = _record(raw)
    dataset, qid = raw.key.split("/", 1)
    options = _require(rec, "options")
    if not isinstance(options, dict):
        raise RowError("options", f"expected an object of letter -> text, got {_kind(options)}")
    fields = {
        "id": f"mirage-{dataset}-{qid}",
        "question": _require(rec, "question"),
        "options": {k: _text(v) for k, v in options.items()},
        "answer": _require(rec, "answer"),
        "source": f"mirage:{dataset}",
        "meta": {k: v for k, v in rec.items() if k not in ("question", "options", "answer")},
    }
    return _question(fields)


_STATEMENT_FIELDS = ("id", "statement", "label", "specialties", "source", "meta")


def _from_statements(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """A true/false statement -> options A True, B False; meta keeps the record's meta plus statement=True."""
    rec = _record(raw)
    for key in rec:
        if key not in _STATEMENT_FIELDS:
            raise RowError(key, f"not a field of a statement (expected {', '.join(_STATEMENT_FIELDS)})")
    label = _require(rec, "label")
    if not isinstance(label, bool):
        raise RowError("label", f"must be true or false, got {label!r}")
    meta = rec.get("meta") or {}
    if not isinstance(meta, dict):
        raise RowError("meta", f"expected an object, got {_kind(meta)}")
    fields = {
        "id": _require(rec, "id"),
        "question": _require(rec, "statement"),
        "options": {"A": "True", "B": "False"},
        "answer": "A" if label else "B",
        "specialties": rec.get("specialties") or [],
        "source": rec.get("source") or "",
        "meta": {**meta, "statement": True},
    }
    return _question(fields, {"question": "statement", "answer": "label"})


# Generic formats: the user's own columns, named through `mapping`.
MAPPING_KEYS: tuple[str, ...] = ("question", "options", "answer", "id", "specialties", "source")


def _table_options(rec: dict[str, Any], spec: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Options and the column behind each letter.

    `spec` is a comma list of columns (one option each; trailing empty cells are dropped, so rows may
    have 4 or 5 options) or one column holding a list, an object letter -> text, or that as JSON text.
    Without a spec: an `options` column, else the columns A, B, C, ... that exist.
    """
    if spec is None:
        if "options" in rec:
            spec = "options"
        else:
            present = [l for l in LETTERS if l in rec]
            if len(present) < 2:
                raise RowError(
                    "options",
                    "missing (no options column and no columns A, B, ...: name the option columns A, B, C, ... or put them in one 'options' column)",
                )
            spec = ",".join(present)
    columns = [c.strip() for c in spec.split(",") if c.strip()]
    if len(columns) > 1:
        texts = [_text(_require(rec, c)) for c in columns]
        while texts and isinstance(texts[-1], str) and not texts[-1].strip():
            texts.pop()
        return dict(zip(LETTERS, texts)), {f"options.{l}": c for l, c in zip(LETTERS, columns)}
    value = _require(rec, columns[0])
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, list):
        return dict(zip(LETTERS, (_text(v) for v in value))), {"options": columns[0]}
    if isinstance(value, dict):
        return {str(k): _text(v) for k, v in value.items()}, {"options": columns[0]}
    raise RowError(
        columns[0], f"expected a list or an object of options, got {_kind(value)} (several columns: 'col1,col2,...')"
    )


def _answer_letter(value: Any, options: dict[str, Any], field: str) -> str:
    """An answer given as a letter, a 0-based index or the option's text; refuses readings that disagree."""
    letters = list(options)
    picks: set[str] = set()
    if isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, (int, float)):
        if float(value).is_integer() and 0 <= int(value) < len(letters):
            picks.add(letters[int(value)])
    elif isinstance(value, str):
        s = value.strip()
        if len(s) == 1 and s.upper() in options:
            picks.add(s.upper())
        if s.isdigit() and int(s) < len(letters):
            picks.add(letters[int(s)])
        by_text = [l for l, t in options.items() if isinstance(t, str) and t.strip() == s]
        if len(by_text) == 1:
            picks.update(by_text)
    if len(picks) == 1:
        return picks.pop()
    if picks:
        raise RowError(
            field,
            f"{value!r} is ambiguous: as a letter, a 0-based index or an option text it could be {' or '.join(sorted(picks))}",
        )
    raise RowError(
        field,
        f"{value!r} is not an option letter ({', '.join(letters)}), a 0-based index (0-{len(letters) - 1}) or the text of an option",
    )


def _labels_cell(value: Any) -> Any:
    """Specialty labels as a list, or text: a JSON list or labels separated by commas or semicolons."""
    if not isinstance(value, str):
        return value
    if value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return [s.strip() for s in value.replace(";", ",").split(",") if s.strip()]


def _from_table(raw: Raw, mapping: dict[str, str] | None) -> Question:
    """jsonl / csv / parquet with columns named by `mapping` (defaults: the same names).

    id defaults to {file stem}-{line}, source to the file stem; unmapped columns go to meta.
    """
    rec = _record(raw)
    m = {**{k: k for k in MAPPING_KEYS if k != "options"}, **(mapping or {})}
    options, names = _table_options(rec, m.get("options"))
    answer_col = m["answer"]
    answer = _answer_letter(_require(rec, answer_col), options, answer_col)
    used = {m[k] for k in MAPPING_KEYS if k != "options"} | set(names.values())
    fields = {
        "id": str(rec[m["id"]]) if rec.get(m["id"]) not in (None, "") else f"{raw.path.stem}-{raw.line}",
        "question": _require(rec, m["question"]),
        "options": options,
        "answer": answer,
        "specialties": _labels_cell(rec.get(m["specialties"])) or [],
        "source": str(rec[m["source"]]) if rec.get(m["source"]) not in (None, "") else raw.path.stem,
        "meta": {k: v for k, v in rec.items() if k not in used},
    }
    names.update({k: m[k] for k in ("id", "question", "answer", "specialties", "source")})
    return _question(fields, names)


# --------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Format:
    read: Callable[[Path], Iterator[Raw | Problem]]
    convert: Callable[[Raw, dict[str, str] | None], Question]
    extensions: tuple[str, ...]  # which files of a folder this format reads
    description: str


_JSONL = (".jsonl", ".ndjson", ".json")

FORMATS: dict[str, Format] = {
    "clinqa": Format(_read_jsonl, _from_clinqa, _JSONL, "native JSONL, one question per line"),
    "medqa": Format(_read_jsonl, _from_medqa, _JSONL, "MedQA JSONL (question, options, answer_idx)"),
    "medmcqa": Format(_read_jsonl, _from_medmcqa, _JSONL, "MedMCQA JSON lines (opa..opd, cop 0-3)"),
    "mmlu": Format(_read_headerless_csv, _from_mmlu, (".csv",), "MMLU headerless CSV (question, A-D, answer)"),
    "pubmedqa": Format(_read_pubmedqa, _from_pubmedqa, (".json",), "PubMedQA ori_pqal.json keyed by PMID"),
    "mirage": Format(_read_mirage, _from_mirage, (".json",), "MIRAGE benchmark.json"),
    "jsonl": Format(_read_jsonl, _from_table, _JSONL, "your own JSONL, columns named by a mapping"),
    "csv": Format(_read_csv, _from_table, (".csv",), "your own CSV with a header, columns named by a mapping"),
    "parquet": Format(_read_parquet, _from_table, (".parquet",), "your own parquet, columns named by a mapping"),
    "statements": Format(_read_jsonl, _from_statements, _JSONL, "true/false statements JSONL"),
}
GENERIC_FORMATS: tuple[str, ...] = ("jsonl", "csv", "parquet")
_ALL_EXTENSIONS = tuple(sorted({e for f in FORMATS.values() for e in f.extensions}))


# --------------------------------------------------------------------------------------------------
# Detection


def _pass_format(path: Path, why: str) -> ClinqaError:
    return ClinqaError(f"cannot tell the format of {path}: {why}; pass --format (one of {', '.join(FORMATS)})")


def _first_record(path: Path) -> dict[str, Any] | None:
    """The first line of a JSON-lines file that parses as an object (None for an empty file)."""
    with path.open(encoding="utf-8-sig") as f:
        for text in f:
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                return data
    return None


def _detect_record(rec: dict[str, Any]) -> str:
    keys = set(rec)
    if {"statement", "label"} <= keys:
        return "statements"
    if {"opa", "opb", "opc", "opd", "cop"} <= keys:
        return "medmcqa"
    if {"question", "options", "answer_idx"} <= keys:
        return "medqa"
    if {"id", "question", "options", "answer"} <= keys <= set(Question.model_fields):
        return "clinqa"
    if {"question", "answer"} <= keys and ("options" in keys or {"A", "B"} <= keys):
        return "jsonl"
    return ""


def _detect_keyed(data: dict[str, Any]) -> str:
    first = next(iter(data.values()), None)
    if isinstance(first, dict) and "QUESTION" in first:
        return "pubmedqa"
    inner = next(iter(first.values()), None) if isinstance(first, dict) else None
    if isinstance(inner, dict) and {"question", "options"} <= set(inner):
        return "mirage"
    return ""


def detect_format(path: str | Path) -> str:
    """The format of one file, from its extension and the keys of its first record.

    .parquet is `parquet`; .csv is `mmlu` when the first row is 6 cells ending in a letter A-D, else a
    CSV with a header (`csv`) when it has question and answer columns; .jsonl/.json are told apart by
    their keys; an empty JSON-lines file counts as `clinqa`. Anything else: a ClinqaError asking for --format.
    """
    path = Path(path)
    ext = path.suffix.lower()
    try:
        if ext == ".parquet":
            return "parquet"
        if ext == ".csv":
            first = next(_csv_rows(path), None)
            if first is None:
                return "csv"
            row = [c.strip() for c in first[1]]
            if len(row) == 6 and row[5] in ("A", "B", "C", "D"):
                return "mmlu"
            if {"question", "answer"} <= set(row):
                return "csv"
            raise _pass_format(
                path,
                f"a CSV whose header ({', '.join(row)}) has no question and answer columns (map yours with a mapping and --format csv)",
            )
        if ext in _JSONL:
            if ext == ".json":
                try:
                    data = json.loads(path.read_text(encoding="utf-8-sig"))
                except json.JSONDecodeError:
                    data = None  # perhaps JSON lines (MedMCQA ships those as .json)
                if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
                    name = _detect_keyed(data)
                    if name:
                        return name
            rec = _first_record(path)
            if rec is None:
                return "clinqa"
            name = _detect_record(rec)
            if name:
                return name
            raise _pass_format(path, f"its first record has keys {', '.join(sorted(rec))}, which match no known format")
    except UnicodeDecodeError:
        raise ClinqaError(f"{path}: not a UTF-8 text file") from None
    raise _pass_format(path, f"unknown extension {ext or '(none)'!r}")


def _generic_by_extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in (".csv", ".parquet"):
        return ext[1:]
    if ext in _JSONL:
        return "jsonl"
    raise _pass_format(path, f"unknown extension {ext or '(none)'!r} for a file with a column mapping")


# --------------------------------------------------------------------------------------------------
# The entry point


def _files(spec: str | Path, format: str | None, mapping: dict[str, str] | None) -> list[tuple[Path, str]]:
    """(file, format) pairs to read for a spec."""
    if is_bundled_spec(spec):
        name = parse_bundled_spec(str(spec))
        return [(p, format or bundled_format(name)) for p in bundled_files(name)]
    path = Path(spec).expanduser()
    if not path.exists():
        raise ClinqaError(f"no such file or folder: {spec}")
    if path.is_dir():
        extensions = FORMATS[format].extensions if format else _ALL_EXTENSIONS
        found = sorted(
            p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
        )
        if not found:
            raise ClinqaError(
                f"no question files in folder {path} (looked for {', '.join('*' + e for e in extensions)}; subfolders are not searched)"
            )
    else:
        found = [path]
    return [(p, format or (_generic_by_extension(p) if mapping else detect_format(p))) for p in found]


def _check_mapping(mapping: dict[str, str], formats: set[str]) -> None:
    for fmt in formats:
        if fmt not in GENERIC_FORMATS:
            raise ClinqaError(f"a column mapping only applies to the formats {', '.join(GENERIC_FORMATS)}, not {fmt}")
    for key, column in mapping.items():
        if key not in MAPPING_KEYS:
            raise ClinqaError(f"unknown mapping key {key!r}: use {', '.join(MAPPING_KEYS)}")
        if not isinstance(column, str) or not column.strip():
            raise ClinqaError(f"the mapping for {key!r} must name a column, got {column!r}")


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
        _check_mapping(mapping, {fmt for _, fmt in files})

    questions: list[Question] = []
    skipped: list[Problem] = []
    seen: dict[str, str] = {}  # id -> where it was first seen

    def problem(p: Problem) -> None:
        if not skip_invalid:
            raise ClinqaError(f"{p} (use --skip-invalid to skip bad rows)")
        skipped.append(p)

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

    return LoadResult(questions=questions, skipped=skipped, format="+".join(dict.fromkeys(fmt for _, fmt in files)))


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
