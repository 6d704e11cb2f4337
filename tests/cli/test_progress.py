"""Progress where stderr is no terminal: plain lines a log file keeps (a rich bar draws nothing there)."""

import pytest

from clinqa.cli.common import _ProgressLines, progress_bar
from clinqa.errors import ClinqaError


def test_a_line_every_interval_and_one_at_the_end(monkeypatch, capsys):
    monkeypatch.setenv("CLINQA_PROGRESS_EVERY", "0")
    with progress_bar("records · bm25") as update:
        update(2, 10)
        update(5, 10, "acc 0.50")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3  # one per call at a zero interval, and the last state once more
    assert lines[0].startswith("records · bm25: 2/10 (20%), 0:00:00 elapsed")
    assert lines[1].startswith("records · bm25: 5/10 (50%) acc 0.50, ") and "left" in lines[1]
    assert lines[2].startswith("records · bm25: 5/10 (50%) acc 0.50, ")


def test_a_long_interval_prints_only_the_end(monkeypatch, capsys):
    monkeypatch.setenv("CLINQA_PROGRESS_EVERY", "3600")
    with progress_bar("eval") as update:
        for i in range(1, 6):
            update(i, 5)
    assert capsys.readouterr().err.splitlines() == ["eval: 5/5 (100%), 0:00:00 elapsed"]
    with progress_bar("nothing") as update:
        pass
    assert capsys.readouterr().err == ""  # a job that never reported prints nothing


def test_time_left_from_the_pace_since_the_first_call(capsys):
    clock = iter([0.0, 30.0, 100.0, 100.0, 200.0])
    lines = _ProgressLines("records finetune", every=60)
    lines._now, lines.t0, lines.last_print = (lambda: next(clock)), 0.0, 0.0
    lines(10, 100, "stage1")  # t = 0: a resumed job starts at 10 of 100
    lines(20, 100, "stage1")  # t = 30: under the interval, no line
    lines(40, 100, "stage1")  # t = 100: 30 steps in 100 s, 60 left at that pace: 200 s
    lines(0, 50, "stage2")  # t = 100: the next adapter counts from 0, a new pace
    lines(25, 50, "stage2")  # t = 200: 25 steps in 100 s, 25 left: 100 s
    assert capsys.readouterr().err.splitlines() == [
        "records finetune: 40/100 (40%) stage1, 0:01:40 elapsed, about 0:03:20 left",
        "records finetune: 25/50 (50%) stage2, 0:03:20 elapsed, about 0:01:40 left",
    ]


def test_a_bad_interval_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("CLINQA_PROGRESS_EVERY", "often")
    with pytest.raises(ClinqaError, match="CLINQA_PROGRESS_EVERY must be a number"):
        with progress_bar("x"):
            pass
