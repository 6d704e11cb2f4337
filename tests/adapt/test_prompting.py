import pytest

from clinqa.adapt import load_predictor, apply_modifier
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


def test_unknown_prompt(tiny_predictor):
    with pytest.raises(ClinqaError, match="unknown prompt 'magic'"):
        apply_modifier(tiny_predictor, Modifier("prompt", "magic"))
