"""Retrieval: a passage index (BM25 + dense MiniLM) over documents; the predictor that puts retrieved
passages before a prompt is `clinqa.adapt.rag` (it imports this module, never the other way). Reading
and chunking the corpus is `clinqa.adapt.corpus` (its names are re-exported here).

    corpus      load_documents(path)   a folder of .txt/.md (one document per file) and .jsonl files
                                       (one document per line: id, text, optional title/source/topic),
                                       or `bundled`: src/clinqa/data/bundled/corpus/*.jsonl
    passages    chunk(doc)             word windows of 120 words overlapping by 20, ids `{doc_id}#{n}`
    index       build_index(docs, out) a folder: index.json (metadata), passages.jsonl, bm25/ (bm25s's own
                                       save format), embeddings.npy (unit-length float32 MiniLM rows)
    search      Index.load(out).search(query, k=5, mode="bm25" | "dense" | "fused")
    predictor   clinqa.adapt.rag.RagPredictor(base, index), or the spec modifier `MODEL+rag:INDEX@k=5,mode=fused`

Everything runs offline on CPU: BM25 is bm25s (English stopwords removed by its tokenizer, no stemming)
and the dense encoder is the bundled all-MiniLM-L6-v2 (clinqa.models.embed), so nothing is ever
downloaded. Dense search is an exact dot product over all passages (fast enough to ~10^6 passages).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from clinqa.adapt.corpus import (
    BUNDLED,
    DEFAULT_MAX_WORDS,
    DEFAULT_OVERLAP,
    Document,
    Passage,
    as_documents,
    bundled_corpus_dir,
    bundled_corpus_files,
    chunk,
    load_documents,
)
from clinqa.errors import ClinqaError

INDEX_FORMAT = "clinqa.retrieval_index"
INDEX_VERSION = 1
INDEX_META = "index.json"
PASSAGES_FILE = "passages.jsonl"
BM25_DIR = "bm25"
EMBEDDINGS_FILE = "embeddings.npy"

SEARCH_MODES = ("bm25", "dense", "fused")

RRF_K = 60
FUSION_DEPTH = 100  # each ranking contributes its top max(FUSION_DEPTH, k) passages to the fusion
BM25_STOPWORDS = "en"  # bm25s's English stopword list

# (stage, done, total): stages "load", "chunk", "bm25", "embed", "save"
Progress = Callable[[str, int, int], None]


# -- search results --------------------------------------------------------------------------------
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


def import_bm25s():
    """The bm25s module, with its logger at WARNING: bm25s sets it to DEBUG when imported, so once any
    library has configured the root logger every index build prints "Building index from tokens"."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def bm25_tokenize(
    texts: Sequence[str],
    *,
    extra_stopwords: Sequence[str] = (),
    split_camel_case: bool = False,
    fold: Callable[[str], str] | None = None,
) -> list[list[str]]:
    """bm25s's tokenizer with English stopwords (plus `extra_stopwords`), optionally after splitting
    CamelCase words ("MedicationRequest" -> "Medication Request") and with each token passed through
    `fold` (e.g. plural folding). The one BM25 tokenizer: the index here and the records selector."""
    bm25s = import_bm25s()

    if split_camel_case:
        texts = [re.sub(r"(?<=[a-z])(?=[A-Z])", " ", t) for t in texts]
    stop: str | list[str] = BM25_STOPWORDS
    if extra_stopwords:
        from bm25s.stopwords import STOPWORDS_EN

        stop = list(STOPWORDS_EN) + list(extra_stopwords)
    tokens = bm25s.tokenize(list(texts), stopwords=stop, return_ids=False, show_progress=False)
    return [[fold(w) for w in doc] for doc in tokens] if fold is not None else tokens


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
        bm25s = import_bm25s()

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
        for i, toks in enumerate(bm25_tokenize(queries)):
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
    bm25s = import_bm25s()

    from clinqa.models.embed import embed_texts, embedding_model_name

    say = progress or (lambda stage, done, total: None)
    t_start = time.perf_counter()
    if isinstance(docs_or_path, (str, Path)):
        source = BUNDLED if str(docs_or_path) == BUNDLED else str(Path(docs_or_path).expanduser().resolve())
        docs = load_documents(docs_or_path)
    else:
        source = "in-memory documents"
        docs = as_documents(docs_or_path)
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
    retriever.index(bm25_tokenize(texts), show_progress=False)
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
    "DEFAULT_MAX_WORDS",
    "DEFAULT_OVERLAP",
    "Document",
    "Hit",
    "Index",
    "Passage",
    "RRF_K",
    "SEARCH_MODES",
    "build_index",
    "bm25_tokenize",
    "build_index_cmd",
    "bundled_corpus_dir",
    "bundled_corpus_files",
    "bundled_index",
    "bundled_index_path",
    "chunk",
    "describe",
    "format_hits",
    "load_documents",
    "open_index",
    "query",
    "reciprocal_rank_fusion",
]
