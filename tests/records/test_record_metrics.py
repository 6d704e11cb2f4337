"""Record-QA metrics on hand-made examples: stage-1 F1, exact match with tolerances, citations,
abstention, METEOR (offline WordNet) and ROUGE-L."""

from __future__ import annotations

from datetime import date

import pytest

from clinqa.errors import ClinqaError
from clinqa.records.metrics import (
    answer_metrics,
    citation_precision,
    exact_match,
    find_dates,
    find_numbers,
    is_abstention,
    meteor,
    parse_citations,
    rouge_l,
    stage1_metrics,
    stage2_summary,
    strip_citations,
)
from clinqa.records.questions import RecordQuestion
from clinqa.records.wordnet import LEXNAMES, lexnames_text, prepare_wordnet_dir, wordnet_available


def q(qtype="lookup", value=None, unit=None, question="What was it?", answer="ref", relevant=(), **meta):
    return RecordQuestion(id=f"q-{qtype}", patient_id="p", question=question, qtype=qtype, relevant_ids=list(relevant),
                          answer=answer, answer_value=value, unit=unit, now=date(2025, 1, 1), meta=meta)  # fmt: skip


# ----------------------------------------------------------------------------------- stage 1


def test_stage1_micro_per_type_and_per_qtype():
    selected = [["a", "b", "x"], ["c"], []]
    relevant = [["a", "b", "d"], [], ["e"]]
    types = {
        "a": "Observation",
        "b": "Observation",
        "d": "Observation",
        "x": "Condition",
        "c": "Condition",
        "e": "MedicationRequest",
    }
    m = stage1_metrics(selected, relevant, qtypes=["lookup", "unanswerable", "list"], types=types)
    micro = m["micro"]
    assert (micro["tp"], micro["fp"], micro["fn"]) == (2, 2, 2)
    assert (
        micro["precision"] == pytest.approx(0.5)
        and micro["recall"] == pytest.approx(0.5)
        and micro["f1"] == pytest.approx(0.5)
    )
    obs = m["by_resource_type"]["Observation"]
    assert (obs["tp"], obs["fp"], obs["fn"]) == (2, 0, 1) and obs["f1"] == pytest.approx(0.8)
    assert m["by_resource_type"]["Condition"]["fp"] == 2
    assert m["by_resource_type"]["MedicationRequest"]["fn"] == 1
    assert m["by_qtype"]["unanswerable"]["fp"] == 1 and m["by_qtype"]["list"]["recall"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)  # only questions with relevant ids
    # per-question type maps, unknown ids as "?"
    m2 = stage1_metrics([["z"]], [["z"]], types=[{}])
    assert m2["by_resource_type"]["?"]["tp"] == 1
    with pytest.raises(ValueError):
        stage1_metrics([["a"]], [])


# ----------------------------------------------------------------------------------- exact match


def test_numbers_within_one_percent_or_005_absolute_and_question_tolerance():
    a1c = q("latest", 6.3, "%", question="What is the patient's most recent hemoglobin A1c?")
    assert exact_match(a1c, "The most recent HbA1c is 6.3 % [Observation/abc].")
    assert exact_match(a1c, "6.35%")  # 0.05 absolute
    assert not exact_match(a1c, "6.4 %")
    weight = q("latest", 180.0, "kg")
    assert exact_match(weight, "181.5 kg")  # within 1%
    assert not exact_match(weight, "182.5 kg")
    avg = q("average", 100.0, "mg/dL", tolerance=3.0)
    assert exact_match(avg, "about 102.5 mg/dL")  # the question's own tolerance is larger
    # digits glued to words do not count; dates are not numbers
    assert exact_match(q("latest", 12, "{score}", question="What is the patient's latest PHQ-9 score?"),
                       "PHQ-9 on 2024-03-01 was 12 {score}")  # fmt: skip


def test_units_are_checked_when_written():
    glucose = q("lookup", 140.0, "mg/dL")
    assert exact_match(glucose, "140 mg/dL")
    assert exact_match(glucose, "140")  # no unit written: the number decides
    assert not exact_match(glucose, "140 mmol/L")
    bp = q("lookup", 91, "mm[Hg]")
    assert exact_match(bp, "91 mmHg") and exact_match(bp, "91 mm[Hg]")
    egfr = q("window", [61.0, 58.5], "mL/min/{1.73_m2}")
    assert exact_match(egfr, "61 mL/min/{1.73_m2} on 2023-01-02; 58.5 mL/min/{1.73_m2} on 2024-01-05")


