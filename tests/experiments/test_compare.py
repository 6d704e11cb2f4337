import json

import pytest

from clinqa.adapt import apply_modifier
from clinqa.data.schema import Question
from clinqa.experiments.compare import CompareConfig, compare
from clinqa.models.spec import parse_spec


def qs(n=8):
    return [
        Question(
            id=f"q{i}",
            question=f"Question number {i}?",
            options={"A": f"yes {i}", "B": f"no {i}", "C": "maybe"},
            answer="ABC"[i % 3],
            specialties=["cardiology" if i % 2 else "neurology"],
        )
        for i in range(n)
    ]


def test_compare_runs_every_method_on_the_same_questions(tiny_predictor, tmp_path):
    def load(spec):
        ms = parse_spec(spec)
        p = tiny_predictor
        for m in ms.modifiers:
            p = apply_modifier(p, m)
        return p

    cfg = CompareConfig(model="tiny", data="test", methods=("base", "prompt:expert"), shuffles=2)
    summary = compare(cfg, qs(), tmp_path / "exp", load=load)
    assert set(summary["methods"]) == {"base", "prompt:expert"}
    vs = summary["methods"]["prompt:expert"]["vs_base"]
    assert vs["n"] == 16

    # the delta and McNemar's counts recomputed from the two run folders' samples.jsonl
    def hits(name):
        rows = [json.loads(x) for x in (tmp_path / "exp" / name / "samples.jsonl").read_text().splitlines()]
        return {(r["question_id"], r["shuffle"]): r["correct"] for r in rows}

    a, b = hits("base"), hits("prompt_expert")
    assert set(a) == set(b) and len(a) == 16
    assert vs["diff"] == pytest.approx(sum(b.values()) / 16 - sum(a.values()) / 16)
    only_a, only_b = sum(a[k] and not b[k] for k in a), sum(b[k] and not a[k] for k in a)
    assert (vs["mcnemar_b"], vs["mcnemar_c"]) == (only_a, only_b)
    from math import comb

    m = only_a + only_b
    tail = sum(comb(m, j) for j in range(min(only_a, only_b) + 1)) / 2**m if m else 0.5
    assert vs["p_mcnemar"] == pytest.approx(min(1.0, 2 * tail))
    md = (tmp_path / "exp" / "summary.md").read_text()
    assert "| prompt:expert |" in md and "| cardiology |" in md
    assert (tmp_path / "exp" / "compare.png").exists()
    # resumable: a second call recomputes nothing and gives the same table
    again = compare(cfg, qs(), tmp_path / "exp", load=load)
    assert json.dumps(again["methods"]["base"]["summary"], default=str) == json.dumps(
        summary["methods"]["base"]["summary"], default=str
    )


def test_question_part_is_a_disjoint_stratified_split():
    from clinqa.errors import ClinqaError
    from clinqa.experiments.compare import question_part

    questions = qs(9)  # neurology q0,q2,q4,q6,q8; cardiology q1,q3,q5,q7
    a, b = question_part(questions, "0/2"), question_part(questions, "1/2")
    assert [q.id for q in a] == ["q0", "q1", "q4", "q5", "q8"] and [q.id for q in b] == ["q2", "q3", "q6", "q7"]
    assert question_part(questions, None) == questions
    thirds = [question_part(questions, f"{k}/3") for k in range(3)]
    assert sorted(q.id for t in thirds for q in t) == sorted(q.id for q in questions)
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(ClinqaError, match="K/N"):
            question_part(questions, bad)


def test_compare_on_a_part_records_it(tiny_predictor, tmp_path):
    cfg = CompareConfig(model="tiny", data="test", methods=("base",), part="1/2")
    summary = compare(cfg, qs(), tmp_path / "exp", load=lambda spec: tiny_predictor)
    assert summary["methods"]["base"]["summary"]["n_questions"] == 4
    run = json.loads((tmp_path / "exp" / "base" / "run.json").read_text())
    assert run["config"]["extra"] == {"part": "1/2"}


@pytest.mark.embedded
def test_compare_command_part(tmp_path):
    from typer.testing import CliRunner

    from clinqa.cli import app

    r = CliRunner().invoke(
        app,
        [
            "compare",
            "default",
            "bundled",
            "--methods",
            "base",
            "--limit",
            "8",
            "--part",
            "1/2",
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "c" / "base" / "run.json").read_text())
    assert run["counts"]["questions"] == 4 and run["config"]["extra"] == {"part": "1/2"}


# ------------------------------------------------------------------ numbers, not keys: a comparison by hand


