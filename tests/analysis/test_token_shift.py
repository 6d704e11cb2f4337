import numpy as np
import pytest
import torch

from clinqa.analysis.token_shift import clinical_terms, contrasts, occurrence_logprobs, term_occurrences, token_shift
from clinqa.data.schema import Question


def q(i, text, answer_text, spec):
    return Question(
        id=f"q{i}", question=text, options={"A": answer_text, "B": "other option"}, answer="A", specialties=[spec]
    )


QUESTIONS = [
    q(1, "A patient with atrial fibrillation needs anticoagulation with warfarin.", "warfarin therapy", "cardiology"),
    q(2, "Atrial fibrillation with rapid ventricular rate is treated with rate control.", "metoprolol", "cardiology"),
    q(3, "Seizure lasting five minutes is status epilepticus; give lorazepam.", "lorazepam", "neurology"),
    q(4, "A prolonged seizure needs lorazepam before phenytoin.", "lorazepam", "neurology"),
]
CONTROL = [
    Question(
        id="c1",
        question="Which river flows through Paris and its patient boats?",
        options={"A": "Seine", "B": "Thames"},
        answer="A",
    )
]


def test_terms_are_medical_content_words():
    terms = clinical_terms(QUESTIONS, CONTROL, min_count=2)
    assert "fibrillation" in terms["cardiology"] and "lorazepam" in terms["neurology"]
    assert "patient" not in terms["cardiology"]  # used by the control set
    assert all(w not in terms["cardiology"] for w in ("with", "the", "needs"))


def test_occurrence_logprob_is_sum_over_term_tokens(tiny_predictor):
    text = "The patient has atrial fibrillation today."
    [occ] = occurrence_logprobs(tiny_predictor, [text], ["fibrillation"])
    r = tiny_predictor.token_logprobs([text])[0]
    start = text.index("fibrillation")
    idx = [k for k, (a, b) in enumerate(r["offsets"]) if a < start + len("fibrillation") and b > start]
    assert occ == [("fibrillation", pytest.approx(float(np.sum(r["logprobs"][idx])), abs=1e-5))]
    # direct computation of the same tokens' log-probabilities
    ids = torch.tensor([r["ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(tiny_predictor.model(input_ids=ids).logits[0].float(), -1)
    direct = sum(float(lp[k - 1, r["ids"][k]]) for k in idx)
    assert occ[0][1] == pytest.approx(direct, abs=1e-3)


def test_shift_is_zero_for_same_model_and_nonzero_for_an_adapter(tiny_predictor, tmp_path):
    from peft import LoraConfig, get_peft_model

    terms = clinical_terms(QUESTIONS, CONTROL, min_count=1)
    res = token_shift(tiny_predictor, {"same": tiny_predictor}, QUESTIONS, terms)
    assert res.rows and all(r.shift == 0 for r in res.rows)
    assert {r.specialty for r in res.rows} == {"cardiology", "neurology", "pooled"}

    import copy

    from clinqa.models.local import quiet_peft_deprecations

    with quiet_peft_deprecations():
        peft_model = get_peft_model(
            copy.deepcopy(tiny_predictor.model),
            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
    peft_model.save_pretrained(tmp_path / "adapter")
    adapted = tiny_predictor.load_adapter(tmp_path / "adapter")
    res = token_shift(tiny_predictor, {"lora": adapted}, QUESTIONS, terms)
    pooled = [r for r in res.rows if r.specialty == "pooled"][0]
    assert pooled.shift != 0 and pooled.ci_low <= pooled.shift <= pooled.ci_high
    # each row's shift is the mean, over that specialty's term occurrences, of log p under the adapter
    # minus log p under the base model; computed here occurrence by occurrence
    from clinqa.analysis.token_shift import question_text

    diffs = {}
    for spec in ("cardiology", "neurology"):
        texts = [question_text(x) for x in QUESTIONS if x.specialties[0] == spec]
        b = [lp for per in occurrence_logprobs(tiny_predictor, texts, terms[spec]) for _, lp in per]
        a = [lp for per in occurrence_logprobs(adapted, texts, terms[spec]) for _, lp in per]
        diffs[spec] = [y - x for x, y in zip(b, a)]
        row = next(r for r in res.rows if r.specialty == spec)
        assert row.n == len(b) and row.shift == pytest.approx(float(np.mean(diffs[spec])), abs=1e-6)
    assert pooled.n == len(diffs["cardiology"]) + len(diffs["neurology"])
    assert pooled.shift == pytest.approx(float(np.mean(diffs["cardiology"] + diffs["neurology"])), abs=1e-6)
    assert "| pooled | lora |" in res.markdown()


def test_term_occurrences_whole_words_only():
    assert term_occurrences("Warfarin and warfarinised", ["warfarin"]) == [("warfarin", 0, 8)]


def test_contrasts_pair_own_against_other_adapters_and_medical_against_control():
    specs = ["cardiology", "neurology"]
    values = {  # log p of each term occurrence; two cardiology and one neurology occurrence
        "base": {"cardiology": [-5.0, -6.0], "neurology": [-4.0]},
        "cardiology": {"cardiology": [-4.0, -5.0], "neurology": [-3.5]},  # +1 on its own terms, +0.5 on the other's
        "cardio_dup": {"cardiology": [-4.0, -5.0], "neurology": [-3.5]},  # not a specialty name: ignored
        "neuro": {"cardiology": [-4.5, -5.5], "neurology": [-3.0]},  # alias of neurology: +1 own, +0.5 other
        "control": {"cardiology": [-5.0, -6.0], "neurology": [-4.0]},
    }
    by_name = {c.name: c for c in contrasts(values, specs, ["cardiology", "cardio_dup", "neuro", "control"])}
    assert by_name["own_vs_other"].n == 3 and by_name["own_vs_other"].diff == pytest.approx(0.5)
    assert by_name["medical_vs_control"].diff == pytest.approx(0.75)
    assert (
        contrasts(values, specs, ["cardiology", "control"])[0].name == "medical_vs_control"
    )  # one specialty: no own/other
