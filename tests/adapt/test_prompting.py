import pytest

from clinqa.adapt import apply_modifier
from clinqa.errors import ClinqaError
from clinqa.models.spec import Modifier


def test_prompt_prefix_rewrites_contexts_only(tiny_predictor):
    p = apply_modifier(tiny_predictor, Modifier("prompt", "expert"))
    ctx = "Question: Which drug?\nAnswer:"
    [[a]] = p.score_continuations([(ctx, [" aspirin"])])
    [[b]] = tiny_predictor.score_continuations([(p.prefix + ctx, [" aspirin"])])
    assert a == b
    assert p.annotations(ctx) == {"prompt": "expert"}
    assert p.info.spec.endswith("+prompt:expert")


def test_fewshot_and_file(tiny_predictor, tmp_path):
    p = apply_modifier(tiny_predictor, Modifier("prompt", "fewshot", {"k": "2"}))
    assert p.prefix.count("Question:") == 2 and p.prefix.count("Answer:") == 2
    f = tmp_path / "mine.txt"
    f.write_text("Be careful.")
    assert apply_modifier(tiny_predictor, Modifier("prompt", str(f))).prefix == "Be careful.\n\n"


def test_fewshot_never_shows_a_question_its_own_answer(tiny_predictor):
    from clinqa.data.loaders import load_questions
    from clinqa.evaluate.prompts import cloze_prompt

    p = apply_modifier(tiny_predictor, Modifier("prompt", "fewshot", {"k": "3", "seed": "4"}))
    by_text = {q.question.strip(): q for q in load_questions("bundled").questions}
    shown = [line[len("Question: ") :] for line in p.prefix.split("\n") if line.startswith("Question: ")]
    asked = by_text[shown[1]]
    ctx = p._rewrite(cloze_prompt(asked))
    assert ctx.count("Question:") == 4 and ctx.count(asked.question.strip()) == 1  # 3 other examples, then the question
    assert f"Answer: {asked.options[asked.answer]}\n\nQuestion: {asked.question.strip()}" not in ctx
    other = "Question: Which drug?\nAnswer:"
    assert p._rewrite(other) == p.prefix + other


def test_unknown_prompt(tiny_predictor):
    with pytest.raises(ClinqaError, match="unknown prompt 'magic'"):
        apply_modifier(tiny_predictor, Modifier("prompt", "magic"))
