"""WordNet for METEOR, offline: Debian's `wordnet-base` laid out the way NLTK reads it.

NLTK's WordNet reader wants `<nltk_data>/corpora/wordnet/` with the WordNet 3.0 database files and a
`lexnames` file. Debian's `wordnet-base` package (`apt-get install wordnet-base`; `make setup` does
it) installs the same WordNet 3.0 database in /usr/share/wordnet but no `lexnames` (it is only
documented, in lexnames(5WN)). `ensure_wordnet()` copies the Debian files (once, about 28 MB) into
`<clinqa cache>/nltk_data/corpora/wordnet/`, writes `lexnames` (the fixed list of the 45
lexicographer files), puts that folder on `nltk.data.path` and returns a reader. Nothing is ever
downloaded: `nltk.download` is never called.

    from clinqa.records.wordnet import ensure_wordnet
    wn = ensure_wordnet()                      # WordNetCorpusReader, cached per process
    nltk.translate.meteor_score.meteor_score([ref], hyp, wordnet=wn)
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import warnings
from pathlib import Path

from clinqa.errors import ClinqaError

DEBIAN_WORDNET = Path("/usr/share/wordnet")
# The WordNet 3.0 database files NLTK's reader opens. `index.sense` (sense key -> synset) is not in
# Debian's wordnet-base either; NLTK reads it when it builds a reader, so we derive it from the data
# files (`build_index_sense`).
WORDNET_FILES = (
    "adj.exc", "adv.exc", "noun.exc", "verb.exc", "cntlist.rev",
    "data.adj", "data.adv", "data.noun", "data.verb", "index.adj", "index.adv", "index.noun", "index.verb",
)  # fmt: skip
POS_FILES = ("noun", "verb", "adj", "adv")
_SS_TYPE_NUMBER = {"n": 1, "v": 2, "a": 3, "r": 4, "s": 5}

# lexnames(5WN): file number, lexicographer file name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
LEXNAMES: tuple[tuple[str, int], ...] = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1), ("noun.animal", 1),
    ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1), ("noun.cognition", 1), ("noun.communication", 1),
    ("noun.event", 1), ("noun.feeling", 1), ("noun.food", 1), ("noun.group", 1), ("noun.location", 1),
    ("noun.motive", 1), ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1),
    ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1), ("noun.shape", 1),
    ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1), ("verb.body", 2), ("verb.change", 2),
    ("verb.cognition", 2), ("verb.communication", 2), ("verb.competition", 2), ("verb.consumption", 2),
    ("verb.contact", 2), ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2), ("verb.perception", 2),
    ("verb.possession", 2), ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2), ("adj.ppl", 3),
)  # fmt: skip
assert len(LEXNAMES) == 45

_LOCK = threading.Lock()
_READER = None


def lexnames_text() -> str:
    """The `lexnames` file: "00\\tadj.all\\t3" ... "44\\tadj.ppl\\t3", one per line."""
    return "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES))


def wordnet_available(source: str | Path = DEBIAN_WORDNET) -> bool:
    """True when the Debian WordNet files are installed (METEOR can run)."""
    src = Path(source)
    return all((src / f).is_file() for f in WORDNET_FILES)


def _default_cache() -> Path:
    from clinqa.models.embedded import cache_root

    return cache_root() / "nltk_data"


def _copy(src: Path, dst: Path) -> None:
    """Copy unless an up-to-date copy is there. Not a link: NLTK's hardened reader refuses symlinks
    that leave the corpus root and multiply-linked files (hard links). About 28 MB, once."""
    if dst.is_file() and not dst.is_symlink():
        s, d = src.stat(), dst.stat()
        if d.st_size == s.st_size and d.st_mtime >= s.st_mtime and d.st_nlink == 1:
            return
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _data_lines(path: Path):
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.startswith(" "):  # the license header lines start with two spaces
                yield line


def _lemma(word: str) -> str:
    return re.sub(r"\([a-z]+\)$", "", word).lower()  # adjective markers: "long(a)", "galore(ip)"


def build_index_sense(folder: str | Path) -> str:
    """The `index.sense` file of a WordNet 3.0 database folder, derived from its data.*, index.* and
    cntlist.rev files (wndb(5WN), senseidx(5WN)): one "sense_key synset_offset sense_number tag_cnt"
    line per word sense, sorted by sense key. Sense keys are lemma%ss_type:lex_filenum:lex_id:head_word:head_id,
    where an adjective satellite's head is the first word of the cluster head it points to with "&"."""
    folder = Path(folder)
    synsets: dict[tuple[str, str], tuple[str, str, list[tuple[str, int]], str | None]] = {}
    for suffix in POS_FILES:
        for line in _data_lines(folder / f"data.{suffix}"):
            parts = line.split(" | ", 1)[0].split()
            offset, lex_filenum, ss_type, w_cnt = parts[0], parts[1], parts[2], int(parts[3], 16)
            words = [(_lemma(parts[4 + 2 * i]), int(parts[5 + 2 * i], 16)) for i in range(w_cnt)]
            i = 4 + 2 * w_cnt
            p_cnt = int(parts[i])
            head = None
            for j in range(p_cnt):
                symbol, target, pos = parts[i + 1 + 4 * j : i + 4 + 4 * j]
                if ss_type == "s" and symbol == "&" and pos in ("a", "s") and head is None:
                    head = target
            synsets[(suffix, offset)] = (lex_filenum, ss_type, words, head)
    sense_numbers: dict[tuple[str, str, str], int] = {}
    for suffix in POS_FILES:
        for line in _data_lines(folder / f"index.{suffix}"):
            parts = line.split()
            lemma, n_synsets, p_cnt = parts[0], int(parts[2]), int(parts[3])
            offsets = parts[6 + p_cnt : 6 + p_cnt + n_synsets]
            for number, offset in enumerate(offsets, start=1):
                sense_numbers[(suffix, offset, lemma)] = number
    tag_counts: dict[str, int] = {}
    if (folder / "cntlist.rev").is_file():
        for line in _data_lines(folder / "cntlist.rev"):
            key, _number, count = line.split()
            tag_counts[key] = int(count)
    lines = []
    for (suffix, offset), (lex_filenum, ss_type, words, head) in synsets.items():
        head_word = head_id = ""
        if ss_type == "s" and head is not None:
            head_words = synsets[("adj", head)][2]
            head_word, head_id = head_words[0][0], f"{head_words[0][1]:02d}"
        for lemma, lex_id in words:
            key = f"{lemma}%{_SS_TYPE_NUMBER[ss_type]}:{lex_filenum}:{lex_id:02d}:{head_word}:{head_id}"
            number = sense_numbers.get((suffix, offset, lemma), 0)
            lines.append(f"{key} {offset} {number} {tag_counts.get(key, 0)}\n")
    lines.sort()
    return "".join(dict.fromkeys(lines))


