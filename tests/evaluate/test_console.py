"""Console output of `clinqa report` piped to a file: no line is split, whatever COLUMNS or the path length,
and small specialties fold into one "other specialties" row (report.md keeps them all)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import clinqa
from clinqa.evaluate import EvalConfig, Run
from clinqa.evaluate.sample import Sample


def option_sample(qid: str, spec: str, right: bool) -> Sample:
    probs = {"A": 0.7, "B": 0.3} if right else {"A": 0.3, "B": 0.7}
    pred = "A" if right else "B"
    return Sample(
        question_id=qid,
        permutation=[0, 1],
        options={"A": "yes", "B": "no"},
        gold="A",
        pred=pred,
        correct=right,
        method="option",
        scores={k: v for k, v in probs.items()},
        probs=probs,
        specialties=[spec],
        extras={"pred_sum": "A", "correct_sum": True, "probs_sum": {"A": 0.6, "B": 0.4}, "harmful_options": ["B"]},
    )


def test_piped_report_lines_are_whole_with_40_columns_and_a_long_path(tmp_path):
    out = tmp_path.joinpath(*(["a-rather-long-folder-name-to-exceed-the-width"] * 4), "run")
    run = Run.open(out, EvalConfig(model="m", data="d", method="option"))
    samples = [option_sample(f"c{i}", "cardiology", i % 3 != 0) for i in range(6)]
    samples += [
        option_sample("r0", "rare_specialty", False),
        option_sample("o0", "odd_specialty", True),
        option_sample("o1", "odd_specialty", True),
    ]
    run.append(samples)
    env = {**os.environ, "COLUMNS": "40", "PYTHONPATH": str(Path(clinqa.__file__).parents[1])}
    r = subprocess.run(
        [sys.executable, "-m", "clinqa.cli", "report", str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # the calibration line of each rule holds its label and every number
    cal = [line for line in lines if "Brier" in line]
    assert len(cal) == 2, r.stdout
    assert all(re.search(r"ECE \d\.\d{3} · Brier \d\.\d{3} · mean confidence \d+\.\d%", line) for line in cal), r.stdout
    assert any(line.startswith("length-normalised rule:") for line in cal)
    assert any(f"wrote {out / 'report.md'}" in line for line in lines), r.stdout
    assert lines[0] == str(out)  # the title: the run folder, on one line
    unsafe = [line for line in lines if line.startswith("unsafe-option choices")]
    assert len(unsafe) == 1 and "(3/9, 95% CI" in unsafe[0] and "9 questions)" in unsafe[0]
    # console: the two small specialties are one row; report.md keeps both
    assert "rare_specialty" not in r.stdout and "odd_specialty" not in r.stdout
    other = [line for line in lines if "other specialties" in line]
    assert len(other) == 1, r.stdout
    cells = [c.strip() for c in re.split(r"[│|]", other[0]) if c.strip()]
    assert cells[1:4] == ["3", "3", "66.7"], cells  # 3 questions, 3 samples, 2 of 3 right
    md = (out / "report.md").read_text()
    assert "| rare_specialty | 1 | 1 | 0.0 | 0.0–79.3 |" in md and "| odd_specialty | 2 |" in md
