import pytest

from clinqa.errors import ClinqaError
from clinqa.models.spec import parse_spec


def test_default_and_modifiers_round_trip():
    s = parse_spec("default+lora:adapters/cardio+steer:vectors/triage@alpha=2,layer=20")
    assert s.kind == "default"
    assert [m.kind for m in s.modifiers] == ["lora", "steer"]
    assert s.modifiers[1].params == {"alpha": "2", "layer": "20"}
    assert str(s) == "default+lora:adapters/cardio+steer:vectors/triage@alpha=2,layer=20"


def test_backends():
    assert parse_spec("models/x.gguf").kind == "gguf"
    assert parse_spec("HuggingFaceTB/SmolLM2-135M").kind == "hf"
    o = parse_spec("openai:http://127.0.0.1:8000/v1#smol+rag:indexes/t@k=5")
    assert (o.kind, o.target, o.model_name) == ("openai", "http://127.0.0.1:8000/v1", "smol")
    assert o.modifiers[0].params == {"k": "5"}


@pytest.mark.parametrize(
    "bad,msg",
    [
        ("", "empty model spec"),
        ("openai:localhost:8000", "expected openai:http"),
        ("default+lora:", "needs a target"),
        ("default+steer:v@alpha", "expected key=value"),
    ],
)
def test_bad_specs(bad, msg):
    with pytest.raises(ClinqaError, match=msg):
        parse_spec(bad)
