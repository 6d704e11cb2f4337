"""Retrieval-augmented prediction: a passage index (BM25 + dense MiniLM) and a predictor wrapper.

    corpus      load_documents(path)   a folder of .txt/.md (one document per file) and .jsonl files
                                       (one document per line: id, text, optional title/source/topic),
                                       or `bundled`: src/clinqa/data/bundled/corpus/*.jsonl
    passages    chunk(doc)             word windows of 120 words overlapping by 20, ids `{doc_id}#{n}`
    index       build_index(docs, out) a folder: index.json (metadata), passages.jsonl, bm25/ (bm25s's own
                                       save format), embeddings.npy (unit-length float32 MiniLM rows)
    search      Index.load(out).search(query, k=5, mode="bm25" | "dense" | "fused")
    predictor   RagPredictor(base, index)  or the spec modifier `MODEL+rag:INDEX@k=5,mode=fused`

Everything runs offline on CPU: BM25 is bm25s (English stopwords removed by its tokenizer, no stemming)
and the dense encoder is the bundled all-MiniLM-L6-v2 (clinqa.specialties.embed), so nothing is ever
downloaded. Dense search is an exact dot product over all passages (fast enough to ~10^6 passages).

`RagPredictor` puts the retrieved passages before each prompt it is given:

    Reference passages:
    [doc#0] text of the best passage
    [doc#3] text of the second
    <blank line>
    <the original prompt, unchanged>

trimmed to a token budget, and records the passage ids as the sample's `retrieved` annotation. With
`mode=iterative` generation becomes a reason-search-observe loop (see RagPredictor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from clinqa.errors import ClinqaError
from clinqa.models.base import ContinuationScore, GenerationConfig, Predictor
from clinqa.models.spec import Modifier

INDEX_FORMAT = "clinqa.retrieval_index"
INDEX_VERSION = 1
INDEX_META = "index.json"
PASSAGES_FILE = "passages.jsonl"
BM25_DIR = "bm25"
EMBEDDINGS_FILE = "embeddings.npy"

SEARCH_MODES = ("bm25", "dense", "fused")
RAG_MODES = (*SEARCH_MODES, "iterative")
BUNDLED = "bundled"

DEFAULT_MAX_WORDS = 120
DEFAULT_OVERLAP = 20
RRF_K = 60
FUSION_DEPTH = 100  # each ranking contributes its top max(FUSION_DEPTH, k) passages to the fusion
BM25_STOPWORDS = "en"  # bm25s's English stopword list
WORDS_TO_TOKENS = 1.3  # token estimate when the base predictor has no tokenizer (`encode`)
RAG_HEADER = "Reference passages:\n"
MIN_TRIMMED_WORDS = 8  # a passage cut to fit the budget keeps at least this many words, else it is dropped

# (stage, done, total): stages "load", "chunk", "bm25", "embed", "save"
Progress = Callable[[str, int, int], None]


# -- corpus ---------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Hit:
    passage_id: str
    score: float  # BM25 score, cosine similarity, or reciprocal-rank-fusion score, by mode
    text: str
    title: str = ""
    source: str = ""

    @property
    def doc_id(self) -> str:
        return self.passage_id.rsplit("#", 1)[0]


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


def _topics(value: Any) -> tuple[str, ...]:
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
                topics=_topics(row.get("topics", row.get("topic"))),
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


def _as_documents(items: Iterable[Any]) -> list[Document]:
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
                    _topics(d.get("topics", d.get("topic"))),
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


# -- ranking helpers --------------------------------------------------------------------------------
def _top_k(scores: np.ndarray, k: int, *, positive_only: bool = False) -> list[int]:
    """Indices of the k highest scores, best first; ties broken by position (deterministic)."""
    n = len(scores)
    if n == 0 or k <= 0:
        return []
    if k < n:
        kth = np.partition(scores, n - k)[n - k]
        cand = np.flatnonzero(scores >= kth)
    else:
        cand = np.arange(n)
    order = cand[np.lexsort((cand, -scores[cand]))][:k]
    if positive_only:
        order = order[scores[order] > 0]
    return [int(i) for i in order]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Any]], k: int = RRF_K) -> list[tuple[Any, float]]:
    """Reciprocal-rank fusion (Cormack, Clarke & Buettcher, "Reciprocal rank fusion outperforms
    Condorcet and individual rank learning methods", SIGIR 2009): score(d) = sum over rankings of
    1 / (k + rank of d), ranks from 1, k = 60 as in the paper. Returns (item, score), best first;
    ties go to the item with the better best rank, then to the one seen first."""
    scores: dict[Any, float] = {}
    best: dict[Any, int] = {}
    first: dict[Any, int] = {}
    for ranking in rankings:
        for r, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + r)
            best[item] = min(best.get(item, r), r)
            first.setdefault(item, len(first))
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]], first[kv[0]]))


def _bm25_tokenize(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=BM25_STOPWORDS, return_ids=False, show_progress=False)


# -- the index --------------------------------------------------------------------------------------
class Index:
    """A saved passage index: BM25 always, dense MiniLM vectors when built with dense=True."""

    def __init__(
        self,
        path: Path,
        meta: dict,
        passages: list[Passage],
        bm25: Any,
        embeddings: np.ndarray | None,
        model: Any = None,
    ):
        self.path = path
        self.meta = meta
        self.passages = passages
        self._bm25 = bm25
        self.embeddings = embeddings
        self._model = model

    # -- loading --------------------------------------------------------------------------------
    @staticmethod
    def is_index(path: str | Path) -> bool:
        try:
            meta = json.loads((Path(path) / INDEX_META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and meta.get("format") == INDEX_FORMAT

    @classmethod
    def load(cls, path: str | Path, *, model: Any = None) -> Index:
        """Open an index folder written by build_index. `model` overrides the recorded query encoder."""
        import bm25s

        path = Path(path).expanduser()
        hint = "build one with build_index(docs, folder) (CLI: clinqa index build DOCS OUT)"
        if not path.is_dir():
            raise ClinqaError(f"retrieval index {path} does not exist: {hint}")
        meta_path = path / INDEX_META
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ClinqaError(f"{path} is not a clinqa retrieval index (no {INDEX_META}): {hint}") from None
        except (OSError, ValueError) as e:
            raise ClinqaError(f"{meta_path} is unreadable ({e}): rebuild the index") from e
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise ClinqaError(
                f"{path} is not a clinqa retrieval index ({INDEX_META} has no format {INDEX_FORMAT!r}): {hint}"
            )
        if meta.get("version") != INDEX_VERSION:
            raise ClinqaError(
                f"{path}: unsupported index version {meta.get('version')} (expected {INDEX_VERSION}); rebuild it"
            )
        try:
            with open(path / PASSAGES_FILE, encoding="utf-8") as f:
                passages = [Passage.from_json(json.loads(line)) for line in f if line.strip()]
        except (OSError, ValueError, KeyError) as e:
            raise ClinqaError(f"{path}/{PASSAGES_FILE} is missing or damaged ({e}): rebuild the index") from e
        try:
            bm25 = bm25s.BM25.load(str(path / BM25_DIR), show_progress=False, verbosity=0)
        except Exception as e:  # noqa: BLE001 - any damage in bm25s's files
            raise ClinqaError(f"{path}/{BM25_DIR} is missing or damaged ({e}): rebuild the index") from e
        embeddings = None
        if meta.get("dense"):
            try:
                embeddings = np.load(path / EMBEDDINGS_FILE, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ClinqaError(f"{path}/{EMBEDDINGS_FILE} is missing or damaged ({e}): rebuild the index") from e
        n = len(passages)
        if (
            n != meta.get("n_passages")
            or bm25.scores.get("num_docs") != n
            or (embeddings is not None and len(embeddings) != n)
        ):
            raise ClinqaError(
                f"{path}: the passage, BM25 and embedding counts disagree; the index is damaged, rebuild it"
            )
        if model is None and meta.get("embedding_model") not in (None, _minilm_name()):
            model = meta["embedding_model"]  # a local encoder folder recorded at build time
        return cls(path, meta, passages, bm25, embeddings, model)

    def __len__(self) -> int:
        return len(self.passages)

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, passages={len(self)}, dense={self.has_dense})"

    @property
    def has_dense(self) -> bool:
        return self.embeddings is not None

    # -- searching ------------------------------------------------------------------------------
    def _check_mode(self, mode: str) -> None:
        if mode not in SEARCH_MODES:
            raise ClinqaError(f"unknown search mode {mode!r}: use one of {', '.join(SEARCH_MODES)}")
        if mode != "bm25" and not self.has_dense:
            raise ClinqaError(
                f"the index {self.path} has no dense vectors (built with --no-dense): search with --mode bm25 (or +rag:INDEX@mode=bm25), or rebuild it with dense vectors"
            )

    def bm25_scores(self, queries: Sequence[str]) -> np.ndarray:
        """[len(queries), len(passages)] BM25 scores (0 where no query term occurs)."""
        vocab = self._bm25.vocab_dict
        out = np.zeros((len(queries), len(self)), dtype=np.float32)
        for i, toks in enumerate(_bm25_tokenize(queries)):
            toks = [t for t in toks if t in vocab]
            if toks:
                out[i] = self._bm25.get_scores(toks)
        return out

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        from clinqa.models.embed import embed_texts

        return embed_texts(list(queries), model=self._model)

    def _rows_per_block(self) -> int:
        return max(1, min(256, (1 << 25) // max(len(self), 1)))  # score blocks of at most 128 MB

    def _bm25_ranking(self, queries: Sequence[str], depth: int) -> list[list[tuple[int, float]]]:
        out, step = [], self._rows_per_block()
        for start in range(0, len(queries), step):
            scores = self.bm25_scores(queries[start : start + step])
            out += [[(i, float(row[i])) for i in _top_k(row, depth, positive_only=True)] for row in scores]
        return out

    def _dense_ranking(self, queries: Sequence[str], depth: int) -> list[list[tuple[int, float]]]:
        q = self.embed_queries(queries)
        out, step = [], self._rows_per_block()
        for start in range(0, len(q), step):
            sims = q[start : start + step] @ self.embeddings.T
            out += [[(i, float(row[i])) for i in _top_k(row, depth)] for row in sims]
        return out

    def search_many(self, queries: Sequence[str], k: int = 5, mode: str = "fused") -> list[list[Hit]]:
        """The top k passages for each query. bm25 returns only passages sharing a term with the
        query (so possibly fewer than k); dense and fused return k (or all, for a smaller index)."""
        self._check_mode(mode)
        if k < 1:
            raise ClinqaError(f"k must be at least 1, got {k}")
        queries = [q if isinstance(q, str) else str(q) for q in queries]
        if not queries:
            return []
        if mode == "bm25":
            ranked = self._bm25_ranking(queries, k)
        elif mode == "dense":
            ranked = self._dense_ranking(queries, k)
        else:
            depth = max(FUSION_DEPTH, k)
            lex, den = self._bm25_ranking(queries, depth), self._dense_ranking(queries, depth)
            ranked = [reciprocal_rank_fusion([[i for i, _ in a], [i for i, _ in b]])[:k] for a, b in zip(lex, den)]
        return [[self._hit(i, s) for i, s in row] for row in ranked]

    def search(self, query: str, k: int = 5, mode: str = "fused") -> list[Hit]:
        return self.search_many([query], k=k, mode=mode)[0]

    def _hit(self, i: int, score: float) -> Hit:
        p = self.passages[i]
        return Hit(p.id, float(score), p.text, p.title, p.source)

    def passage(self, passage_id: str) -> Passage:
        if not hasattr(self, "_by_id"):
            self._by_id = {p.id: p for p in self.passages}
        try:
            return self._by_id[passage_id]
        except KeyError:
            raise ClinqaError(f"no passage {passage_id!r} in the index {self.path}") from None


def _minilm_name() -> str:
    from clinqa.models.embed import MINILM_NAME

    return MINILM_NAME


def build_index(
    docs_or_path: str | Path | Iterable[Document | Mapping[str, Any]],
    out_dir: str | Path,
    *,
    dense: bool = True,
    progress: Progress | None = None,
    max_words: int = DEFAULT_MAX_WORDS,
    overlap: int = DEFAULT_OVERLAP,
    model: Any = None,
    batch_size: int = 64,
) -> Index:
    """Chunk, index with BM25 (and MiniLM when `dense`), write to `out_dir` and return the loaded index.

    `docs_or_path` is a corpus path for load_documents (a folder, a file, or `bundled`) or documents.
    The folder is written next to `out_dir` and moved into place at the end, so a failed build never
    leaves half an index; an existing index there is replaced, any other non-empty folder is refused.
    """
    import bm25s

    from clinqa.models.embed import embed_texts, embedding_model_name

    say = progress or (lambda stage, done, total: None)
    t_start = time.perf_counter()
    if isinstance(docs_or_path, (str, Path)):
        source = BUNDLED if str(docs_or_path) == BUNDLED else str(Path(docs_or_path).expanduser().resolve())
        docs = load_documents(docs_or_path)
    else:
        source = "in-memory documents"
        docs = _as_documents(docs_or_path)
    if not docs:
        raise ClinqaError("no documents to index")
    say("load", len(docs), len(docs))
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not Index.is_index(out))):
        raise ClinqaError(f"{out} exists and is not a clinqa retrieval index: choose an empty or new folder")

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    passages = [p for d in docs for p in chunk(d, max_words, overlap)]
    seconds["chunk"] = time.perf_counter() - t
    say("chunk", len(passages), len(passages))
    # titles are searchable too: a passage is indexed as "title. text" when its text lacks the title
    texts = [p.text if not p.title or p.text.startswith(p.title) else f"{p.title}. {p.text}" for p in passages]

    t = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(_bm25_tokenize(texts), show_progress=False)
    seconds["bm25"] = time.perf_counter() - t
    say("bm25", len(passages), len(passages))

    embeddings = None
    if dense:
        t = time.perf_counter()
        parts, step = [], max(batch_size * 8, 1)
        for start in range(0, len(texts), step):
            parts.append(embed_texts(texts[start : start + step], batch_size=batch_size, model=model))
            say("embed", min(start + step, len(texts)), len(texts))
        embeddings = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        seconds["dense"] = time.perf_counter() - t

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        t = time.perf_counter()
        retriever.save(str(tmp / BM25_DIR), show_progress=False)
        with open(tmp / PASSAGES_FILE, "w", encoding="utf-8") as f:
            for p in passages:
                f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
        if embeddings is not None:
            np.save(tmp / EMBEDDINGS_FILE, embeddings, allow_pickle=False)
        seconds["save"] = time.perf_counter() - t
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "corpus": source,
            "n_documents": len(docs),
            "n_passages": len(passages),
            "chunking": {"max_words": max_words, "overlap": overlap, "unit": "whitespace words"},
            "bm25": {
                "library": "bm25s",
                "library_version": getattr(bm25s, "__version__", "?"),
                "method": retriever.method,
                "k1": retriever.k1,
                "b": retriever.b,
                "stopwords": BM25_STOPWORDS,
                "stemmer": None,
                "vocab_size": len(retriever.vocab_dict),
            },
            "dense": embeddings is not None,
            "embedding_model": embedding_model_name(model) if embeddings is not None else None,
            "embedding_dim": int(embeddings.shape[1]) if embeddings is not None else None,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": {
                **{k: round(v, 4) for k, v in seconds.items()},
                "total": round(time.perf_counter() - t_start, 4),
            },
        }
        (tmp / INDEX_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        say("save", 1, 1)
        if out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not Index.is_index(out):  # else another process finished the same build first: use its index
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Index.load(out, model=model)


# -- the bundled corpus's cached index -------------------------------------------------------------------
def bundled_index_path() -> Path:
    """Where the bundled corpus's index is cached: a folder per corpus content under the cache root."""
    from clinqa.models.embedded import cache_root

    h = hashlib.sha256(
        f"{INDEX_FORMAT}/{INDEX_VERSION}/{DEFAULT_MAX_WORDS}/{DEFAULT_OVERLAP}/{_minilm_name()}".encode()
    )
    for f in bundled_corpus_files():
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return cache_root() / "indexes" / f"bundled-{h.hexdigest()[:16]}"


def bundled_index(progress: Progress | None = None) -> Index:
    """The index of the bundled corpus, built on first use and cached (rebuilt when the corpus changes)."""
    path = bundled_index_path()
    if Index.is_index(path):
        try:
            return Index.load(path)
        except ClinqaError:
            pass  # damaged: rebuild below
    return build_index(BUNDLED, path, dense=True, progress=progress)


def open_index(target: str | Path | Index) -> Index:
    """An Index from an index folder, `bundled`, or an Index (returned as is)."""
    if isinstance(target, Index):
        return target
    if str(target) == BUNDLED:
        return bundled_index()
    return Index.load(target)


# -- query extraction ---------------------------------------------------------------------------------
_TRAILING_ANSWER = re.compile(r"(?:^|\n)[ \t]*Answer:[ \t]*$")
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.*\S)\s*$")
_QUESTION_PREFIX = re.compile(r"^\s*Question:\s*", re.IGNORECASE)
_INSTRUCTION_WORD = re.compile(r"\banswer\b", re.IGNORECASE)


