"""clinqa.data.loaders and clinqa.data.bundled: every format, detection, exact error messages, filtering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clinqa.data import bundled
from clinqa.data.bundled import BUNDLED_NAMES, bundled_files, bundled_names, bundled_path, parse_bundled_spec
from clinqa.data.loaders import FORMATS, MMLU_MEDICAL, LoadResult, Problem, detect_format, load_questions, mmlu_subject
from clinqa.errors import ClinqaError

SKIP_HINT = " (use --skip-invalid to skip bad rows)"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def native(qid: str = "q1", **over) -> dict:
    rec = {
        "id": qid,
        "question": "Which drug treats anaphylaxis first?",
        "options": {"A": "Adrenaline", "B": "Cetirizine", "C": "Prednisolone", "D": "Salbutamol"},
        "answer": "A",
        "specialties": ["emergency_medicine"],
        "source": "test",
        "meta": {"rationale": "IM adrenaline first."},
    }
    rec.update(over)
    return rec


def raises(match_exact: str, *args, **kwargs) -> None:
    with pytest.raises(ClinqaError) as exc:
        load_questions(*args, **kwargs)
    assert str(exc.value) == match_exact


# ---------------------------------------------------------------------------------------------- native


def test_native_loads_and_resolves_specialty_aliases(tmp_path):
    f = write_jsonl(
        tmp_path / "q.jsonl",
        [native("q1", specialties=["cardio", "Infectious diseases"]), native("q2", answer="C", specialties=[])],
    )
    res = load_questions(f)
    assert isinstance(res, LoadResult)
    assert res.format == "clinqa" and res.skipped == []
    q1, q2 = res.questions
    assert q1.id == "q1" and q1.answer == "A" and q1.source == "test"
    assert q1.specialties == ["cardiology", "infectious_diseases"]
    assert q1.meta == {"rationale": "IM adrenaline first."}
    assert q2.answer == "C" and q2.specialties == []


def test_path_may_be_a_string_and_blank_lines_are_ignored(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [native("q1"), "", "   ", native("q2")])
    assert [q.id for q in load_questions(str(f)).questions] == ["q1", "q2"]


# ---------------------------------------------------------------------------------------------- medqa


def medqa(question="A 30-year-old has chest pain.", answer_idx="B", answer="Aspirin", **over) -> dict:
    rec = {
        "question": question,
        "answer": answer,
        "options": {"A": "Paracetamol", "B": "Aspirin", "C": "Ibuprofen", "D": "Codeine", "E": "Morphine"},
        "meta_info": "step1",
        "answer_idx": answer_idx,
    }
    rec.update(over)
    return rec


def test_medqa_loads(tmp_path):
    four = {"question": "Q two", "options": {"A": "w", "B": "x", "C": "y", "D": "z"}, "answer_idx": "D"}
    f = write_jsonl(tmp_path / "test.jsonl", [medqa(), four, medqa(id="custom-7")])
    res = load_questions(f)
    assert res.format == "medqa"
    q1, q2, q3 = res.questions
    assert q1.id == "medqa-1" and q1.answer == "B" and q1.options["E"] == "Morphine" and len(q1.options) == 5
    assert q1.source == "medqa" and q1.meta == {"meta_info": "step1"} and q1.specialties == []
    assert q2.id == "medqa-2" and q2.answer == "D" and list(q2.options) == ["A", "B", "C", "D"]
    assert q3.id == "custom-7"


def test_medqa_answer_text_must_match_answer_idx(tmp_path):
    f = write_jsonl(tmp_path / "test.jsonl", [medqa(), medqa(answer="Codeine")])
    raises(f"{f}:2: field 'answer': 'Codeine' does not match option B ('Aspirin')" + SKIP_HINT, f)


def test_medqa_answer_idx_must_be_an_option(tmp_path):
    f = write_jsonl(tmp_path / "test.jsonl", [medqa(answer_idx="F", answer=None)])
    raises(f"{f}:1: field 'answer_idx': 'F' is not one of the options A, B, C, D, E" + SKIP_HINT, f)


def test_medqa_missing_options(tmp_path):
    rec = medqa()
    del rec["options"]
    f = write_jsonl(tmp_path / "test.jsonl", [medqa(), rec])
    raises(f"{f}:2: field 'options': missing" + SKIP_HINT, f, format="medqa")


# ---------------------------------------------------------------------------------------------- medmcqa


def medmcqa(qid="e9ad821a", cop=2, subject="Pediatrics", **over) -> dict:
    rec = {
        "id": qid,
        "question": "Most common cause of bronchiolitis?",
        "opa": "Adenovirus",
        "opb": "Influenza",
        "opc": "RSV",
        "opd": "Rhinovirus",
        "cop": cop,
        "choice_type": "single",
        "exp": "RSV causes most cases.",
        "subject_name": subject,
        "topic_name": "Respiratory",
    }
    rec.update(over)
    return rec


def test_medmcqa_loads_with_zero_based_cop_and_subject_specialties(tmp_path):
    f = write_jsonl(
        tmp_path / "dev.json",  # the official files are JSON lines named .json
        [
            medmcqa(),
            medmcqa("x2", cop="a", subject="Gynaecology & Obstetrics"),
            medmcqa("x3", cop=0, subject="Anatomy"),
            medmcqa("x4", cop=3, subject="Skin"),
        ],
    )
    res = load_questions(f)
    assert res.format == "medmcqa"
    q1, q2, q3, q4 = res.questions
    assert (
        q1.id == "e9ad821a"
        and q1.answer == "C"
        and q1.options == {"A": "Adenovirus", "B": "Influenza", "C": "RSV", "D": "Rhinovirus"}
    )
    assert q1.specialties == ["pediatrics"] and q1.source == "medmcqa:Pediatrics"
    assert q1.meta == {
        "subject_name": "Pediatrics",
        "topic_name": "Respiratory",
        "exp": "RSV causes most cases.",
        "choice_type": "single",
    }
    assert (
        q2.answer == "A"
        and q2.specialties == ["obstetrics_gynecology"]
        and q2.source == "medmcqa:Gynaecology & Obstetrics"
    )
    assert q3.answer == "A" and q3.specialties == [] and q3.source == "medmcqa:Anatomy"
    assert q4.answer == "D" and q4.specialties == ["dermatology"]


def test_medmcqa_cop_out_of_range(tmp_path):
    f = write_jsonl(tmp_path / "dev.json", [medmcqa(), medmcqa("x2", cop=4)])
    raises(
        f"{f}:2: field 'cop': must be a 0-based index 0-3 (as in the Hugging Face release) or a letter a-d, got 4"
        + SKIP_HINT,
        f,
    )


def test_medmcqa_empty_option_names_its_column(tmp_path):
    f = write_jsonl(tmp_path / "dev.json", [medmcqa(opc=" ")])
    raises(f"{f}:1: field 'opc': option C is empty" + SKIP_HINT, f)


# ---------------------------------------------------------------------------------------------- mmlu


def write_mmlu(folder: Path) -> Path:
    folder.mkdir()
    (folder / "clinical_knowledge_test.csv").write_text(
        "What is the normal adult resting heart rate?,40-60,60-100,100-120,120-140,B\n"
        '"A question, with a comma\nand a second line",w,x,y,z,D\n',
        encoding="utf-8",
    )
    (folder / "anatomy_dev.csv").write_text("Which bone is in the thigh?,Femur,Tibia,Ulna,Radius,A\n", encoding="utf-8")
    (folder / "notes.txt").write_text("not a question file\n", encoding="utf-8")
    return folder


def test_mmlu_folder_loads_every_csv(tmp_path):
    folder = write_mmlu(tmp_path / "test")
    res = load_questions(folder)
    assert res.format == "mmlu"
    assert [q.id for q in res.questions] == [
        "mmlu-anatomy_dev-1",
        "mmlu-clinical_knowledge_test-1",
        "mmlu-clinical_knowledge_test-2",
    ]
    a, ck1, ck2 = res.questions
    assert a.source == "mmlu:anatomy" and a.answer == "A" and a.options["A"] == "Femur"
    assert (
        ck1.source == "mmlu:clinical_knowledge"
        and ck1.answer == "B"
        and ck1.options == {"A": "40-60", "B": "60-100", "C": "100-120", "D": "120-140"}
    )
    assert ck2.question == "A question, with a comma\nand a second line" and ck2.answer == "D"
    assert ck1.meta == {"subject": "clinical_knowledge"}


def test_mmlu_single_file_and_helpers(tmp_path):
    folder = write_mmlu(tmp_path / "test")
    res = load_questions(folder / "anatomy_dev.csv", format="mmlu")
    assert [q.source for q in res.questions] == ["mmlu:anatomy"]
    assert mmlu_subject("professional_medicine_val.csv") == "professional_medicine"
    assert mmlu_subject("x/college_biology_test.csv") == "college_biology"
    assert "clinical_knowledge" in MMLU_MEDICAL and len(MMLU_MEDICAL) == 6


def test_mmlu_bad_answer_letter_and_column_count(tmp_path):
    f = tmp_path / "anatomy_test.csv"
    f.write_text("Q1,a,b,c,d,A\nQ2,a,b,c,d,E\nQ3,a,b,c,A\n", encoding="utf-8")
    res = load_questions(f, format="mmlu", skip_invalid=True)
    assert [q.question for q in res.questions] == ["Q1"]
    assert [str(p) for p in res.skipped] == [
        f"{f}:2: field 'answer': must be A, B, C or D, got 'E'",
        f"{f}:3: expected 6 columns (question, A, B, C, D, answer), got 5",
    ]
    raises(f"{f}:2: field 'answer': must be A, B, C or D, got 'E'" + SKIP_HINT, f, format="mmlu")


# ---------------------------------------------------------------------------------------------- pubmedqa


def pubmedqa_record(decision="yes", question="Do statins reduce mortality?") -> dict:
    return {
        "QUESTION": question,
        "CONTEXTS": ["Background text.", "Results text."],
        "LABELS": ["BACKGROUND", "RESULTS"],
        "MESHES": ["Humans", "Statins"],
        "YEAR": "2011",
        "reasoning_required_pred": "yes",
        "reasoning_free_pred": "yes",
        "final_decision": decision,
        "LONG_ANSWER": "They do.",
    }


def test_pubmedqa_loads(tmp_path):
    f = tmp_path / "ori_pqal.json"
    f.write_text(
        json.dumps({"111": pubmedqa_record("yes"), "222": pubmedqa_record("maybe"), "333": pubmedqa_record("no")}),
        encoding="utf-8",
    )
    res = load_questions(f)
    assert res.format == "pubmedqa"
    assert [(q.id, q.answer) for q in res.questions] == [
        ("pubmedqa-111", "A"),
        ("pubmedqa-222", "C"),
        ("pubmedqa-333", "B"),
    ]
    q = res.questions[0]
    assert q.options == {"A": "yes", "B": "no", "C": "maybe"} and q.source == "pubmedqa"
    assert q.question == "Do statins reduce mortality?"
    assert q.meta["contexts"] == "Background text.\n\nResults text."
    assert q.meta["long_answer"] == "They do." and q.meta["meshes"] == ["Humans", "Statins"]
    assert q.meta["pmid"] == "111" and q.meta["year"] == "2011"


def test_pubmedqa_bad_decision_names_the_pmid(tmp_path):
    f = tmp_path / "ori_pqal.json"
    f.write_text(json.dumps({"111": pubmedqa_record(), "222": pubmedqa_record("perhaps")}, indent=1), encoding="utf-8")
    raises(f"{f}: record '222': field 'final_decision': must be yes, no or maybe, got 'perhaps'" + SKIP_HINT, f)
    res = load_questions(f, skip_invalid=True)
    assert len(res.questions) == 1 and res.skipped[0].key == "222" and res.skipped[0].line is None


# ---------------------------------------------------------------------------------------------- mirage


def test_mirage_loads(tmp_path):
    f = tmp_path / "benchmark.json"
    data = {
        "mmlu": {
            "anatomy-000": {"question": "Q1?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer": "C"}
        },
        "pubmedqa": {"12345": {"question": "Q2?", "options": {"A": "yes", "B": "no", "C": "maybe"}, "answer": "B"}},
    }
    f.write_text(json.dumps(data), encoding="utf-8")
    res = load_questions(f)
    assert res.format == "mirage"
    q1, q2 = res.questions
    assert (q1.id, q1.source, q1.answer) == ("mirage-mmlu-anatomy-000", "mirage:mmlu", "C")
    assert (q2.id, q2.source, q2.answer, q2.options["C"]) == ("mirage-pubmedqa-12345", "mirage:pubmedqa", "B", "maybe")


def test_mirage_answer_not_an_option(tmp_path):
    f = tmp_path / "benchmark.json"
    f.write_text(
        json.dumps({"medqa": {"0": {"question": "Q?", "options": {"A": "a", "B": "b"}, "answer": "D"}}}),
        encoding="utf-8",
    )
    raises(f"{f}: record 'medqa/0': field 'answer': answer 'D' is not one of the options A, B" + SKIP_HINT, f)


# ---------------------------------------------------------------------------------------------- generic


def test_csv_with_mapping_accepts_letter_index_and_text_answers(tmp_path):
    f = tmp_path / "mine.csv"
    f.write_text(
        "qid,stem,opa,opb,opc,opd,label,spec,notes\n"
        "k1,First?,w,x,y,z,C,cardio; neuro,n1\n"
        "k2,Second?,w,x,y,z,1,,n2\n"
        "k3,Third?,w,x,y,Zebra,Zebra,Pediatrics,n3\n"
        "k4,Fourth?,w,x,y,,b,,n4\n",
        encoding="utf-8",
    )
    mapping = {"question": "stem", "answer": "label", "options": "opa,opb,opc,opd", "id": "qid", "specialties": "spec"}
    res = load_questions(f, mapping=mapping)
    assert res.format == "csv"
    assert [(q.id, q.answer) for q in res.questions] == [("k1", "C"), ("k2", "B"), ("k3", "D"), ("k4", "B")]
    k1, k2, k3, k4 = res.questions
    assert k1.question == "First?" and k1.options == {"A": "w", "B": "x", "C": "y", "D": "z"}
    assert k1.specialties == ["cardiology", "neurology"] and k2.specialties == [] and k3.specialties == ["pediatrics"]
    assert k1.source == "mine" and k1.meta == {"notes": "n1"}
    assert list(k4.options) == ["A", "B", "C"]  # a trailing empty option is dropped


def test_csv_with_standard_columns_is_detected(tmp_path):
    f = tmp_path / "plain.csv"
    f.write_text("question,A,B,C,answer\nWhich?,one,two,three,2\n", encoding="utf-8")
    assert detect_format(f) == "csv"
    (q,) = load_questions(f).questions
    assert q.id == "plain-2" and q.options == {"A": "one", "B": "two", "C": "three"} and q.answer == "C"


def test_csv_ambiguous_and_unknown_answers(tmp_path):
    f = tmp_path / "mine.csv"
    f.write_text("question,a,b,c,answer\nNumbers?,1,2,0,1\nOther?,x,y,z,q\n", encoding="utf-8")
    mapping = {"options": "a,b,c"}
    res = load_questions(f, mapping=mapping, skip_invalid=True)
    assert res.questions == []
    assert [str(p) for p in res.skipped] == [
        f"{f}:2: field 'answer': '1' is ambiguous: as a letter, a 0-based index or an option text it could be A or B",
        f"{f}:3: field 'answer': 'q' is not an option letter (A, B, C), a 0-based index (0-2) or the text of an option",
    ]


def test_csv_row_with_wrong_cell_count(tmp_path):
    f = tmp_path / "plain.csv"
    f.write_text("question,A,B,answer\nOne?,x,y,A\nTwo?,x,y\n", encoding="utf-8")
    raises(f"{f}:3: the row has 3 cells but the header has 4 columns" + SKIP_HINT, f)


def test_jsonl_with_mapping_and_list_options(tmp_path):
    f = write_jsonl(
        tmp_path / "own.jsonl", [{"q": "Which?", "choices": ["a", "b", "c"], "gold": 2, "tags": ["gi"], "extra": 1}]
    )
    res = load_questions(f, mapping={"question": "q", "options": "choices", "answer": "gold", "specialties": "tags"})
    assert res.format == "jsonl"
    (q,) = res.questions
    assert q.options == {"A": "a", "B": "b", "C": "c"} and q.answer == "C" and q.specialties == ["gastroenterology"]
    assert q.id == "own-1" and q.meta == {"extra": 1}


def test_jsonl_mapping_missing_column(tmp_path):
    f = write_jsonl(tmp_path / "own.jsonl", [{"q": "Which?", "choices": ["a", "b"]}])
    raises(
        f"{f}:1: field 'gold': missing" + SKIP_HINT,
        f,
        mapping={"question": "q", "options": "choices", "answer": "gold"},
    )


def test_parquet_with_mapping(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "set.parquet"
    table = pa.table({"qid": ["p1", "p2"], "stem": ["One?", "Two?"], "o1": ["a", "c"], "o2": ["b", "d"], "ans": [1, 0]})
    pq.write_table(table, f)
    assert detect_format(f) == "parquet"
    res = load_questions(f, mapping={"id": "qid", "question": "stem", "options": "o1,o2", "answer": "ans"})
    assert res.format == "parquet"
    assert [(q.id, q.answer, q.options["A"]) for q in res.questions] == [("p1", "B", "a"), ("p2", "A", "c")]


def test_mapping_is_checked(tmp_path):
    f = write_jsonl(tmp_path / "test.jsonl", [medqa()])
    raises(
        "a column mapping only applies to the formats jsonl, csv, parquet, not medqa",
        f,
        format="medqa",
        mapping={"question": "q"},
    )
    raises(
        "unknown mapping key 'stem': use question, options, answer, id, specialties, source",
        f,
        mapping={"stem": "question"},
    )


# ---------------------------------------------------------------------------------------------- statements


def test_statements_load(tmp_path):
    f = write_jsonl(
        tmp_path / "st.jsonl",
        [
            {
                "id": "s1",
                "statement": "Aspirin is an antiplatelet.",
                "label": True,
                "specialties": ["cardio"],
                "source": "x",
                "meta": {"r": 1},
            },
            {
                "id": "s2",
                "statement": "Antibiotics treat colds.",
                "label": False,
                "specialties": [],
                "source": "x",
                "meta": {},
            },
        ],
    )
    res = load_questions(f)
    assert res.format == "statements"
    s1, s2 = res.questions
    assert (
        s1.question == "Aspirin is an antiplatelet." and s1.options == {"A": "True", "B": "False"} and s1.answer == "A"
    )
    assert s1.specialties == ["cardiology"] and s1.meta == {"r": 1, "statement": True} and s1.source == "x"
    assert s2.answer == "B" and s2.meta == {"statement": True}


def test_statement_label_must_be_boolean(tmp_path):
    f = write_jsonl(tmp_path / "st.jsonl", [{"id": "s1", "statement": "X.", "label": "yes"}])
    raises(f"{f}:1: field 'label': must be true or false, got 'yes'" + SKIP_HINT, f, format="statements")


# ---------------------------------------------------------------------------------------------- malformed rows


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"id": "q2", "question": ', "not valid JSON (Expecting value at column 26)"),
        (json.dumps(native("q2", question=None)), "field 'question': input should be a valid string"),
        (json.dumps({k: v for k, v in native("q2").items() if k != "question"}), "field 'question': missing"),
        (json.dumps(native("q2", question="  ")), "field 'question': question text is empty"),
        (
            json.dumps(native("q2", options={"A": "x", "C": "y"})),
            "field 'options': option keys must be A, B in order, got A, C",
        ),
        (json.dumps(native("q2", options={"A": "x", "B": ""})), "field 'options': option B is empty"),
        (json.dumps(native("q2", answer="E")), "field 'answer': answer 'E' is not one of the options A, B, C, D"),
        (
            json.dumps(native("q2", colour="red")),
            "field 'colour': not a field of a question (expected id, question, options, answer, specialties, source, meta)",
        ),
        (
            json.dumps(native("q2", specialties="cardiology")),
            "field 'specialties': expected a list of specialty labels, got a string",
        ),
        (json.dumps(native("q1")), "field 'id': duplicate question id 'q1' (first seen at {f}:1)"),
        ("[1, 2]", "expected a JSON object, got a list"),
    ],
)
def test_malformed_row_names_file_line_and_field(tmp_path, line, expected):
    f = write_jsonl(tmp_path / "q.jsonl", [native("q1"), line, native("q3")])
    expected = expected.format(f=f)
    raises(f"{f}:2: {expected}" + SKIP_HINT, f, format="clinqa")
    res = load_questions(f, format="clinqa", skip_invalid=True)
    assert [q.id for q in res.questions] == ["q1", "q3"]
    assert [str(p) for p in res.skipped] == [f"{f}:2: {expected}"]


def test_unknown_specialty_is_a_problem_on_specialties(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [native("q1", specialties=["astrology"])])
    with pytest.raises(ClinqaError) as exc:
        load_questions(f)
    msg = str(exc.value)
    assert msg.startswith(f"{f}:1: field 'specialties': unknown specialty 'astrology': use one of cardiology, ")
    assert msg.endswith(SKIP_HINT)


def test_skip_invalid_counts_and_keeps_good_rows(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [native("q1"), "{oops", native("q2", answer="Z"), native("q3"), native("q1")])
    res = load_questions(f, skip_invalid=True)
    assert [q.id for q in res.questions] == ["q1", "q3"]
    assert [(p.line, p.field) for p in res.skipped] == [(2, None), (3, "answer"), (5, "id")]
    assert all(isinstance(p, Problem) and p.file == str(f) for p in res.skipped)


def test_problem_str():
    assert str(Problem("path/file.jsonl", 12, "answer_idx", "'F' is not one of the options A, B")) == (
        "path/file.jsonl:12: field 'answer_idx': 'F' is not one of the options A, B"
    )
    assert str(Problem("f.json", None, None, "not valid JSON")) == "f.json: not valid JSON"


def test_invalid_whole_json_file(tmp_path):
    f = tmp_path / "ori_pqal.json"
    f.write_text('{"1": {"QUESTION": "x",\n "final_decision": }}', encoding="utf-8")
    raises(f"{f}:2: not valid JSON (Expecting value at column 20)" + SKIP_HINT, f, format="pubmedqa")


# ---------------------------------------------------------------------------------------------- files, detection, options


def test_missing_file():
    raises("no such file or folder: /nonexistent/questions.jsonl", "/nonexistent/questions.jsonl")


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ClinqaError, match=r"no question files in folder .* subfolders are not searched"):
        load_questions(tmp_path)


def test_detect_each_format(tmp_path):
    files = {
        "clinqa": write_jsonl(tmp_path / "a.jsonl", [native()]),
        "medqa": write_jsonl(tmp_path / "b.jsonl", [medqa()]),
        "medmcqa": write_jsonl(tmp_path / "c.json", [medmcqa()]),
        "statements": write_jsonl(tmp_path / "d.jsonl", [{"id": "s", "statement": "x", "label": True}]),
        "jsonl": write_jsonl(
            tmp_path / "e.jsonl", [{"question": "x", "options": ["a", "b"], "answer": 0, "explanation": "e"}]
        ),
        "mmlu": write_mmlu(tmp_path / "mmlu") / "anatomy_dev.csv",
    }
    (tmp_path / "p.json").write_text(json.dumps({"1": pubmedqa_record()}))
    files["pubmedqa"] = tmp_path / "p.json"
    (tmp_path / "m.json").write_text(
        json.dumps({"medqa": {"0": {"question": "q", "options": {"A": "a", "B": "b"}, "answer": "A"}}})
    )
    files["mirage"] = tmp_path / "m.json"
    for name, path in files.items():
        assert detect_format(path) == name, path
        assert load_questions(path).format == name


def test_unknown_or_ambiguous_files_ask_for_format(tmp_path):
    names = ", ".join(FORMATS)
    f = write_jsonl(tmp_path / "x.jsonl", [{"stem": "x", "key": "A"}])
    raises(
        f"cannot tell the format of {f}: its first record has keys key, stem, which match no known format; pass --format (one of {names})",
        f,
    )
    t = tmp_path / "x.txt"
    t.write_text("hello")
    raises(f"cannot tell the format of {t}: unknown extension '.txt'; pass --format (one of {names})", t)
    c = tmp_path / "x.csv"
    c.write_text("stem,key\nx,A\n")
    with pytest.raises(ClinqaError, match=r"--format \(one of clinqa, medqa"):
        load_questions(c)


def test_unknown_format_name(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [native()])
    raises(f"unknown format 'medqa2': use one of {', '.join(FORMATS)}", f, format="medqa2")


def test_folder_mixing_formats(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [native("n1")])
    write_jsonl(tmp_path / "b.jsonl", [medqa()])
    res = load_questions(tmp_path)
    assert res.format == "clinqa+medqa" and [q.id for q in res.questions] == ["n1", "medqa-1"]


def test_duplicate_ids_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [native("q1")])
    b = write_jsonl(tmp_path / "b.jsonl", [native("q2"), native("q1")])
    raises(f"{b}:2: field 'id': duplicate question id 'q1' (first seen at {a}:1)" + SKIP_HINT, tmp_path)


def test_specialty_filter_and_limit(tmp_path):
    recs = [
        native("c1", specialties=["cardiology"]),
        native("n1", specialties=["neurology"]),
        native("c2", specialties=["cardiology", "nephrology"]),
        native("g1", specialties=["gastroenterology"]),
        native("c3", specialties=["cardiology"]),
    ]
    f = write_jsonl(tmp_path / "q.jsonl", recs)
    assert [q.id for q in load_questions(f, specialties=["cardio"]).questions] == ["c1", "c2", "c3"]
    assert [q.id for q in load_questions(f, specialties=["Cardiology", "gastro"], limit=3).questions] == [
        "c1",
        "c2",
        "g1",
    ]
    assert [q.id for q in load_questions(f, limit=2).questions] == ["c1", "n1"]
    assert load_questions(f, limit=0).questions == []
    with pytest.raises(ClinqaError, match="unknown specialty 'astrology'"):
        load_questions(f, specialties=["astrology"])


def test_limit_stops_reading(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [native("q1"), native("q2"), "{bad"])
    assert [q.id for q in load_questions(f, limit=2).questions] == ["q1", "q2"]


# ---------------------------------------------------------------------------------------------- bundled


def test_parse_bundled_spec():
    assert parse_bundled_spec("bundled") == "clinical"
    assert parse_bundled_spec("bundled:clinical") == "clinical"
    assert parse_bundled_spec("bundled:control") == "control"
    assert BUNDLED_NAMES == ("clinical", "control", "statements")


def test_bundled_resolution_with_fixture_files(tmp_path, monkeypatch):
    (tmp_path / "clinical_cardiology.jsonl").write_text(json.dumps(native("b-c1", specialties=["cardiology"])) + "\n")
    (tmp_path / "clinical_neurology.jsonl").write_text(json.dumps(native("b-n1", specialties=["neurology"])) + "\n")
    (tmp_path / "control.jsonl").write_text(json.dumps(native("b-x1", specialties=[])) + "\n")
    (tmp_path / "statements.jsonl").write_text(json.dumps({"id": "b-s1", "statement": "x.", "label": False}) + "\n")
    monkeypatch.setattr(bundled, "bundled_dir", lambda: tmp_path)
    assert bundled_names() == ["clinical", "control", "statements", "clinical_cardiology", "clinical_neurology"]
    assert bundled_files("clinical") == [tmp_path / "clinical_cardiology.jsonl", tmp_path / "clinical_neurology.jsonl"]
    assert bundled_path("control") == tmp_path / "control.jsonl"
    assert bundled_path("clinical_neurology") == tmp_path / "clinical_neurology.jsonl"
    for spec in ("bundled", "bundled:clinical"):
        res = load_questions(spec)
        assert res.format == "clinqa" and [q.id for q in res.questions] == ["b-c1", "b-n1"]
    assert [q.id for q in load_questions("bundled", specialties=["neuro"]).questions] == ["b-n1"]
    assert [q.id for q in load_questions("bundled:control").questions] == ["b-x1"]
    res = load_questions("bundled:statements")
    assert res.format == "statements" and res.questions[0].answer == "B"
    with pytest.raises(
        ClinqaError,
        match="unknown bundled question set 'nope': use one of clinical, control, statements, clinical_cardiology",
    ):
        load_questions("bundled:nope")
    with pytest.raises(ClinqaError, match="several files"):
        bundled_path("clinical")


def test_bundled_missing_files_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bundled, "bundled_dir", lambda: tmp_path)
    with pytest.raises(ClinqaError, match=r"the bundled question set 'clinical' is missing from .* reinstall clinqa"):
        load_questions("bundled")


def test_real_bundled_control_and_statements():
    for name, fmt in (("control", "clinqa"), ("statements", "statements")):
        path = bundled.bundled_dir() / f"{name}.jsonl"
        if not path.exists():
            pytest.skip(f"bundled {name}.jsonl not written yet")
        assert bundled_path(name) == path
        assert detect_format(path) == fmt
        res = load_questions(f"bundled:{name}")
        assert res.format == fmt and res.skipped == [] and len(res.questions) > 0
    assert all(
        q.meta.get("statement") is True and q.answer in ("A", "B")
        for q in load_questions("bundled:statements").questions
    )


def test_real_bundled_clinical():
    if not list(bundled.bundled_dir().glob("clinical_*.jsonl")):
        pytest.skip("bundled clinical_*.jsonl not written yet")
    res = load_questions("bundled")
    assert res.format == "clinqa" and res.skipped == [] and len(res.questions) > 0
    assert all(q.specialties for q in res.questions)
    assert len(load_questions("bundled:clinical").questions) == len(res.questions)
    # the control set and the clinical set never share ids
    control = {q.id for q in load_questions("bundled:control").questions}
    assert not control & {q.id for q in res.questions}


# ---------------------------------------------------------------------------------------------- layout


def test_loaders_reexports_the_formats_package_and_its_problem_log(tmp_path):
    from clinqa.data import formats, loaders
    from clinqa.data.formats.common import ProblemLog

    assert loaders.FORMATS is formats.FORMATS and loaders.detect_format is formats.detect_format
    assert loaders.Problem is formats.Problem and loaders.LoadResult is formats.LoadResult
    bad = Problem("f.jsonl", 3, "answer", "missing")
    keep = ProblemLog(skip_invalid=True)
    keep(bad)
    assert keep.skipped == [bad]
    with pytest.raises(ClinqaError) as exc:
        ProblemLog()(bad)
    assert str(exc.value) == "f.jsonl:3: field 'answer': missing" + SKIP_HINT
