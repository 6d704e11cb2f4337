"""`clinqa records ...`: patient-record QA over FHIR R4."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from clinqa.cli.app import records_app
from clinqa.cli.common import (
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    _at_least,
    _writable_out,
    console,
    err,
    load_predictor,
    progress_bar,
)
from clinqa.errors import ClinqaError
from clinqa.textsafe import plain, safe


@records_app.command("synth")
def records_synth(
    patients: int = typer.Option(10, "--patients", "-n", help="how many patients"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(..., "--out", "-o", help="folder for one Bundle JSON file per patient"),
    now: str = typer.Option("2025-01-01", help="the 'today' the histories end at (YYYY-MM-DD)"),
) -> None:
    """Generate realistic synthetic FHIR R4 patients (deterministic for a seed)."""
    import datetime as dt

    from clinqa.records.synth import synthesize_patients, write_patients

    try:
        today = dt.date.fromisoformat(now)
    except ValueError as exc:
        raise ClinqaError(f"--now {now!r} is not a date (YYYY-MM-DD)") from exc
    with err.status(f"synthesising {patients} patients ..."):
        paths = write_patients(out, synthesize_patients(patients, seed=seed, now=today))
    console.print(f"wrote {len(paths)} patient bundles to [bold]{safe(out)}[/bold]")


@records_app.command("show")
def records_show(
    source: str = typer.Argument(
        ..., help="a Bundle JSON file, a folder of bundles, an NDJSON export, or https://server/fhir/Patient/ID"
    ),
    lenient: bool = typer.Option(False, "--lenient", help="keep resources that fail validation and report them"),
    include_billing: bool = typer.Option(False, "--include-billing", help="keep Claim/ExplanationOfBenefit"),
    limit: int = typer.Option(40, help="rendered lines to print per patient (0 = all)"),
) -> None:
    """Load and validate records, then print each patient's resources as the model sees them."""
    from clinqa.records.fhir import load_records
    from clinqa.records.render import render_record

    records = load_records(source, lenient=lenient, include_billing=include_billing)
    for rec in records:
        lines = render_record(rec)
        console.print(
            f"[bold]{safe(rec.name)}[/bold] ({safe(rec.patient_id)}) · {len(rec.resources)} resources · {len(rec.problems)} problems"
        )
        for problem in rec.problems:
            err.print(f"[yellow]problem:[/yellow] {safe(problem)}")
        for _rid, line in lines[: limit or None]:
            console.print(plain(line), highlight=False, markup=False)
        if limit and len(lines) > limit:
            console.print(f"... {len(lines) - limit} more")


@records_app.command("questions")
def records_questions(
    source: str = typer.Argument(
        ..., help="records: a folder of bundles (e.g. from `records synth`), a bundle, or an NDJSON export"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="questions JSONL (relevant resource ids and reference answers)"),
    seed: int = typer.Option(0),
    per_type: int = typer.Option(3, help="questions per question type per patient"),
    now: Optional[str] = typer.Option(
        None, help="fixed 'today' for time-window questions (default: each record's last date + 30 days)"
    ),
) -> None:
    """Generate questions with ground truth from records (works on real Synthea bundles too)."""
    import datetime as dt
    from collections import Counter

    from clinqa.records.fhir import load_records
    from clinqa.records.questions import generate_questions, record_end, write_questions

    records = load_records(source)
    qs = []
    with progress_bar("questions") as update:
        for i, rec in enumerate(records):
            today = dt.date.fromisoformat(now) if now else (record_end(rec) or dt.date.today()) + dt.timedelta(days=30)
            qs += generate_questions(rec, now=today, seed=seed, per_type=per_type)
            update(i + 1, len(records))
    write_questions(out, qs)
    counts = Counter(q.qtype for q in qs)
    console.print(
        f"wrote {len(qs)} questions for {len(records)} patients to [bold]{safe(out)}[/bold]: "
        + ", ".join(f"{safe(k)} {v}" for k, v in sorted(counts.items()))
    )


def _selector(selector: str, model_predictor, top_k: int, threshold: float | None, min_lines: int = 0, **finetuned):
    """The stage-1 selector of --selector (clinqa.records.selector_factory.make_selector, as the service)."""
    from clinqa.records.selector_factory import make_selector

    return make_selector(selector, predictor=model_predictor, top_k=top_k, threshold=threshold, min_lines=min_lines,
                         load=load_predictor, **finetuned)  # fmt: skip


def _check_min_lines(selector: str, min_lines: int) -> None:
    _at_least("--min-lines", min_lines, 0)
    if min_lines and selector not in ("llm", "finetuned"):
        raise ClinqaError(
            f"--min-lines is the llm selector's floor: use it with --selector llm (or --adapters), not {selector}"
        )