def test_numbers_restated_from_the_question_are_skipped():
    count = q("count", 2, None, question="How many creatinine measurements were recorded in the last 3 years?")
    assert exact_match(count, "In the last 3 years, 2 measurements were recorded.")
    assert not exact_match(count, "In the last 3 years, 4 measurements were recorded.")
    three = q("count", 3, None, question="How many visits in the last 3 months?")
    assert exact_match(three, "3")  # the answer may equal a number of the question


def test_dates_same_day_in_any_format():
    d = q("lookup", "2021-03-04")
    assert exact_match(d, "It was diagnosed on March 4, 2021.")
    assert exact_match(d, "on 03/04/2021") and exact_match(d, "2021-03-04T10:00:00Z")
    assert exact_match(d, "4 Mar 2021")
    assert not exact_match(d, "2021-03-05")
    assert find_dates("from 2020-01-31 to 2020-02-30") == [date(2020, 1, 31)]  # impossible dates ignored


def test_lists_as_sets_case_insensitive():
    meds = q("list", ["atorvastatin 20 MG Oral Tablet", "sertraline 50 MG Oral Tablet"])
    assert exact_match(meds, "Sertraline 50 mg oral tablet; ATORVASTATIN 20 MG ORAL TABLET [MedicationRequest/x]")
    assert exact_match(meds, "- atorvastatin 20 MG Oral Tablet (started 2020-01-01)\n- sertraline 50 MG Oral Tablet")
    assert not exact_match(meds, "atorvastatin 20 MG Oral Tablet")
    assert not exact_match(meds, "atorvastatin 20 MG Oral Tablet; sertraline 50 MG Oral Tablet; aspirin")
    none = q("list", [])
    assert exact_match(none, "None: there are no active medications.") and not exact_match(none, "metformin")
    window = q("window", [0.96, 1.1], "mg/dL")
    assert exact_match(window, "1.1 mg/dL on 2024-01-02 and 0.96 mg/dL on 2023-12-19")
    assert not exact_match(window, "0.96 mg/dL on 2023-12-19")


def test_yes_no_trend_abstention_and_free_text():
    assert exact_match(q("exists", True), "Yes: Td vaccine on 2020-12-01.")
    assert not exact_match(q("exists", True), "No, never.")
    assert exact_match(q("exists", False), "No, there is no such diagnosis.")
    assert exact_match(q("trend", "increasing"), "It has been trending up: 149 -> 167.")
    assert not exact_match(q("trend", "stable"), "decreasing")
    unans = q("unanswerable", None)
    assert exact_match(unans, "Not in the record.")
    assert not exact_match(unans, "It was 5.")
    assert not exact_match(q("latest", 5.0), "Not in the record.")
    assert exact_match(q("multi", None), "anything") is None  # free text: not applicable


def test_find_numbers_skips_citations_dates_and_words():
    nums = find_numbers("A1c 6.3 % on 2021-03-04 [Observation/a1b2-3] and COVID-19, 7 mmol/L")
    assert nums == [(6.3, "%"), (7.0, "mmol/L")]


# ----------------------------------------------------------------------------------- citations, abstention


def test_citations_and_precision():
    text = (
        "Value 5 [Observation/abc-1] and [Condition/x1, MedicationRequest/m.2] but not [this] or [Observation/abc-1]."
    )
    assert parse_citations(text) == ["Observation/abc-1", "Condition/x1", "MedicationRequest/m.2"]
    assert strip_citations(text) == "Value 5 and but not [this] or."
    assert citation_precision(["a", "b", "c", "d"], ["a", "b", "z"]) == pytest.approx(0.5)
    assert citation_precision([], ["a"]) is None


def test_abstention_detection():
    for text in ["Not in the record.", "This is not documented in the patient's record.", "The value cannot be determined.",
                 "No information is available about BNP."]:  # fmt: skip
        assert is_abstention(text), text
    for text in [
        "The patient's A1c is 6.3 %.",
        "No, the patient was never prescribed warfarin.",
        "Yes, recorded on 2020-01-01.",
    ]:
        assert not is_abstention(text), text


