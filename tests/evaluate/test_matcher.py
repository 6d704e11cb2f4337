"""Answer matchers for --method generate: the rules, MiniLM similarity, the model's log-likelihood,
score_generate and `clinqa eval --matcher`, and the bundled labelled set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clinqa.data.schema import Question
from clinqa.errors import ClinqaError
from clinqa.evaluate.matcher import LEAD, MatcherConfig, match_answers, match_rules
from clinqa.evaluate.methods import make_items, score_generate
from clinqa.models.base import ContinuationScore, ModelInfo

OPTS = {"A": "Left anterior descending artery", "B": "First diagonal branch", "C": "Right coronary artery",
        "D": "Left main coronary artery"}  # fmt: skip


@pytest.mark.parametrize("text, pred, rule", [
    ("The answer is C.", "C", "pattern"),
    ("c)", "C", "pattern"),
    ("Right coronary artery.", "C", "text"),
    ("The answer is A: Right coronary artery.", None, "conflict"),
    ("It could be A or C; I am not certain.", None, "hedge"),
    ("None of these options is correct.", None, "refusal"),
    ("As an AI, I cannot provide medical advice.", None, "refusal"),
    ("A. Left anterior descending artery\nB. First diagonal branch\nC. Right coronary artery\nD. Left main coronary artery",
     None, "lists-options"),
    ("First diagonal branch is unlikely here. The best choice is right coronary artery.", "C", "conclusion"),
    ("Option A (left anterior descending artery) is wrong, so the answer is C.", "C", "pattern"),
    ("", None, "unparseable"),
])  # fmt: skip
def test_rules(text, pred, rule):
    m = match_rules(text, OPTS)
    assert (m.pred, m.rule) == (pred, rule)


def test_paraphrase_needs_a_model():
    assert match_rules("The occlusion is in the RCA.", OPTS) is None


class FakeEmbedder:
    """Unit vectors by keyword: the expected similarities are dot products worked out by hand."""

    AXES = ["anterior", "diagonal", "right", "main", "rca"]

    def encode(self, texts, **_):
        out = []
        for t in texts:
            v = np.array([float(k in t.lower()) for k in self.AXES])
            if "rca" in t.lower():
                v[2] += 1.0  # "RCA" means the right coronary artery
            out.append(v / (np.linalg.norm(v) or 1.0))
        return np.array(out, dtype=np.float32)


def test_minilm_thresholds_with_a_scripted_embedder():
    texts = ["The culprit is the RCA.", "Something unrelated.", "Anterior or diagonal, hard to say"]
    found = match_answers(
        texts, [OPTS] * 3, MatcherConfig("minilm", min_similarity=0.35, min_margin=0.05), embedder=FakeEmbedder()
    )
    # answer 1: (0,0,1,0,1)/sqrt2 against C = (0,0,1,0,0): 1/sqrt2; A, B, D: 0 -> C
    assert found[0].pred == "C" and found[0].rule == "minilm"
    assert found[0].scores["C"] == pytest.approx(1 / np.sqrt(2), abs=1e-6) and found[0].scores["A"] == pytest.approx(
        0.0
    )
    # answer 2: zero vector, every similarity 0 < 0.35 -> unsure
    assert (found[1].pred, found[1].rule) == (None, "unsure")
    # answer 3: (1,1,0,0,0)/sqrt2 -> A and B both 1/sqrt2: margin 0 < 0.05 -> unsure
    assert (found[2].pred, found[2].rule) == (None, "unsure")
    assert found[2].scores["A"] == pytest.approx(found[2].scores["B"])


def test_minilm_with_the_bundled_model_matches_a_direct_cosine():
    from sentence_transformers import SentenceTransformer

    from clinqa.specialties.embed import minilm_path

    text = "Variceal banding at endoscopy."
    opts = {"A": "Argon plasma coagulation", "B": "Adrenaline injection alone", "C": "Endoscopic band ligation",
            "D": "Endoscopic mucosal resection"}  # fmt: skip
    m = match_answers([text], [opts], "minilm")[0]
    st = SentenceTransformer(str(minilm_path()), device="cpu")
    a = st.encode([text])[0]
    o = st.encode(list(opts.values()))
    cos = o @ a / (np.linalg.norm(o, axis=1) * np.linalg.norm(a))
    assert m.scores == pytest.approx(dict(zip(opts, cos.tolist())), abs=1e-4)
    assert m.pred == "ABCD"[int(np.argmax(cos))] == "C"


class ScriptedModel:
    """Generates scripted answers; log-likelihoods per option scripted (sum, n_tokens)."""

    def __init__(self, answers, loglik):
        self.info = ModelInfo(spec="scripted", backend="fake", name="scripted")
        self.answers, self.loglik = answers, loglik
        self.groups = []

    def generate(self, prompts, config=None):
        return [self.answers[i % len(self.answers)] for i in range(len(prompts))]

    def score_continuations(self, groups):
        self.groups += groups
        return [[ContinuationScore(logprob=self.loglik[c.strip()][0], n_tokens=self.loglik[c.strip()][1], n_chars=len(c))
                 for c in conts] for _, conts in groups]  # fmt: skip

    def next_token_logprobs(self, contexts, candidates):
        raise NotImplementedError

    def hidden_states(self, texts, layers):
        raise NotImplementedError


def test_loglik_uses_mean_logprob_per_token_after_the_answer():
    # per token: A -4/4 = -1.0, B -1.5/1 = -1.5, C -2.4/3 = -0.8, D -3.6/4 = -0.9: C, margin 0.1
    model = ScriptedModel(
        ["x"], {OPTS["A"]: (-4.0, 4), OPTS["B"]: (-1.5, 1), OPTS["C"]: (-2.4, 3), OPTS["D"]: (-3.6, 4)}
    )
    m = match_answers(
        ["It is the RCA."], [OPTS], MatcherConfig("loglik", min_loglik_margin=0.05), predictor=model, prompts=["PROMPT"]
    )[0]
    assert (m.pred, m.rule) == ("C", "loglik") and m.scores["D"] == pytest.approx(-0.9)
    ctx, conts = model.groups[0]
    assert ctx == "PROMPT\nIt is the RCA." + LEAD and conts == [" " + v for v in OPTS.values()]
    m = match_answers(
        ["It is the RCA."], [OPTS], MatcherConfig("loglik", min_loglik_margin=0.2), predictor=model, prompts=["P"]
    )[0]
    assert (m.pred, m.rule) == (None, "unsure")  # 0.1 < 0.2
    with pytest.raises(ClinqaError):
        match_answers(["It is the RCA."], [OPTS], "loglik")
    with pytest.raises(ClinqaError):
        MatcherConfig("classifier")


def questions(n=4):
    return [Question(id=f"q{i}", question=f"Which option is number {i}?",
                     options={"A": f"alpha {i}", "B": f"bravo {i}", "C": f"charlie {i}", "D": f"delta {i}"},
                     answer="ABCD"[i % 4], specialties=["cardiology"], source="t") for i in range(n)]  # fmt: skip


def test_score_generate_records_the_rule_and_keeps_unparseable():
    items = make_items(questions(), shuffles=1, seed=0)
    texts = ["The answer is B.", "I cannot answer this.", "something about charlie", "nothing"]
    ll = {v: (-1.0, 1) for q in questions() for v in q.options.values()}
    ll["charlie 2"] = (-0.1, 1)  # the model prefers charlie for the third answer
    model = ScriptedModel(texts, ll)
    regex = score_generate(model, items)
    assert [s.pred for s in regex] == ["B", None, None, None]
    assert [s.extras["parse"] for s in regex] == ["pattern", "unparseable", "unparseable", "unparseable"]
    assert "matcher" not in regex[0].extras
    ll_samples = score_generate(model, items, matcher="loglik")
    assert [s.pred for s in ll_samples] == ["B", None, "C", None]
    assert [s.extras["parse"] for s in ll_samples] == ["pattern", "refusal", "loglik", "unsure"]
    assert all(s.extras["matcher"] == "loglik" for s in ll_samples)
    assert ll_samples[2].correct == ("C" == items[2].gold)


def test_eval_cli_refuses_a_matcher_without_generate(tmp_path):
    from typer.testing import CliRunner

    from clinqa.cli import app

    r = CliRunner().invoke(app, ["eval", "default", "bundled", "--out", str(tmp_path / "r"), "--matcher", "minilm"])
    assert isinstance(r.exception, ClinqaError) and "--method generate" in str(r.exception)
    r = CliRunner().invoke(
        app, ["eval", "default", "bundled", "--out", str(tmp_path / "r"), "--method", "generate", "--matcher", "x"]
    )
    assert isinstance(r.exception, ClinqaError) and "unknown matcher" in str(r.exception)


def test_bundled_labelled_set_is_well_formed():
    from clinqa.data.bundled import bundled_dir
    from clinqa.data.loaders import load_questions

    rows = [json.loads(line) for line in (bundled_dir() / "matcher_answers.jsonl").read_text().splitlines()]
    qs = {q.id: q for q in load_questions("bundled:clinical").questions}
    assert len(rows) >= 100 and len({r["id"] for r in rows}) == len(rows)
    assert all(
        r["question_id"] in qs and (r["gold"] is None or r["gold"] in qs[r["question_id"]].options) for r in rows
    )
    assert sum(r["style"] == "paraphrase" for r in rows) >= 30 and any(r["gold"] is None for r in rows)
