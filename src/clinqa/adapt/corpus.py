"""The corpus side of retrieval: reading documents (a folder of .txt/.md/.jsonl files, one file, or the
bundled corpus) and chunking them into passages. The index over those passages (BM25 + dense +
fusion) is `clinqa.adapt.retrieval`, which re-exports these names.

    corpus      load_documents(path)   a folder of .txt/.md (one document per file) and .jsonl files
                                       (one document per line: id, text, optional title/source/topic),
                                       or `bundled`: src/clinqa/data/bundled/corpus/*.jsonl
    passages    chunk(doc)             word windows of 120 words overlapping by 20, ids `{doc_id}#{n}`
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from clinqa.errors import ClinqaError

BUNDLED = "bundled"
DEFAULT_MAX_WORDS = 120
DEFAULT_OVERLAP = 20


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""
    source: str = ""
    topics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Passage:
    id: str  # `{doc_id}#{n}`
    doc_id: str
    text: str
    title: str = ""
    source: str = ""
    topics: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "doc_id": self.doc_id,
            "title": self.title,
            "source": self.source,
            "topics": list(self.topics),
            "text": self.text,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Passage:
        return cls(
            str(d["id"]),
            str(d["doc_id"]),
            str(d["text"]),
            str(d.get("title") or ""),
            str(d.get("source") or ""),
            tuple(d.get("topics") or ()),
        )


def bundled_corpus_dir() -> Path:
    from clinqa.data.bundled import bundled_dir

    return bundled_dir() / "corpus"


def bundled_corpus_files() -> list[Path]:
    folder = bundled_corpus_dir()
    found = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not found:
        raise ClinqaError(
            f"the bundled corpus is missing: no .jsonl files in {folder} (reinstall clinqa, or index a folder of your own)"
        )
    return found


def topics_of(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value if v not in (None, ""))
    return (str(value),)


def _title_of(text: str) -> str:
    """The first Markdown heading, else the first non-empty line (shortened to 200 characters)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("#"):
            return ln.lstrip("#").strip()[:200]
    return lines[0][:200] if lines else ""


def _read_jsonl(path: Path, source_default: str) -> list[Document]:
    docs = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ClinqaError(f"could not read corpus file {path}: {e}") from e
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ClinqaError(f"{path}:{no}: not valid JSON ({e.msg}); each line must be one document object") from None
        if not isinstance(row, dict):
            raise ClinqaError(f"{path}:{no}: expected a JSON object with 'id' and 'text', got {type(row).__name__}")
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ClinqaError(f"{path}:{no}: the document has no 'text' (a non-empty string is required)")
        doc_id = row.get("id")
        doc_id = f"{path.stem}-{no}" if doc_id in (None, "") else str(doc_id)
        docs.append(
            Document(
                id=doc_id,
                text=text.strip(),
                title=str(row.get("title") or ""),
                source=str(row.get("source") or source_default),
                topics=topics_of(row.get("topics", row.get("topic"))),
            )
        )
    return docs


def _read_text_file(path: Path, doc_id: str, source: str) -> Document | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ClinqaError(f"could not read corpus file {path}: {e}") from e
    if not text:
        return None
    return Document(id=doc_id, text=text, title=_title_of(text), source=source)


def load_documents(path: str | Path) -> list[Document]:
    """Documents from a folder (recursively: .txt/.md one per file, .jsonl one per line), one such
    file, or `bundled` (the bundled corpus). Text files get id = path relative to the folder without
    its suffix, title = first heading or line; .jsonl rows need `text` and should have a unique `id`.
    """
    if str(path) == BUNDLED:
        files, root = bundled_corpus_files(), bundled_corpus_dir()
    else:
        p = Path(path).expanduser()
        if p.is_dir():
            root = p
            files = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in (".txt", ".md", ".jsonl")
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not files:
                raise ClinqaError(
                    f"no .txt, .md or .jsonl files in {p}: put one document per .txt/.md file, or JSONL lines with id and text"
                )
        elif p.is_file():
            root, files = p.parent, [p]
            if p.suffix.lower() not in (".txt", ".md", ".jsonl"):
                raise ClinqaError(f"{p}: corpus files must be .txt, .md or .jsonl")
        else:
            raise ClinqaError(f"corpus {p} does not exist: pass a folder of .txt/.md/.jsonl files, or 'bundled'")
    docs: list[Document] = []
    where: dict[str, str] = {}
    for f in files:
        rel = f.relative_to(root).as_posix()
        if f.suffix.lower() == ".jsonl":
            found = _read_jsonl(f, rel)
        else:
            d = _read_text_file(f, rel.rsplit(".", 1)[0], rel)
            found = [d] if d else []
        for d in found:
            if d.id in where:
                raise ClinqaError(
                    f"duplicate document id {d.id!r} in {rel} (also in {where[d.id]}): ids must be unique"
                )
            where[d.id] = rel
            docs.append(d)
    if not docs:
        raise ClinqaError(f"the corpus {path} has no non-empty documents")
    return docs


def chunk(doc: Document, max_words: int = DEFAULT_MAX_WORDS, overlap: int = DEFAULT_OVERLAP) -> list[Passage]:
    """Split a document into passages of at most `max_words` words, consecutive ones sharing `overlap`
    words. Whitespace is collapsed; ids are `{doc_id}#0`, `{doc_id}#1`, ... (stable for a given text)."""
    if max_words < 1:
        raise ClinqaError(f"max_words must be at least 1, got {max_words}")
    if not 0 <= overlap < max_words:
        raise ClinqaError(f"overlap must be between 0 and max_words - 1 ({max_words - 1}), got {overlap}")
    words = doc.text.split()
    out: list[Passage] = []
    step = max_words - overlap
    start = 0
    while words:
        piece = words[start : start + max_words]
        out.append(Passage(f"{doc.id}#{len(out)}", doc.id, " ".join(piece), doc.title, doc.source, doc.topics))
        if start + max_words >= len(words):
            break
        start += step
    return out


def as_documents(items: Iterable[Any]) -> list[Document]:
    docs = []
    for i, d in enumerate(items):
        if isinstance(d, Document):
            docs.append(d)
        elif isinstance(d, Mapping) and isinstance(d.get("text"), str):
            docs.append(
                Document(
                    str(d.get("id", f"doc-{i}")),
                    d["text"],
                    str(d.get("title") or ""),
                    str(d.get("source") or ""),
                    topics_of(d.get("topics", d.get("topic"))),
                )
            )
        else:
            raise ClinqaError(f"document {i} must be a Document or a mapping with 'text', got {type(d).__name__}")
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise ClinqaError(f"duplicate document id {d.id!r}: ids must be unique")
        seen.add(d.id)
    return docs