def test_answer_metrics_and_summary_rates():
    answerable = q("latest", 6.3, "%", answer="6.3 % (on 2024-01-01)", relevant=["a"])
    unanswerable = q("unanswerable", None, answer="not in the record")
    rows = [
        answer_metrics(answerable, "6.3 % [Observation/a]", ["a"], [], with_meteor=False),
        answer_metrics(answerable, "Not in the record.", [], [], with_meteor=False),
        answer_metrics(unanswerable, "Not in the record.", [], [], with_meteor=False),
        answer_metrics(
            unanswerable, "It is 5 [Observation/b] [Observation/other]", ["b"], ["Observation/other"], with_meteor=False
        ),  # fmt: skip
    ]
    assert rows[0]["exact_match"] and rows[0]["citation_precision"] == 1.0 and rows[0]["meteor"] is None
    assert rows[3]["cited"] == 2 and rows[3]["invalid_citations"] == 1 and rows[3]["citation_precision"] == 0.0
    s = stage2_summary(rows, ["latest", "latest", "unanswerable", "unanswerable"])
    assert s["exact_match"] == pytest.approx(0.5)
    assert s["abstention_rate"] == pytest.approx(0.5)
    assert s["false_abstention_rate"] == pytest.approx(0.5)
    assert s["citation_precision"] == pytest.approx(1 / 3)  # 1 relevant of 3 cited (invalid ones count)
    assert s["invalid_citation_rate"] == pytest.approx(0.25)
    assert s["by_qtype"]["latest"]["exact_match"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------- text overlap


def test_rouge_l_hand_example():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat [Observation/x]") == pytest.approx(1.0)
    # LCS "the cat on the mat" = 5 of 6 reference and 5 of 7 candidate tokens
    assert rouge_l("the cat sat on the mat", "the cat was sitting on the mat") == pytest.approx(
        2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7)
    )


def test_lexnames_is_the_standard_list():
    assert len(LEXNAMES) == 45
    lines = lexnames_text().splitlines()
    assert lines[0] == "00\tadj.all\t3" and lines[1] == "01\tadj.pert\t3" and lines[2] == "02\tadv.all\t4"
    assert lines[3] == "03\tnoun.Tops\t1" and lines[28] == "28\tnoun.time\t1" and lines[29] == "29\tverb.body\t2"
    assert lines[43] == "43\tverb.weather\t2" and lines[44] == "44\tadj.ppl\t3"


def test_missing_wordnet_is_a_clear_error(tmp_path):
    with pytest.raises(ClinqaError, match="apt-get install wordnet-base"):
        prepare_wordnet_dir(tmp_path / "cache", source=tmp_path / "no-wordnet")


@pytest.mark.skipif(
    not wordnet_available(), reason="WordNet is not installed at /usr/share/wordnet (apt-get install wordnet-base)"
)
def test_meteor_offline_hand_example(monkeypatch):
    import nltk

    def no_download(*a, **k):
        raise AssertionError("nltk.download must never be called")

    monkeypatch.setattr(nltk, "download", no_download)
    # nltk's documented example value for this pair
    assert meteor("the cat sat on the mat", "the cat was sitting on the mat") == pytest.approx(0.7934, abs=1e-3)
    assert meteor("the cat sat on the mat", "the cat sat on the mat [Observation/x]") == pytest.approx(0.9977, abs=1e-3)
    # WordNet synonyms count: "sick" shares a synset with "ill", "banana" does not
    syn = meteor("the patient is ill", "the patient is sick")
    other = meteor("the patient is ill", "the patient is banana")
    assert syn > other + 0.2
    from clinqa.records.wordnet import ensure_wordnet

    wn = ensure_wordnet()
    assert wn.synset("dog.n.01").lexname() == "noun.animal"
    assert str(wn.lemma_from_key("dog%1:05:00::")) == "Lemma('dog.n.01.dog')"  # the derived index.sense


def test_bracketed_units_are_not_citations():
    from clinqa.records.metrics import parse_citations

    assert parse_citations("Hb 14 [Mass/volume] [Observation/abc; Condition/x]") == ["Observation/abc", "Condition/x"]