def retrieval_query(prompt: str, *, include_options: bool = False) -> str:
    """The search query for a scoring/generation prompt: its question text.

    Heuristic, matched to clinqa.evaluate.prompts (letter, cloze and generate prompts):
      1. a trailing "Answer:" line is removed;
      2. if the prompt has several paragraphs (blank-line separated) and the first mentions "answer"
         without a question mark, it is an instruction (the generate prompt's) and is dropped;
      3. "Context: ..." lines (PubMedQA abstracts) are dropped: the question, not the context, is searched;
      4. the trailing block of option lines ("A. text", "B) text") is removed, its texts appended to
         the query only when include_options is True;
      5. a leading "Question:" is removed and the remaining lines joined with spaces.
    If nothing is left the whole prompt (minus a trailing "Answer:") is the query.
    """
    text = _TRAILING_ANSWER.sub("", prompt.strip()).strip()
    paragraphs = re.split(r"\n[ \t]*\n", text)
    if len(paragraphs) > 1 and _INSTRUCTION_WORD.search(paragraphs[0]) and "?" not in paragraphs[0]:
        paragraphs = paragraphs[1:]
    lines = [ln for ln in "\n".join(paragraphs).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.lstrip().startswith("Context:")]
    options: list[str] = []
    while lines and (m := _OPTION_LINE.match(lines[-1])) and len(lines) > 1:
        options.insert(0, m.group(2))
        lines.pop()
    stem = " ".join(_QUESTION_PREFIX.sub("", ln).strip() for ln in lines)
    query = " ".join([stem, *options]) if include_options else stem
    query = " ".join(query.split())
    return query or " ".join(text.split())