MIN_LINES_HELP = (
    "llm selector: keep at least this many best-scoring lines when fewer pass the threshold "
    "(0: stage 1 may select nothing, and stage 2 says the answer is not in the record)"
)


SELECTOR_HELP = "stage 1: bm25 | embedding | llm (P(yes) from the model; use MODEL+lora:... for a fine-tuned one) | full (whole record baseline) | finetuned (with --adapters)"


@records_app.command("ask")
def records_ask(
    source: str = typer.Argument(..., help="a patient's Bundle JSON file (or any records source with one patient)"),
    question: str = typer.Argument(..., help="the question about this patient"),
    model: str = typer.Option("default", help="model spec"),
    selector: str = typer.Option("bm25", help=SELECTOR_HELP),
    top_k: int = typer.Option(8, help="lines kept by a retrieval selector"),
    threshold: float = typer.Option(0.5, help="P(yes) threshold of the llm selector"),
    min_lines: int = typer.Option(0, help=MIN_LINES_HELP),
    patient: Optional[str] = typer.Option(None, help="patient id when the source holds several"),
    max_new_tokens: int = typer.Option(128),
    max_question_chars: int = typer.Option(2000, help="refuse longer questions (the service's default limit)"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Answer a question from one patient's record: the answer, its cited resources, and stage 1's selection."""
    from clinqa.records.fhir import load_records
    from clinqa.records.pipeline import answer_question
    from clinqa.records.render import render_record

    if not question.strip():
        raise ClinqaError("the question is empty: ask something about the patient")
    if len(question) > max_question_chars:
        raise ClinqaError(
            f"the question is {len(question):,} characters, over the limit of {max_question_chars:,} "
            "(raise it with --max-question-chars)"
        )
    records = load_records(source)
    if patient:
        records = [r for r in records if r.patient_id == patient]
    if len(records) != 1:
        raise ClinqaError(f"{source} holds {len(records)} patients: choose one with --patient ID")
    record = records[0]
    _check_min_lines(selector, min_lines)  # before the model loads
    predictor = load_predictor(model)
    with err.status("answering ..."):
        res = answer_question(
            predictor,
            record,
            question,
            selector=_selector(selector, predictor, top_k, threshold, min_lines),
            max_new_tokens=max_new_tokens,
        )
    lines = dict(render_record(record))
    console.print(f"[bold]answer:[/bold] {safe(res.answer)}", highlight=False)
    for rid in res.citations:
        console.print(plain(f"  cites {lines.get(rid, rid)}"), highlight=False, markup=False)
    if res.invalid_citations:
        console.print(
            f"[yellow]removed citations to resources outside this record:[/yellow] {safe(', '.join(res.invalid_citations))}"
        )
    if not res.supported:
        err.print(
            "[bold yellow]unsupported:[/bold yellow] the answer cites nothing in this patient's record; do not trust it"
        )
    console.print(f"stage 1 ({selector}) selected {len(res.selected)} of {len(lines)} resources:")
    for sel in res.selected[:12]:
        console.print(plain(f"  {sel.score:.3f} {lines.get(sel.id, sel.id)}"), highlight=False, markup=False)
    console.print(f"{res.tokens} tokens · " + " · ".join(f"{k} {v:.2f}s" for k, v in res.timings.items()))


@records_app.command("eval")
def records_eval(
    model: str = typer.Argument(..., help="model spec answering stage 2 (and stage 1 with --selector llm)"),
    qa: Path = typer.Argument(..., help="questions JSONL from `clinqa records questions`"),
    records: str = typer.Option(..., "--records", help="the records the questions were generated from"),
    out: Path = typer.Option(..., "--out", "-o", help="run folder (resumable)"),
    selector: str = typer.Option("bm25", help=SELECTOR_HELP),
    top_k: int = typer.Option(8),
    threshold: Optional[float] = typer.Option(
        None, help="P(yes) threshold of the llm selector (default: the tuned one with --adapters, else 0.5)"
    ),
    min_lines: int = typer.Option(0, help=MIN_LINES_HELP),
    limit: Optional[int] = typer.Option(None, help="only the first N questions"),
    max_new_tokens: int = typer.Option(128),
    meteor: bool = typer.Option(True, help="compute METEOR (needs Debian's wordnet-base)"),
    adapters: Optional[Path] = typer.Option(
        None,
        help="fine-tuned stages from `records finetune`: MODEL is their base; "
        "stage 1 is the llm selector with the stage-1 adapter and its tuned threshold",
    ),
    stage1_model: Optional[str] = typer.Option(None, help="model spec of the llm selector when it differs from MODEL"),
    tune: Optional[Path] = typer.Option(
        None, help="validation questions JSONL: set the llm selector's threshold for the best stage-1 F1 on them first"
    ),
    tune_records: Optional[str] = typer.Option(None, help="records of --tune (default: --records)"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Stage-1 precision/recall/F1 and stage-2 METEOR, ROUGE-L, exact match, citation precision, abstention."""
    import json as _json

    from clinqa.records.pipeline import evaluate_records

    _at_least("--limit", limit)
    _at_least("--top-k", top_k)
    _at_least("--max-new-tokens", max_new_tokens)
    _writable_out(out)
    recs, questions = _records_and_questions(qa, records, limit)
    finetuned = {}
    if adapters is not None:
        from clinqa.records.train import read_stages

        if stage1_model:
            raise ClinqaError("--adapters brings its own stage 1: drop --stage1-model (or --adapters)")
        finetuned = {"adapters": adapters, "base": model}
        model, selector = f"{model}+lora:{read_stages(adapters)['stage2']}", "finetuned"
    _check_min_lines(selector, min_lines)  # before any model loads
    predictor = load_predictor(model)
    stage1 = load_predictor(stage1_model) if stage1_model else predictor
    chosen = _selector(selector, stage1, top_k, threshold, min_lines, **finetuned)
    tuned = None
    if tune is not None:
        from clinqa.records.pipeline import earlier_tuning, selection_examples, tune_threshold, tuning_key

        if selector not in ("llm", "finetuned"):
            raise ClinqaError("--tune sets the llm selector's threshold: use it with --selector llm (or --adapters)")
        trecs, tq = _records_and_questions(tune, tune_records or records)
        examples = selection_examples(trecs, tq)
        key = tuning_key(chosen, examples)
        tuned = earlier_tuning(out, key)
        if tuned is not None:  # a rerun: the run recorded this tuning, same questions and selector
            chosen.threshold = tuned["threshold"]
            how = f"tuned before, read from {out / 'run.json'}"
        else:
            with err.status(f"tuning the stage-1 threshold on {len(tq)} questions ..."):
                tuned = {**tune_threshold(chosen, examples), "n_questions": len(tq), **key}
            how = "tuned now"
        console.print(
            plain(
                f"stage-1 threshold {tuned['threshold']:.4f}: F1 {tuned['f1']:.3f} on {len(tq)} tuning questions ({how})"
            ),
            markup=False,
            highlight=False,
        )
    with progress_bar(f"records · {selector}") as update:
        summary = evaluate_records(
            predictor,
            recs,
            questions,
            selector=chosen,
            out=out,
            progress=update,
            max_new_tokens=max_new_tokens,
            with_meteor=meteor,
            tuning=tuned,
        )
    console.print_json(_json.dumps(summary, default=str))
    console.print(f"run saved in [bold]{safe(out)}[/bold]")


@records_app.command("compare")
def records_compare(
    runs: list[str] = typer.Argument(..., help="run folders of `records eval`, each PATH or NAME=PATH"),
    baseline: Optional[str] = typer.Option(None, help="the run the others are compared with (default: the first)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the tables (.md) and figures (.json)"),
) -> None:
    """Record-QA runs side by side on the same questions: stage-1 F1, exact match, METEOR, ROUGE-L and
    abstention, each with a bootstrap interval, and paired tests of every run against the baseline."""
    import json as _json

    from clinqa.records.compare import compare_runs, to_markdown
    from clinqa.records.evaluation import read_records_run

    named: dict[str, list] = {}
    for arg in runs:
        name, _, path = arg.partition("=") if "=" in arg else (Path(arg).name, "", arg)
        if name in named:
            raise ClinqaError(f"two runs are named {name!r}: give them names, NAME=PATH")
        named[name] = read_records_run(path)
    result = compare_runs(named, baseline)
    text = to_markdown(result)
    if out is not None:
        _writable_out(out, folder=False)
        out.with_suffix(".md").write_text(text, encoding="utf-8")
        out.with_suffix(".json").write_text(_json.dumps(result, indent=1, default=str), encoding="utf-8")
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@records_app.command("judge")
def records_judge(
    qa: Path = typer.Argument(..., help="the questions JSONL the runs answered"),
    run: list[str] = typer.Option(
        ..., "--run", help="NAME=RUN_FOLDER of a `records eval` run (repeatable); NAME is what the named judge is told"
    ),
    judge: str = typer.Option("default", help="judge model spec (any backend, e.g. openai:URL#MODEL)"),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="run folder: every grade and verdict written as it comes (a rerun resumes), the report in report.json",
    ),
    seed: int = typer.Option(0, help="seed of the blind panel's answer order (and of the bootstrap)"),
    reading: str = typer.Option(
        "logprob",
        help="logprob: grades from the judge's next-token distribution; generate: the judge writes them (servers without log-probabilities)",
    ),
    pairwise: bool = typer.Option(
        True, "--pairwise/--no-pairwise", help="also ask every pair of answers in both orders (position bias)"
    ),
    self_name: list[str] = typer.Option(
        [],
        "--self",
        help="system NAME that uses the judge's own model (repeatable; default: read from the run folders' model spec)",
    ),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """LLM-as-judge of record answers: blind (all systems' answers, anonymised, shuffled) vs named, self-preference, position bias."""
    from clinqa.records.judge import Judge
    from clinqa.records.judge_report import judge_report
    from clinqa.records.questions import read_questions

    systems = {}
    for item in run:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ClinqaError(f"--run {item!r}: use NAME=RUN_FOLDER")
        if not (Path(folder) / "run.json").is_file():
            raise ClinqaError(f"--run {item!r}: {folder} is not a run folder (no run.json)")
        systems[name] = folder
    unknown = [n for n in self_name if n not in systems]
    if unknown:
        raise ClinqaError(f"--self {unknown[0]!r} is not one of the --run names ({', '.join(systems)})")
    questions = read_questions(qa)
    judge_model = Judge(load_predictor(judge), reading=reading)
    with progress_bar(f"judge · {len(systems)} systems · blind, named{', pairwise' if pairwise else ''}") as update:
        rep = judge_report(judge_model, questions, systems, seed=seed, pairwise=pairwise,
                           self_names=self_name or None, out=out, progress=update)  # fmt: skip
    fmt = lambda v, d=2: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    table = Table("system", "self", "n", "blind", "named", "named − blind [95% CI]", "p (Wilcoxon)", "κ vs EM (blind)",
                  "unparseable b/n", title="judge grades 0-4 (expected grade), per system")  # fmt: skip
    for name, r in rep["systems"].items():
        d = r["named_minus_blind"]
        table.add_row(safe(name), "yes" if r["self"] else "", str(d["n"]), fmt(r["blind"]["mean_expected"]), fmt(r["named"]["mean_expected"]),
                      f"{fmt(d['mean'], 3)} [{fmt(d['ci_low'], 3)}, {fmt(d['ci_high'], 3)}]", fmt(d["p_wilcoxon"], 3),
                      fmt(r["kappa_blind"]["kappa"]), f"{r['blind']['unparseable']}/{r['named']['unparseable']}")  # fmt: skip
    console.print(table)
    sp = rep["self_preference"]
    if sp:
        i, e = sp["named_inflation"], sp["blind_excess_over_exact_match"]
        console.print(f"self-preference ({', '.join(sp['systems'])} use the judge's model): named inflation vs the others "
                      f"{fmt(i['mean'], 3)} [{fmt(i['ci_low'], 3)}, {fmt(i['ci_high'], 3)}] p={fmt(i['p_wilcoxon'], 3)} (n={i['n']}); "
                      f"blind correct minus exact match vs the others {fmt(e['mean'], 3)} [{fmt(e['ci_low'], 3)}, {fmt(e['ci_high'], 3)}] (n={e['n']})")  # fmt: skip
    else:
        console.print(
            "self-preference: no judged system uses the judge's model (or all do); pass --self NAME to name one"
        )
    pb = rep.get("position_bias")
    if pb:
        console.print(f"position bias: {pb['follows_position']} of {pb['pairs']} pairs asked in both orders follow the position "
                      f"({fmt(pb['rate'] and 100 * pb['rate'], 1)}% [{fmt(pb['ci_low'] and 100 * pb['ci_low'], 1)}, "
                      f"{fmt(pb['ci_high'] and 100 * pb['ci_high'], 1)}]); A chosen {pb['first_wins']} of {pb['verdicts']} "
                      f"(p vs 1/2 {fmt(pb['p_first_vs_half'], 3)}); unparseable verdicts {pb['unparseable']}")  # fmt: skip
    kb, kn = rep["kappa_blind"], rep["kappa_named"]
    console.print(
        f"κ with exact match (judge correct = grade >= 3): blind {fmt(kb['kappa'])}, named {fmt(kn['kappa'])} (n={kb['n']})"
    )
    if out:
        console.print(f"grades in [bold]{safe(out)}[/bold] (report.json, judged.jsonl)")


def _records_and_questions(qa: Path, records: str, limit: int | None = None):
    from clinqa.records.fhir import load_records
    from clinqa.records.questions import read_questions

    questions = read_questions(qa)
    return load_records(records), questions[:limit] if limit else questions