def prepare_wordnet_dir(cache: str | Path | None = None, source: str | Path = DEBIAN_WORDNET) -> Path:
    """`<cache>/corpora/wordnet/` filled with copies of `source`'s files plus a
    written `lexnames`; returns the nltk_data root (`cache`). Raises ClinqaError if `source` lacks files."""
    src = Path(source)
    missing = [f for f in WORDNET_FILES if not (src / f).is_file()]
    if missing:
        where = f"{src} is missing" if src.is_dir() else f"{src} does not exist"
        raise ClinqaError(
            f"WordNet (for METEOR) is not installed: {where} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            "install it with `apt-get install wordnet-base` (make setup does this). clinqa never downloads it."
        )
    root = Path(cache) if cache is not None else _default_cache()
    target = root / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for name in WORDNET_FILES:
        _copy((src / name).resolve(), target / name)
    if (src / "index.sense").is_file():
        _copy((src / "index.sense").resolve(), target / "index.sense")
    elif (
        not (target / "index.sense").is_file()
        or (target / "index.sense").stat().st_mtime < (target / "data.noun").stat().st_mtime
    ):
        tmp = target / f".index.sense.tmp{os.getpid()}"
        tmp.write_text(build_index_sense(target), encoding="utf-8")
        os.replace(tmp, target / "index.sense")
    lex = target / "lexnames"
    text = lexnames_text()
    if not lex.is_file() or lex.read_text() != text:
        tmp = target / f".lexnames.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, lex)
    return root


def _reader_class():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNet30(WordNetCorpusReader):
        """NLTK's reader without the start-up mapping to "wordnet" (index.sense read twice, seconds):
        this database is WordNet 3.0 itself, and the mapping only serves Open Multilingual WordNet,
        which is not installed."""

        def map_wn(self, version="wordnet"):
            return None

    return WordNet30


def ensure_wordnet(cache: str | Path | None = None, source: str | Path = DEBIAN_WORDNET):
    """A WordNet 3.0 reader built from the Debian files (cached for the process); also adds the cache
    to `nltk.data.path` so `nltk.corpus.wordnet` finds it. Never downloads."""
    global _READER
    with _LOCK:
        if _READER is not None and cache is None and Path(source) == DEBIAN_WORDNET:
            return _READER
        import nltk

        _WordNet30 = _reader_class()

        root = prepare_wordnet_dir(cache, source)
        if str(root) not in nltk.data.path:
            nltk.data.path.insert(0, str(root))
        with warnings.catch_warnings():
            # "The multilingual functions are not available": Open Multilingual WordNet is not needed.
            warnings.simplefilter("ignore")
            reader = _WordNet30(str(root / "corpora" / "wordnet"), None)
        if cache is None and Path(source) == DEBIAN_WORDNET:
            _READER = reader
        return reader


__all__ = [
    "DEBIAN_WORDNET",
    "LEXNAMES",
    "build_index_sense",
    "ensure_wordnet",
    "lexnames_text",
    "prepare_wordnet_dir",
    "wordnet_available",
]