# -- the predictor wrapper ---------------------------------------------------------------------------
ITERATIVE_INSTRUCTION = (
    "You can search a library of medical reference passages before answering. Work in steps. In each "
    "step write one line 'Thought: <what you still need to know>' and then one line 'Search: <a short "
    "search query>'; the passages found are then shown to you as 'Observation:' lines. When you know "
    "enough, write 'Answer:' instead of 'Search:'."
)
_SEARCH_TAG = re.compile(r"\bsearch\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"\b(?:final\s+)?answer\s*:", re.IGNORECASE)
_THOUGHT_TAG = re.compile(r"\bthought\s*:\s*", re.IGNORECASE)


def parse_step(output: str) -> tuple[str, str | None, bool]:
    """(thought, search query or None, answered) from one reason-search step of the model.

    Anything from an "Observation:" the model invents on its own is ignored. The first of "Search:"
    and "Answer:" wins; a model following neither gives (its text, None, False)."""
    text = re.split(r"\bobservation\s*:", output, maxsplit=1, flags=re.IGNORECASE)[0]
    s, a = _SEARCH_TAG.search(text), _ANSWER_TAG.search(text)
    cut = min([m.start() for m in (s, a) if m] or [len(text)])
    thought = _THOUGHT_TAG.sub("", text[:cut], count=1)
    thought = " ".join(thought.split())[:1000]
    if a and (not s or a.start() < s.start()):
        return thought, None, True
    if s:
        query = s.group(1).strip().strip("<>\"'`*").strip()
        return thought, (" ".join(query.split())[:300] or None), False
    return thought, None, False


@dataclass
class _Retrieval:
    query: str
    hits: list[Hit]  # the passages in the block, in order
    block: str  # RAG_HEADER ... "\n\n", or "" when nothing fits


@dataclass
class _Trace:
    prompt: str
    question: str
    steps: list[dict] = field(default_factory=list)
    observed: list[Hit] = field(default_factory=list)
    transcript: str = ""
    done: bool = False
    stopped: str = "max_steps"

    @property
    def seen(self) -> set[str]:
        return {h.passage_id for h in self.observed}


class _LRU(OrderedDict):
    def __init__(self, maxsize: int):
        super().__init__()
        self.maxsize = maxsize

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


class RagPredictor:
    """Any predictor with retrieved passages put before its prompts.

    Every context (score_continuations), prompt (next_token_logprobs, generate) and text
    (hidden_states) becomes `RAG_HEADER + "[id] text\\n" per passage + "\\n" + original`; continuations
    and candidates are unchanged. The query is the question extracted from the prompt (see
    retrieval_query; `include_options` adds the option texts). Passages are taken best first while the
    block fits `budget_tokens` (counted with the base's `encode` when it has one, else 1.3 tokens per
    word); the first one that does not fit is cut to the remaining budget (or dropped if under 8 words).
    Retrievals are cached per prompt and per query; `annotations(prompt)` reports them.

    mode=iterative turns generate into a reason-search-observe loop: the model is asked for
    "Thought: ... Search: <query>", the wrapper appends "Observation: [id] text" lines (passages not
    seen before, `budget_tokens // steps` per step) and asks again, for up to `steps` steps or until it
    writes "Answer:". A step without a usable "Search:" searches the question itself, so a model that
    ignores the format still gets passages; a model answering before any search gets one such search.
    Then the original prompt, prefixed by every observed passage (within the budget), is generated
    with the caller's config, so the answer comes in the format the caller asked for. Scoring methods
    in iterative mode retrieve once with `search_mode`.
    """

    def __init__(
        self,
        base: Predictor,
        index: Index | str | Path,
        k: int = 5,
        mode: str = "fused",
        budget_tokens: int = 768,
        *,
        include_options: bool = False,
        steps: int = 3,
        search_mode: str = "fused",
        step_tokens: int = 128,
        cache_size: int = 10000,
        spec_suffix: str | None = None,
    ):
        if mode not in RAG_MODES:
            raise ClinqaError(f"unknown retrieval mode {mode!r}: use one of {', '.join(RAG_MODES)}")
        if search_mode not in SEARCH_MODES:
            raise ClinqaError(f"unknown search mode {search_mode!r}: use one of {', '.join(SEARCH_MODES)}")
        if k < 1:
            raise ClinqaError(f"k must be at least 1, got {k}")
        if budget_tokens < 1:
            raise ClinqaError(f"the token budget must be at least 1, got {budget_tokens}")
        if steps < 1:
            raise ClinqaError(f"steps must be at least 1, got {steps}")
        self.base = base
        self.index = open_index(index)
        self.k, self.mode, self.budget_tokens = int(k), mode, int(budget_tokens)
        self.include_options, self.steps, self.step_tokens = bool(include_options), int(steps), int(step_tokens)
        self.search_mode = mode if mode in SEARCH_MODES else search_mode
        self.index._check_mode(self.search_mode)
        self._records: _LRU = _LRU(cache_size)  # prompt -> _Retrieval
        self._hits: _LRU = _LRU(cache_size)  # query -> hits (before trimming)
        self._traces: _LRU = _LRU(cache_size)  # prompt -> iterative annotations
        suffix = spec_suffix or f"rag:{self.index.path}@k={self.k},mode={mode}"
        extra = {
            **getattr(base.info, "extra", {}),
            "rag": {"index": str(self.index.path), "k": self.k, "mode": mode, "budget_tokens": self.budget_tokens},
        }
        self.info = dataclasses.replace(base.info, spec=f"{base.info.spec}+{suffix}", extra=extra)
        enc = getattr(base, "encode", None)
        self._encode = enc if callable(enc) else None

    def __getattr__(self, name: str):
        # tokenizer helpers (encode, ...) and other backend extras come from the wrapped predictor
        if name.startswith("_") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"RagPredictor({self.base!r}, {self.index!r}, k={self.k}, mode={self.mode!r})"

    # -- budget ---------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        if self._encode is not None:
            return len(self._encode(text))
        return math.ceil(WORDS_TO_TOKENS * len(text.split()))

    def passage_block(
        self,
        hits: Sequence[Hit],
        budget: int | None = None,
        *,
        prefix: str = RAG_HEADER,
        line: str = "[{id}] {text}",
        suffix: str = "\n",
    ) -> tuple[str, list[Hit]]:
        """(block, hits kept): as many passages as fit the budget, best first, the last maybe cut."""
        budget = self.budget_tokens if budget is None else budget
        lines: list[str] = []
        kept: list[Hit] = []

        def render(extra: str | None = None) -> str:
            body = lines + ([extra] if extra is not None else [])
            return prefix + "".join(f"{ln}\n" for ln in body) + suffix

        for h in hits:
            text = " ".join(h.text.split())
            full = line.format(id=h.passage_id, text=text)
            if self.count_tokens(render(full)) <= budget:
                lines.append(full)
                kept.append(h)
                continue
            words = text.split()
            lo, hi = 0, len(words) - 1  # the most words that fit, by bisection
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if (
                    self.count_tokens(render(line.format(id=h.passage_id, text=" ".join(words[:mid]) + " ...")))
                    <= budget
                ):
                    lo = mid
                else:
                    hi = mid - 1
            if lo >= MIN_TRIMMED_WORDS:
                lines.append(line.format(id=h.passage_id, text=" ".join(words[:lo]) + " ..."))
                kept.append(h)
            break
        return (render() if lines else ""), kept

    # -- single-shot retrieval ------------------------------------------------------------------
    def _search(self, queries: Sequence[str], k: int) -> dict[str, list[Hit]]:
        got = {q: self._hits[(q, k)] for q in dict.fromkeys(queries) if (q, k) in self._hits}
        todo = [q for q in dict.fromkeys(queries) if q not in got]
        if todo:
            for q, hits in zip(todo, self.index.search_many(todo, k=k, mode=self.search_mode)):
                got[q] = hits
                self._hits.put((q, k), hits)
        return got

    def retrieve(self, prompts: Sequence[str]) -> list[_Retrieval]:
        got = {p: self._records[p] for p in dict.fromkeys(prompts) if p in self._records}
        todo = [p for p in dict.fromkeys(prompts) if p not in got]
        if todo:
            queries = {p: retrieval_query(p, include_options=self.include_options) for p in todo}
            found = self._search(list(queries.values()), self.k)
            for p in todo:
                block, kept = self.passage_block(found[queries[p]])
                got[p] = _Retrieval(queries[p], kept, block)
                self._records.put(p, got[p])
        return [got[p] for p in prompts]

    def rewrite(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt with its retrieved passages put before it (unchanged when none fit)."""
        return [r.block + p for p, r in zip(prompts, self.retrieve(prompts))]

    # -- the Predictor protocol -----------------------------------------------------------------
    def score_continuations(self, groups: Sequence[tuple[str, Sequence[str]]]) -> list[list[ContinuationScore]]:
        contexts = self.rewrite([ctx for ctx, _ in groups])
        return self.base.score_continuations([(c, conts) for c, (_, conts) in zip(contexts, groups)])

    def next_token_logprobs(self, contexts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        return self.base.next_token_logprobs(self.rewrite(contexts), candidates)

    def generate(self, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
        if self.mode == "iterative":
            return self._generate_iterative(list(prompts), config or GenerationConfig())
        return self.base.generate(self.rewrite(prompts), config)

    def hidden_states(self, texts: Sequence[str], layers: Sequence[int]) -> list[np.ndarray]:
        return self.base.hidden_states(self.rewrite(texts), layers)

    def annotations(self, prompt: str) -> dict:
        """{"retrieved": [passage ids], "rag_mode": mode, "rag_query": query}; for a prompt generated
        in iterative mode {"steps": [...], "retrieved": [...], "rag_mode": "iterative", "stopped": why}.
        The wrapped predictor's own annotations (of the rewritten prompt) are kept."""
        if prompt in self._traces:
            out = dict(self._traces[prompt])
            rewritten = out.pop("_final_prompt")
        else:
            r = self.retrieve([prompt])[0]
            rewritten = r.block + prompt
            out = {"retrieved": [h.passage_id for h in r.hits], "rag_mode": self.search_mode, "rag_query": r.query}
        base_fn = getattr(self.base, "annotations", None)
        return {**(dict(base_fn(rewritten)) if base_fn is not None else {}), **out}

    # -- iterative reason-search-observe ---------------------------------------------------------
    def step_prompt(self, trace: _Trace) -> str:
        return f"{ITERATIVE_INSTRUCTION}\n\nTask:\n{trace.prompt}\n\n{trace.transcript}Thought:"

    def _generate_iterative(self, prompts: list[str], config: GenerationConfig) -> list[str]:
        traces = [_Trace(p, retrieval_query(p, include_options=self.include_options)) for p in prompts]
        step_config = dataclasses.replace(
            config, max_new_tokens=self.step_tokens, stop=tuple(dict.fromkeys([*config.stop, "Observation:"]))
        )
        step_budget = max(self.budget_tokens // self.steps, 1)
        for step in range(1, self.steps + 1):
            active = [t for t in traces if not t.done]
            if not active:
                break
            outputs = self.base.generate([self.step_prompt(t) for t in active], step_config)
            searches: list[tuple[_Trace, dict]] = []
            for t, out in zip(active, outputs):
                out = out or ""
                thought, query, answered = parse_step(out)
                rec = {
                    "step": step,
                    "thought": thought,
                    "query": query,
                    "query_source": "model" if query else None,
                    "retrieved": [],
                    "output": out[:1000],
                }
                t.steps.append(rec)
                if answered:
                    t.done, t.stopped = True, "answer"
                    if t.observed:
                        continue
                    rec["note"] = "answered before any search: searched the question once"
                if not query:
                    rec["query"], rec["query_source"] = t.question, "fallback"
                searches.append((t, rec))
            if not searches:
                continue
            depth = self.k + max(len(t.observed) for t, _ in searches)
            found = self.index.search_many([rec["query"] for _, rec in searches], k=depth, mode=self.search_mode)
            for (t, rec), hits in zip(searches, found):
                seen = t.seen
                new = [h for h in hits if h.passage_id not in seen][: self.k]
                obs, kept = self.passage_block(
                    new, step_budget, prefix="", line="Observation: [{id}] {text}", suffix=""
                )
                if not kept:
                    obs = "Observation: (no new passages)\n"
                rec["retrieved"] = [h.passage_id for h in kept]
                t.observed += kept
                t.transcript += f"Thought: {rec['thought']}\nSearch: {rec['query']}\n{obs}"
        finals = []
        for t in traces:
            block, kept = self.passage_block(t.observed)
            finals.append(block + t.prompt)
            self._traces.put(
                t.prompt,
                {
                    "rag_mode": "iterative",
                    "steps": t.steps,
                    "retrieved": [h.passage_id for h in t.observed],
                    "in_prompt": [h.passage_id for h in kept],
                    "stopped": t.stopped,
                    "_final_prompt": block + t.prompt,
                },
            )
        return self.base.generate(finals, config)


# -- the spec modifier ---------------------------------------------------------------------------------
_PARAMS = {
    "k": "passages per prompt (int)",
    "mode": "/".join(RAG_MODES),
    "budget": "token budget for the passages (int)",
    "steps": "iterative steps (int)",
    "options": "include option texts in the query (true/false)",
    "search": "search mode for iterative steps (bm25/dense/fused)",
}


def _int_param(params: Mapping[str, str], key: str, default: int, where: str) -> int:
    if key not in params:
        return default
    try:
        v = int(params[key])
    except ValueError:
        raise ClinqaError(f"{where}: {key} must be an integer, got {params[key]!r}") from None
    if v < 1:
        raise ClinqaError(f"{where}: {key} must be at least 1, got {v}")
    return v


def _bool_param(params: Mapping[str, str], key: str, default: bool, where: str) -> bool:
    if key not in params:
        return default
    v = params[key].strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ClinqaError(f"{where}: {key} must be true or false, got {params[key]!r}")


def apply_modifier(predictor: Predictor, modifier: Modifier) -> RagPredictor:
    """`+rag:INDEX@k=5,mode=fused,budget=768` (also steps=3, options=true, search=fused for iterative).

    INDEX is a folder made by build_index, or `bundled` (the bundled corpus, indexed on first use
    into the clinqa cache)."""
    where = str(modifier)
    unknown = sorted(set(modifier.params) - set(_PARAMS) - {"budget_tokens"})
    if unknown:
        raise ClinqaError(
            f"{where}: unknown parameter(s) {', '.join(unknown)}; rag takes "
            + ", ".join(f"{k} ({v})" for k, v in _PARAMS.items())
        )
    p = modifier.params
    mode = p.get("mode", "fused")
    if mode not in RAG_MODES:
        raise ClinqaError(f"{where}: unknown mode {mode!r}: use one of {', '.join(RAG_MODES)}")
    search = p.get("search", "fused")
    if search not in SEARCH_MODES:
        raise ClinqaError(f"{where}: unknown search mode {search!r}: use one of {', '.join(SEARCH_MODES)}")
    budget = _int_param(p, "budget", _int_param(p, "budget_tokens", 768, where), where)
    return RagPredictor(
        predictor,
        open_index(modifier.target),
        k=_int_param(p, "k", 5, where),
        mode=mode,
        budget_tokens=budget,
        include_options=_bool_param(p, "options", False, where),
        steps=_int_param(p, "steps", 3, where),
        search_mode=search,
        spec_suffix=where,
    )


# -- CLI helpers ----------------------------------------------------------------------------------------
def build_index_cmd(
    docs: str | Path,
    out: str | Path,
    *,
    dense: bool = True,
    max_words: int = DEFAULT_MAX_WORDS,
    overlap: int = DEFAULT_OVERLAP,
    progress: Progress | None = None,
) -> Index:
    """`clinqa index build DOCS OUT`: index a corpus folder/file (or `bundled`) into OUT."""
    return build_index(docs, out, dense=dense, progress=progress, max_words=max_words, overlap=overlap)


def query(index_path: str | Path, text: str, k: int = 5, mode: str = "fused") -> list[Hit]:
    """`clinqa index query INDEX TEXT`: the top k passages of an index folder (or `bundled`)."""
    return open_index(index_path).search(text, k=k, mode=mode)


def describe(index: Index) -> str:
    """A one-line summary of an index for the CLI."""
    m = index.meta
    dense = f"dense {m['embedding_model']}" if m.get("dense") else "no dense vectors"
    return (
        f"{index.path}: {m['n_passages']} passages from {m['n_documents']} documents ({m['corpus']}), "
        f"BM25 + {dense}, chunks of {m['chunking']['max_words']} words (overlap {m['chunking']['overlap']}), "
        f"built {m['built_at']} in {m['build_seconds']['total']:.1f}s"
    )


def format_hits(hits: Sequence[Hit], width: int = 160) -> str:
    """Hits as CLI lines: rank, score, passage id, title, and the start of the text."""
    out = []
    for r, h in enumerate(hits, 1):
        text = h.text if len(h.text) <= width else h.text[: width - 3] + "..."
        title = f" {h.title}:" if h.title else ""
        out.append(f"{r:>2}. {h.score:8.4f}  [{h.passage_id}]{title} {text}")
    return "\n".join(out) if out else "(no passages found)"


__all__ = [
    "BUNDLED",
    "Document",
    "Hit",
    "Index",
    "Passage",
    "RAG_MODES",
    "RRF_K",
    "RagPredictor",
    "SEARCH_MODES",
    "apply_modifier",
    "build_index",
    "build_index_cmd",
    "bundled_index",
    "chunk",
    "describe",
    "format_hits",
    "load_documents",
    "open_index",
    "parse_step",
    "query",
    "reciprocal_rank_fusion",
    "retrieval_query",
]
