"""Retrieval: corpus loading, chunking, BM25/dense/fused search, index round trips, the RAG wrapper
(single-shot and iterative, with scripted fake predictors) and the +rag: modifier."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clinqa.adapt import corpus as corpus_module
from clinqa.adapt import rag as rag_module
from clinqa.adapt import retrieval
from clinqa.adapt.rag import RAG_HEADER, RagPredictor, apply_modifier, parse_step, retrieval_query
from clinqa.adapt.retrieval import Document, Hit, Index, build_index, chunk, load_documents, reciprocal_rank_fusion
from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate import prompts
from clinqa.models.base import ContinuationScore, GenerationConfig, ModelInfo
from clinqa.models.spec import Modifier, parse_spec

JSONL = [
    {
        "id": "hf",
        "title": "Heart failure",
        "source": "notes",
        "topics": ["cardiology"],
        "text": "Loop diuretics such as furosemide relieve pulmonary congestion and peripheral oedema in acute "
        "decompensated heart failure. ACE inhibitors and beta blockers reduce mortality when the ejection "
        "fraction is reduced.",
    },
    {
        "id": "af",
        "title": "Atrial fibrillation",
        "source": "notes",
        "topics": ["cardiology"],
        "text": "Atrial fibrillation is an irregularly irregular rhythm without P waves on the ECG. Anticoagulation "
        "with apixaban or warfarin prevents embolic stroke; the CHA2DS2-VASc score guides the decision.",
    },
    {
        "id": "dka",
        "title": "Diabetic ketoacidosis",
        "source": "notes",
        "topic": "endocrinology",
        "text": "Diabetic ketoacidosis presents with hyperglycaemia, ketonaemia and a high anion gap metabolic "
        "acidosis. Treat with intravenous fluids, a fixed-rate insulin infusion and potassium replacement.",
    },
    {
        "id": "asthma",
        "title": "Acute asthma",
        "source": "notes",
        "text": "Acute severe asthma is treated with oxygen, nebulised salbutamol and ipratropium, and oral "
        "prednisolone; magnesium sulfate is given when the response is poor.",
    },
]
MIGRAINE = (
    "# Migraine\n\nMigraine is a recurrent one-sided throbbing headache with photophobia, nausea and "
    "sometimes a visual aura. Triptans such as sumatriptan abort attacks; propranolol or topiramate "
    "prevent them.\n"
)
SEPSIS = (
    "Sepsis\nSepsis is life-threatening organ dysfunction caused by a dysregulated host response to "
    "infection. Give broad-spectrum antibiotics within one hour, take blood cultures and give crystalloid "
    "for hypotension.\n"
)


def write_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cards.jsonl").write_text("\n".join(json.dumps(r) for r in JSONL) + "\n")
    (folder / "neuro").mkdir(exist_ok=True)
    (folder / "neuro" / "migraine.md").write_text(MIGRAINE)
    (folder / "sepsis.txt").write_text(SEPSIS)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory):
    stages = []
    idx = build_index(corpus, tmp_path_factory.mktemp("idx") / "index", progress=lambda s, d, t: stages.append(s))
    assert {"load", "chunk", "bm25", "embed", "save"} <= set(stages)
    return idx


class FakePredictor:
    """Records what it is given; `encode` splits on whitespace (so budgets are exact word counts)."""

    def __init__(self, script=None, encode=True):
        self.info = ModelInfo(spec="fake", backend="fake", name="fake")
        self.calls = []
        self.script = list(script or [])
        if encode:
            self.encode = lambda text: text.split()

    def score_continuations(self, groups):
        self.calls.append(("score", list(groups)))
        return [[ContinuationScore(-1.0, 1, len(c)) for c in conts] for _, conts in groups]

    def next_token_logprobs(self, contexts, candidates):
        self.calls.append(("next", list(contexts), list(candidates)))
        return np.zeros((len(contexts), len(candidates)))

    def generate(self, prompts, config=None):
        self.calls.append(("generate", list(prompts), config))
        return [self.script.pop(0) if self.script else "Answer: A" for _ in prompts]

    def hidden_states(self, texts, layers):
        self.calls.append(("hidden", list(texts)))
        return [np.zeros((len(layers), 1, 2)) for _ in texts]


# -- corpus and chunking -------------------------------------------------------------------------------
def test_load_documents_reads_jsonl_markdown_and_text(corpus):
    docs = {d.id: d for d in load_documents(corpus)}
    assert set(docs) == {"hf", "af", "dka", "asthma", "neuro/migraine", "sepsis"}
    assert docs["neuro/migraine"].title == "Migraine" and docs["neuro/migraine"].source == "neuro/migraine.md"
    assert docs["sepsis"].title == "Sepsis"
    assert docs["hf"].topics == ("cardiology",) and docs["dka"].topics == ("endocrinology",)
    assert docs["hf"].source == "notes" and docs["asthma"].title == "Acute asthma"


def test_load_documents_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "x", "text": "one"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "x", "text": "two"}) + "\n")
    with pytest.raises(ClinqaError, match="duplicate document id 'x'"):
        load_documents(tmp_path)
    (tmp_path / "b.jsonl").write_text("{not json\n")
    with pytest.raises(ClinqaError, match=r"b\.jsonl:1"):
        load_documents(tmp_path)
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "y", "title": "no text"}) + "\n")
    with pytest.raises(ClinqaError, match="no 'text'"):
        load_documents(tmp_path)
    with pytest.raises(ClinqaError, match="does not exist"):
        load_documents(tmp_path / "missing")


def test_chunk_windows_overlap_and_ids():
    doc = Document("d", " ".join(f"w{i}" for i in range(300)), title="T", source="s")
    parts = chunk(doc, max_words=120, overlap=20)
    assert [p.id for p in parts] == ["d#0", "d#1", "d#2"]
    words = [p.text.split() for p in parts]
    assert words[0] == [f"w{i}" for i in range(120)]
    assert words[1][0] == "w100" and words[1][:20] == words[0][-20:]
    assert words[2] == [f"w{i}" for i in range(200, 300)]
    assert all(p.doc_id == "d" and p.title == "T" and p.source == "s" for p in parts)
    assert chunk(doc, 120, 20) == parts  # stable
    short = chunk(Document("s", "only a  few\nwords"), 120, 20)
    assert [(p.id, p.text) for p in short] == [("s#0", "only a few words")]
    assert len(chunk(Document("e", " ".join(["x"] * 120)), 120, 20)) == 1
    with pytest.raises(ClinqaError, match="overlap"):
        chunk(doc, 10, 10)
    with pytest.raises(ClinqaError, match="max_words"):
        chunk(doc, 0, 0)


# -- searching ---------------------------------------------------------------------------------------------
def test_index_metadata(index):
    m = index.meta
    assert m["n_documents"] == 6 and m["n_passages"] == len(index) == 6
    assert m["dense"] and m["embedding_dim"] == 384 and m["embedding_model"].endswith("all-MiniLM-L6-v2")
    assert m["chunking"] == {"max_words": 120, "overlap": 20, "unit": "whitespace words"}
    assert set(m["build_seconds"]) >= {"bm25", "dense", "total"} and m["built_at"]
    emb = np.load(index.path / "embeddings.npy")
    assert emb.dtype == np.float32 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize(
    "mode,query_text,expected",
    [
        ("bm25", "furosemide for pulmonary congestion", "hf#0"),
        ("bm25", "the CHA2DS2-VASc score", "af#0"),
        ("bm25", "what is the fixed-rate insulin infusion for", "dka#0"),
        ("dense", "a blood thinner to avoid a stroke when the heartbeat is irregular", "af#0"),
        ("dense", "pounding pain on one side of the head with sensitivity to light", "neuro/migraine#0"),
        ("dense", "wheezing patient needs an inhaler drug urgently", "asthma#0"),
        ("fused", "antibiotics within an hour for infection with organ failure", "sepsis#0"),
        ("fused", "which drug relieves fluid on the lungs in heart failure", "hf#0"),
    ],
)
def test_search_finds_the_right_passage(index, mode, query_text, expected):
    hits = index.search(query_text, k=3, mode=mode)
    assert hits[0].passage_id == expected
    assert all(isinstance(h, Hit) for h in hits) and hits[0].text and hits[0].title
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_bm25_ignores_stopwords_and_unknown_words(index):
    assert index.search("the of and is", k=5, mode="bm25") == []
    assert index.search("zzzqqq", k=5, mode="bm25") == []
    assert len(index.search("zzzqqq", k=5, mode="dense")) == 5
    assert len(index.search("heart", k=50, mode="fused")) == 6  # k larger than the index


def test_search_many_matches_search(index):
    qs = ["furosemide", "migraine aura", "insulin"]
    for mode in ("bm25", "dense", "fused"):
        many, one = index.search_many(qs, k=2, mode=mode), [index.search(q, k=2, mode=mode) for q in qs]
        assert [[h.passage_id for h in row] for row in many] == [[h.passage_id for h in row] for row in one]
        # MiniLM pads a batch, so dense scores may differ from single queries in the last float bits
        assert [[h.score for h in row] for row in many] == [
            pytest.approx([h.score for h in row], abs=1e-5) for row in one
        ]
    with pytest.raises(ClinqaError, match="unknown search mode"):
        index.search("x", mode="hybrid")


def test_rrf_hand_example():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["b", "c", "d"]])
    assert [i for i, _ in fused] == ["b", "c", "a", "d"]
    scores = dict(fused)
    assert scores["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert scores["c"] == pytest.approx(1 / 63 + 1 / 62)
    assert scores["a"] == pytest.approx(1 / 61) and scores["d"] == pytest.approx(1 / 63)
    # equal scores: the better best rank wins
    assert [i for i, _ in reciprocal_rank_fusion([["x", "y"], ["y", "x"]], k=1)] == ["x", "y"]


def test_fused_is_rrf_of_bm25_and_dense(index):
    q = "heart failure drugs and stroke prevention"
    lex = [h.passage_id for h in index.search(q, k=100, mode="bm25")]
    den = [h.passage_id for h in index.search(q, k=100, mode="dense")]
    expected = reciprocal_rank_fusion([lex, den])[:4]
    got = index.search(q, k=4, mode="fused")
    assert [h.passage_id for h in got] == [i for i, _ in expected]
    assert [h.score for h in got] == pytest.approx([s for _, s in expected])


def test_save_load_round_trip(index, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(index.path, copy)
    loaded = Index.load(copy)
    assert loaded.passages == index.passages and loaded.meta == index.meta
    qs = ["furosemide congestion", "irregular pulse stroke prevention", "nebulised salbutamol"]
    for mode in ("bm25", "dense", "fused"):
        assert loaded.search_many(qs, k=4, mode=mode) == index.search_many(qs, k=4, mode=mode)


def test_not_an_index(tmp_path, index):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ClinqaError, match="not a clinqa retrieval index"):
        Index.load(tmp_path)
    with pytest.raises(ClinqaError, match="does not exist"):
        Index.load(tmp_path / "nope")
    (tmp_path / "index.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ClinqaError, match="not a clinqa retrieval index"):
        Index.load(tmp_path)
    with pytest.raises(ClinqaError, match="not a clinqa retrieval index"):  # never overwrites other folders
        build_index([Document("a", "alpha beta")], tmp_path, dense=False)


def test_bm25_only_index(tmp_path):
    idx = build_index(
        [Document("a", "alpha beta gamma"), {"id": "b", "text": "delta epsilon"}], tmp_path / "i", dense=False
    )
    assert not idx.has_dense and (idx.path / "bm25").is_dir() and not (idx.path / "embeddings.npy").exists()
    assert idx.search("epsilon", mode="bm25")[0].passage_id == "b#0"
    with pytest.raises(ClinqaError, match="no dense vectors"):
        idx.search("epsilon", mode="fused")
    again = build_index([Document("c", "zeta")], tmp_path / "i", dense=False)  # replaces an index
    assert [p.id for p in again.passages] == ["c#0"]


# -- the RAG wrapper -------------------------------------------------------------------------------------
def question():
    return Question(
        id="q1",
        question="Which diuretic relieves pulmonary congestion in heart failure?",
        options={"A": "Furosemide", "B": "Insulin", "C": "Salbutamol", "D": "Apixaban"},
        answer="A",
    )


def test_retrieval_query_strips_prompt_scaffolding():
    q = question()
    stem = "Which diuretic relieves pulmonary congestion in heart failure?"
    assert retrieval_query(prompts.cloze_prompt(q)) == stem
    assert retrieval_query(prompts.letter_prompt(q, q.options)) == stem
    assert retrieval_query(prompts.generate_prompt(q, q.options)) == stem
    assert (
        retrieval_query(prompts.letter_prompt(q, q.options), include_options=True)
        == stem + " Furosemide Insulin Salbutamol Apixaban"
    )
    pq = Question(
        id="p",
        question="Does X help?",
        options={"A": "yes", "B": "no"},
        answer="A",
        meta={"contexts": ["Long abstract text."]},
    )
    assert retrieval_query(prompts.cloze_prompt(pq)) == "Does X help?"
    assert retrieval_query("free text without scaffolding") == "free text without scaffolding"


def test_rag_rewrites_contexts_exactly(index):
    base = FakePredictor()
    rag = RagPredictor(base, index, k=2, mode="bm25", budget_tokens=10_000)
    prompt = prompts.cloze_prompt(question())
    hits = index.search(retrieval_query(prompt), k=2, mode="bm25")
    assert hits[0].passage_id == "hf#0"
    expected = RAG_HEADER + "".join(f"[{h.passage_id}] {h.text}\n" for h in hits) + "\n" + prompt
    rag.score_continuations([(prompt, [" Furosemide", " Insulin"])])
    assert base.calls[-1] == ("score", [(expected, [" Furosemide", " Insulin"])])
    rag.next_token_logprobs([prompt], [" A", " B"])
    assert base.calls[-1] == ("next", [expected], [" A", " B"])
    cfg = GenerationConfig(max_new_tokens=5)
    rag.generate([prompt], cfg)
    assert base.calls[-1] == ("generate", [expected], cfg)
    rag.hidden_states([prompt], [0])
    assert base.calls[-1] == ("hidden", [expected])
    ann = rag.annotations(prompt)
    assert ann["retrieved"] == [h.passage_id for h in hits] and ann["rag_mode"] == "bm25"
    assert ann["rag_query"] == question().question
    assert rag.info.spec.startswith("fake+rag:") and rag.info.extra["rag"]["k"] == 2
    assert rag.encode("a b") == ["a", "b"]  # delegated to the base


def test_rag_leaves_prompt_alone_when_nothing_matches(index):
    base = FakePredictor()
    rag = RagPredictor(base, index, k=3, mode="bm25")
    rag.next_token_logprobs(["Question: zzzqqq?\nAnswer:"], [" A"])
    assert base.calls[-1][1] == ["Question: zzzqqq?\nAnswer:"]
    assert rag.annotations("Question: zzzqqq?\nAnswer:")["retrieved"] == []


@pytest.mark.parametrize("encode", [True, False])
def test_rag_stays_within_budget(index, encode):
    base = FakePredictor(encode=encode)
    prompt = prompts.letter_prompt(question(), question().options)
    full = RagPredictor(base, index, k=5, mode="fused", budget_tokens=10_000)
    two = RAG_HEADER + "".join(f"[{h.passage_id}] {h.text}\n" for h in full.retrieve([prompt])[0].hits[:2]) + "\n"
    budget = full.count_tokens(two) + 20  # two passages and a cut third one
    rag = RagPredictor(base, index, k=5, mode="fused", budget_tokens=budget)
    (ctx,) = rag.rewrite([prompt])
    block = ctx[: len(ctx) - len(prompt)]
    assert ctx.endswith("\n\n" + prompt) and block.startswith(RAG_HEADER)
    used = len(block.split()) if encode else int(np.ceil(1.3 * len(block.split())))
    assert used <= budget
    lines = block[len(RAG_HEADER) :].strip().split("\n")
    ids = [ln.split("]")[0][1:] for ln in lines]
    assert rag.annotations(prompt)["retrieved"] == ids
    assert (
        len(ids) == 3 and lines[-1].endswith(" ...") and not lines[1].endswith(" ...")
    )  # the last passage was cut to fit
    assert ids == [h.passage_id for h in index.search(retrieval_query(prompt), k=len(ids), mode="fused")]
    tiny = RagPredictor(base, index, k=5, mode="fused", budget_tokens=3)  # not even the header fits
    assert tiny.rewrite([prompt]) == [prompt] and tiny.annotations(prompt)["retrieved"] == []


def test_rag_caches_retrievals(index, monkeypatch):
    rag = RagPredictor(FakePredictor(), index, k=2, mode="dense")
    calls = []
    real = index.search_many
    monkeypatch.setattr(index, "search_many", lambda qs, **kw: calls.append(list(qs)) or real(qs, **kw))
    q = question()
    p1, p2 = prompts.letter_prompt(q, q.options), prompts.cloze_prompt(q)  # same question, same query
    rag.next_token_logprobs([p1, p1], [" A"])
    rag.score_continuations([(p2, [" x"])])
    rag.annotations(p1)
    assert calls == [[q.question]]


# -- iterative reason-search-observe ---------------------------------------------------------------------
def test_iterative_mode_logs_steps(index):
    script = [
        "Thought: I need the diuretic used for congestion.\nSearch: furosemide pulmonary congestion",
        "I am not sure what to do.",  # ignores the format: the question is searched
        "Thought: that is enough. Answer: A",
        "Answer: A",  # the final answer
    ]
    base = FakePredictor(script)
    rag = RagPredictor(base, index, k=1, mode="iterative", search_mode="fused", steps=3, budget_tokens=600)
    q = question()
    prompt = prompts.generate_prompt(q, q.options)
    cfg = GenerationConfig(max_new_tokens=64, seed=3)
    assert rag.generate([prompt], cfg) == ["Answer: A"]
    gens = [c for c in base.calls if c[0] == "generate"]
    assert len(gens) == 4
    step1, step2, step3, final = (g[1][0] for g in gens)
    assert step1.startswith(rag_module.ITERATIVE_INSTRUCTION) and prompt in step1 and step1.endswith("Thought:")
    assert gens[0][2].max_new_tokens == rag.step_tokens and "Observation:" in gens[0][2].stop and gens[0][2].seed == 3
    assert "Search: furosemide pulmonary congestion\nObservation: [hf#0] Loop diuretics" in step2
    ann = rag.annotations(prompt)
    steps = ann["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert steps[0]["thought"] == "I need the diuretic used for congestion."
    assert (steps[0]["query"], steps[0]["query_source"], steps[0]["retrieved"]) == (
        "furosemide pulmonary congestion",
        "model",
        ["hf#0"],
    )
    assert steps[1]["query"] == q.question and steps[1]["query_source"] == "fallback"
    assert steps[1]["retrieved"] and steps[1]["retrieved"][0] != "hf#0"  # only new passages
    assert f"Observation: [{steps[1]['retrieved'][0]}]" in step3
    assert steps[2]["query"] is None and steps[2]["retrieved"] == [] and ann["stopped"] == "answer"
    assert ann["retrieved"] == ["hf#0", steps[1]["retrieved"][0]] and ann["rag_mode"] == "iterative"
    assert final.startswith(RAG_HEADER + "[hf#0] ") and final.endswith("\n\n" + prompt)
    assert gens[3][2] == cfg


def test_iterative_mode_survives_a_model_ignoring_the_format(index):
    base = FakePredictor(["blah"] * 10)
    rag = RagPredictor(base, index, k=2, mode="iterative", steps=2)
    prompts_ = [prompts.cloze_prompt(question()), "Question: How is diabetic ketoacidosis treated?\nAnswer:"]
    out = rag.generate(prompts_)
    assert len(out) == 2
    for p in prompts_:
        ann = rag.annotations(p)
        assert len(ann["steps"]) == 2 and ann["stopped"] == "max_steps"
        assert all(s["query_source"] == "fallback" for s in ann["steps"])
        assert len(ann["retrieved"]) == 4 == len(set(ann["retrieved"]))
    assert rag.annotations(prompts_[1])["retrieved"][0] == "dka#0"
    # answering at once still gets one search
    base2 = FakePredictor(["Answer: A", "Answer: A"])
    rag2 = RagPredictor(base2, index, k=1, mode="iterative", steps=3)
    rag2.generate([prompts_[1]])
    ann = rag2.annotations(prompts_[1])
    assert len(ann["steps"]) == 1 and ann["stopped"] == "answer" and ann["retrieved"] == ["dka#0"]


def test_parse_step():
    assert parse_step("Thought: x y\nSearch: <heart failure>") == ("x y", "heart failure", False)
    assert parse_step("Thought: ok Search: sepsis bundle\nObservation: invented") == ("ok", "sepsis bundle", False)
    assert parse_step("Thought: done.\nAnswer: B") == ("done.", None, True)
    assert parse_step("nonsense") == ("nonsense", None, False)
    assert parse_step("Search:   ") == ("", None, False)


# -- the modifier ----------------------------------------------------------------------------------------
def test_apply_modifier_parses_params(index):
    from clinqa.adapt import apply_modifier as registry_apply

    mod = parse_spec(f"default+rag:{index.path}@k=2,mode=bm25,budget=100").modifiers[0]
    rag = registry_apply(FakePredictor(), mod)
    assert isinstance(rag, RagPredictor)
    assert (rag.k, rag.mode, rag.budget_tokens, rag.include_options) == (2, "bm25", 100, False)
    assert rag.info.spec == f"fake+rag:{index.path}@k=2,mode=bm25,budget=100"
    it = apply_modifier(
        FakePredictor(),
        Modifier("rag", str(index.path), {"mode": "iterative", "steps": "4", "options": "true", "search": "dense"}),
    )
    assert (it.mode, it.steps, it.include_options, it.search_mode, it.k) == ("iterative", 4, True, "dense", 5)
    for params, msg in [
        ({"k": "0"}, "at least 1"),
        ({"k": "two"}, "integer"),
        ({"mode": "hybrid"}, "unknown mode"),
        ({"depth": "3"}, "unknown parameter"),
        ({"options": "maybe"}, "true or false"),
    ]:
        with pytest.raises(ClinqaError, match=msg):
            apply_modifier(FakePredictor(), Modifier("rag", str(index.path), params))
    with pytest.raises(ClinqaError, match="not a clinqa retrieval index|does not exist"):
        apply_modifier(FakePredictor(), Modifier("rag", str(index.path.parent / "missing"), {}))


def test_bundled_index_is_built_once_and_cached(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "bundled_corpus")
    for f in list(corpus.rglob("*")):
        if f.suffix != ".jsonl" and f.is_file():
            f.unlink()
    monkeypatch.setattr(corpus_module, "bundled_corpus_dir", lambda: corpus)
    monkeypatch.setenv("CLINQA_CACHE", str(tmp_path / "cache"))
    rag = apply_modifier(FakePredictor(), Modifier("rag", "bundled", {"k": "1", "mode": "fused"}))
    path = rag.index.path
    assert path.parent == tmp_path / "cache" / "indexes" and rag.index.meta["corpus"] == "bundled"
    assert rag.index.meta["n_documents"] == len(JSONL)
    built = rag.index.meta["built_at"], (path / "index.json").stat().st_mtime_ns
    again = retrieval.bundled_index()
    assert again.path == path and (again.meta["built_at"], (path / "index.json").stat().st_mtime_ns) == built
    assert retrieval.query("bundled", "fixed-rate insulin infusion", k=1, mode="bm25")[0].passage_id == "dka#0"
    (corpus / "more.jsonl").write_text(json.dumps({"id": "new", "text": "gout and colchicine"}) + "\n")
    assert retrieval.bundled_index_path() != path  # a changed corpus gets a new index


def test_cli_helpers(corpus, tmp_path):
    idx = retrieval.build_index_cmd(corpus, tmp_path / "cli", dense=False)
    assert "6 passages from 6 documents" in retrieval.describe(idx)
    hits = retrieval.query(tmp_path / "cli", "sumatriptan", k=2, mode="bm25")
    assert hits[0].passage_id == "neuro/migraine#0"
    text = retrieval.format_hits(hits)
    assert "[neuro/migraine#0] Migraine:" in text and text.startswith(" 1.")
    assert retrieval.format_hits([]) == "(no passages found)"


def test_corpus_names_are_reexported_from_retrieval(tmp_path):
    for name in ("BUNDLED", "Document", "Passage", "chunk", "load_documents", "bundled_corpus_dir"):
        assert getattr(retrieval, name) is getattr(corpus_module, name)
    doc = retrieval.Document("d", " ".join(f"w{i}" for i in range(7)))
    assert [p.text for p in retrieval.chunk(doc, max_words=4, overlap=1)] == ["w0 w1 w2 w3", "w3 w4 w5 w6"]


def test_bm25s_index_builds_log_nothing_below_warning(caplog):
    import logging

    from clinqa.adapt.retrieval import import_bm25s

    caplog.set_level(logging.DEBUG)
    bm25s = import_bm25s()
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize(["aspirin for chest pain", "insulin for diabetes"], show_progress=False), show_progress=False
    )
    assert not [r for r in caplog.records if r.name == "bm25s" and r.levelno < logging.WARNING]
