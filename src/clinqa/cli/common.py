"""What every command shares: consoles, progress, model loading, the summary table, option types and checks."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from clinqa.errors import ClinqaError
from clinqa.textsafe import plain, safe


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's wrapping; a file or pipe gets whole lines (no wrap at 80 columns), so
    what a script greps for never depends on the terminal's width or the length of a path."""
    c = Console(stderr=stderr)
    if c.is_terminal:
        return c
    return Console(stderr=stderr, soft_wrap=True, width=max(c.width, 240))


console = _console()
err = _console(stderr=True)


PROGRESS_EVERY_ENV = "CLINQA_PROGRESS_EVERY"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


class _ProgressLines:
    """callback(done, total, extra) that prints a plain line at most every `every` seconds, and one at
    the end: what a job logged to a file (nohup, a batch scheduler, a study step) shows instead of a
    live bar. The time left comes from the pace since the first call, so a resumed job's skipped part
    does not count; a count that goes down (the next adapter, the next pass) starts a new pace."""

    def __init__(self, description: str, every: float) -> None:
        self.description, self.every, self._now = description, every, time.monotonic
        self.t0 = self.last_print = self._now()
        self.first: int | None = None  # `done` at the first call of this phase (a job may count anew)
        self.phase_t0 = self.t0
        self.state: tuple[int, int, str] | None = None

    def __call__(self, done: int, total: int, extra: str = "") -> None:
        now = self._now()
        if self.first is None or (self.state and done < self.state[0]):  # the start, or a new phase's
            self.first, self.phase_t0 = done, now
        self.state = (done, total, extra)
        if now - self.last_print >= self.every:
            self._print(now)

    def finish(self) -> None:
        if self.state is not None:
            self._print(self._now())

    def _print(self, now: float) -> None:
        done, total, extra = self.state  # type: ignore[misc]
        self.last_print = now
        rate = (done - (self.first or 0)) / (now - self.phase_t0) if now > self.phase_t0 else 0.0
        left = f", about {_clock((total - done) / rate)} left" if rate > 0 and total and done < total else ""
        of = f"/{total} ({100 * done / total:.0f}%)" if total else ""
        line = f"{self.description}: {done}{of}{' ' + extra if extra else ''}, {_clock(now - self.t0)} elapsed{left}"
        err.print(plain(line), markup=False, highlight=False)


@contextmanager
def progress_bar(description: str) -> Iterator:
    """A rich progress bar; yields a callback(done, total) for long jobs. Where stderr is no terminal
    (a log file, a pipe) rich draws nothing until the end, so a line every $CLINQA_PROGRESS_EVERY
    seconds (default 60) tells the log how far the job is."""
    if not err.is_terminal:
        try:
            every = float(os.environ.get(PROGRESS_EVERY_ENV) or 60)
        except ValueError:
            raise ClinqaError(f"{PROGRESS_EVERY_ENV} must be a number of seconds") from None
        lines = _ProgressLines(safe(description), every)
        yield lines
        lines.finish()  # the end, as the bar's last frame would show it
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    ) as prog:
        task = prog.add_task(safe(description), total=None, extra="")

        def update(done: int, total: int, extra: str = "") -> None:
            prog.update(task, completed=done, total=total, extra=safe(extra))

        yield update


def _at_least(option: str, value: int | None, minimum: int = 1) -> None:
    """Refuse a number below `minimum` up front, as a one-line error (None: not given)."""
    if value is not None and value < minimum:
        raise ClinqaError(f"{option} must be at least {minimum}, got {value}")


def _writable_out(out: Path, folder: bool = True) -> None:
    from clinqa.runs import check_writable

    check_writable(out, folder=folder)


def _runtime_option(field: str):
    """Callback of --device/--dtype/--device-map: sets the process-wide runtime model loading reads
    (clinqa.models.runtime); the combination is checked before the first model loads."""

    def callback(value: Optional[str]) -> Optional[str]:
        from clinqa.models.runtime import update_runtime

        update_runtime(**{field: value})
        return value

    return callback


DeviceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--device",
        callback=_runtime_option("device"),
        show_default=False,
        help="auto | cpu | cuda | cuda:N | mps (env CLINQA_DEVICE; auto: CUDA, then MPS, then CPU)",
    ),
]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dtype",
        callback=_runtime_option("dtype"),
        show_default=False,
        help="auto | float32 | bfloat16 | float16 (env CLINQA_DTYPE; auto: bf16 on a GPU, fp32 on the CPU)",
    ),
]
DeviceMapOpt = Annotated[
    Optional[str],
    typer.Option(
        "--device-map",
        callback=_runtime_option("device_map"),
        show_default=False,
        help="auto: spread a model larger than one GPU over all GPUs (accelerate; env CLINQA_DEVICE_MAP)",
    ),
]


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def load_predictor(spec: str):
    """Resolve a model spec (base model plus any +modifiers) into a Predictor."""
    _quiet_transformers()
    from clinqa.adapt import load_predictor as _load

    with err.status(f"loading model {safe(spec)} ..."):
        return _load(spec)


def _pct(x) -> str:
    import math

    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def print_summary(summary: dict, title: str) -> None:
    """The console table: specialties with fewer than 5 questions fold into one "other specialties" row
    (report.md keeps every row), then one line per note, so no figure is split from its label."""
    from clinqa.evaluate.report import MIN_CONSOLE_QUESTIONS, OTHER_GROUP, rate_text

    console.print(plain(title), markup=False, highlight=False)  # a whole line: a table title wraps at the table's width
    table = Table()
    for col, just in (
        ("specialty", "left"),
        ("questions", "right"),
        ("n", "right"),
        ("accuracy %", "right"),
        ("95% CI", "right"),
        ("chance %", "right"),
    ):
        table.add_column(col, justify=just)

    def row(name: str, a: dict, bold: bool = False) -> None:
        b = "[bold]" if bold else ""
        table.add_row(
            f"{b}{safe(name)}",
            str(a.get("n_questions", "—")),
            str(a["n"]),
            f"{b}{_pct(a['acc'])}",
            f"{_pct(a['ci_low'])}–{_pct(a['ci_high'])}",
            _pct(a["chance"]),
        )

    other = summary.get("other_specialties")
    folded = set(other["groups"]) if other else set()
    for g, a in summary["by_specialty"].items():
        if g not in folded:
            row(g, a)
    if other:
        row(f"{OTHER_GROUP} ({len(folded)}, <{MIN_CONSOLE_QUESTIONS} questions each)", other)
    row("all", summary["overall"], bold=True)
    console.print(table)
    notes = [f"macro {_pct(summary['macro_specialty'])} · micro {_pct(summary['micro_specialty'])}"]
    if "shuffles" in summary:
        sh = summary["shuffles"]
        notes.append(
            f"{sh['k']} shuffles: per-shuffle accuracy {_pct(sh['min_acc'])}–{_pct(sh['max_acc'])}, consistency {_pct(sh['consistency'])}%"
        )
    rules = summary.get("calibration_by_rule") or {
        summary["calibration"].get("rule") or "prediction": summary["calibration"]
    }
    for name, c in rules.items():
        if not c["n"]:  # no probabilities (generated answers): no calibration to show
            continue
        acc = f"accuracy {_pct(c['accuracy'])}% · " if len(rules) > 1 else ""
        notes.append(
            f"{name} rule: {acc}ECE {c['ece']:.3f} · Brier {c['brier']:.3f} · mean confidence {_pct(c['mean_confidence'])}%"
        )
    notes.append(f"unparseable {summary['unparseable']}")
    if summary.get("truncated"):
        notes.append(f"truncated {summary['truncated']} (prompts cut to fit the context window)")
    if summary.get("unsafe_choice"):
        notes.append(f"unsafe-option choices {rate_text(summary['unsafe_choice'])}")
    if summary.get("false_reassurance"):
        notes.append(f"false reassurance {rate_text(summary['false_reassurance'])}")
    if summary.get("consistency"):
        c = summary["consistency"]
        notes.append(
            f"explanations consistent with the rationale {rate_text(c['consistent'])}, unparseable grades {c['n_unparseable']}"
        )
    for line in notes:
        console.print(plain(line), markup=False, highlight=False)


CHECKPOINTING_HELP = (
    "recompute activations in the backward pass: ~7x less peak memory for long examples, ~1.35x the time, same weights"
)