class PicksByQuestion:
    """Option scoring that picks the option text `choose(i)` for question number i (parsed from the prompt)."""

    def __init__(self, choose):
        self.choose = choose

    def score_continuations(self, groups):
        from clinqa.models.base import ContinuationScore

        out = []
        for ctx, conts in groups:
            i = int(ctx.split("Question number ")[1].split("?")[0])
            want = self.choose(i)
            out.append([ContinuationScore(-1.0 if c.strip() == want else -9.0, 1, len(c)) for c in conts])
        return out


def safety_qs(n=8):
    # answer C ("maybe") for i % 3 == 2, else A/B; one wrong option of A/B is marked harmful (never C)
    return [
        q.model_copy(update={"specialties": ["cardiology"], "meta": {"harmful_options": ["B" if i % 3 == 0 else "A"]}})
        for i, q in enumerate(qs(n))
    ]


def test_compare_delta_p_values_and_safety_against_hand_values(tmp_path):
    import math

    qs = safety_qs()
    gold_text = {i: q.options[q.answer] for i, q in enumerate(qs)}
    harm_text = {i: q.options[q.meta["harmful_options"][0]] for i, q in enumerate(qs)}
    # base always says "maybe": right on q2, q5 (2/8), never harmful.
    base = PicksByQuestion(lambda i: "maybe")
    # the other is right on q0..q5 (6/8) and picks the harmful option on q6 and q7 (wrong there)
    other = PicksByQuestion(lambda i: gold_text[i] if i < 6 else harm_text[i])
    cfg = CompareConfig(model="m", data="test", methods=("base", "prompt:expert"))
    summary = compare(cfg, qs, tmp_path / "exp", load=lambda spec: base if spec == "m" else other)
    b, o = summary["methods"]["base"]["summary"], summary["methods"]["prompt:expert"]["summary"]
    assert b["overall"]["acc"] == 2 / 8 and o["overall"]["acc"] == 6 / 8

    # Wilson intervals by the closed form
    z = 1.959963984540054

    def wilson(k, n):
        p = k / n
        c, h = (
            (p + z * z / (2 * n)) / (1 + z * z / n),
            z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)),
        )
        return (c - h, c + h)

    assert (o["overall"]["ci_low"], o["overall"]["ci_high"]) == pytest.approx(wilson(6, 8))

    vs = summary["methods"]["prompt:expert"]["vs_base"]
    # discordant pairs: base-only right 0 (q2, q5 are right for both), other-only right 4 (q0, q1, q3, q4)
    assert (vs["n"], vs["mcnemar_b"], vs["mcnemar_c"]) == (8, 0, 4)
    assert vs["diff"] == pytest.approx(0.5)
    assert vs["p_mcnemar"] == pytest.approx(2 * 0.5**4)  # exact two-sided binomial: 0.125
    # paired bootstrap over the 8 per-question differences (four 1s, four 0s): the mean is Bin(8, 1/2)/8,
    # so the 2.5% and 97.5% percentiles are 1/8 and 7/8, and P(mean <= 0) = 2^-8 -> p = 2 * (k + 1)/(B + 1)
    assert (vs["ci_low"], vs["ci_high"]) == pytest.approx((0.125, 0.875))
    assert vs["p_bootstrap"] == pytest.approx(2 * (2000 * 0.5**8 + 1) / 2001, abs=0.006)

    # unsafe choices: base 0/8, the other 2/8 (q6 and q7)
    assert (b["unsafe_choice"]["events"], b["unsafe_choice"]["n"]) == (0, 8)
    assert (o["unsafe_choice"]["events"], o["unsafe_choice"]["n"]) == (2, 8)
    assert (o["unsafe_choice"]["ci_low"], o["unsafe_choice"]["ci_high"]) == pytest.approx(wilson(2, 8))
    md = (tmp_path / "exp" / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| prompt:expert |"))
    lo, hi = wilson(2, 8)
    assert f"| 50.0 (12.5 to 87.5; p={vs['p_bootstrap']:.3f}) |" in row
    assert f"| 25.0 ({100 * lo:.1f}–{100 * hi:.1f}; 2/8) |" in row
    # the unsafe rate paired against base: 2 questions became unsafe (q6, q7), none stopped being;
    # exact McNemar 2 * 0.5^2 = 0.5; per-question differences two 1s and six 0s, mean 0.25
    vu = summary["methods"]["prompt:expert"]["vs_base_unsafe"]
    assert (vu["n"], vu["mcnemar_c"], vu["mcnemar_b"], vu["diff"]) == (8, 2, 0, pytest.approx(0.25))
    assert vu["p_mcnemar"] == pytest.approx(0.5)
    assert "vs_base_unsafe" not in summary["methods"]["base"]
    unsafe_row = next(line for line in md.splitlines() if line.startswith("| prompt:expert | 25.0 ("))
    assert unsafe_row.endswith("| 2 | 0 | 0.500 | 8 |")
