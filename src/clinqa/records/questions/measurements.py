"""Questions about measurement series: lookup (a value on a date), latest, window (the values in the
last N months), trend (the last 3-5 values), count (measurements in a window; encounters in a year)
and average (over a window)."""

from __future__ import annotations

from clinqa.records.questions.facts import (
    Series,
    _dated,
    _months_ago,
    _period_words,
    _qty_text,
    trend_label,
)
from clinqa.records.questions.maker import QuestionMaker
from clinqa.records.render import format_number, rounded


def lookup(g: QuestionMaker) -> None:
    def make(item):
        s, m = item
        same_day = [p for p in s.points if p.day == m.day]
        if len(same_day) != 1:
            return False
        return g.ask("lookup", "lookup", {"name": s.name, "date": m.day.isoformat()}, answer=_qty_text(m),
                     value=m.value, relevant=[m.rid], unit=s.unit, measurement=s.name, tolerance=0.0)  # fmt: skip

    # one candidate per series (a random point), so questions spread over measurements
    g.take([(s, g.rng.choice(s.points)) for s in g.series.values()], make)


def latest(g: QuestionMaker) -> None:
    def make(s: Series):
        last = s.points[-1]
        if sum(1 for p in s.points if p.day == last.day) != 1:
            return False
        return g.ask("latest", "latest", {"name": s.name}, answer=f"{_qty_text(last)} (on {last.day.isoformat()})",
                     value=last.value, relevant=[last.rid], unit=s.unit, measurement=s.name, date=last.day.isoformat(),
                     tolerance=0.0)  # fmt: skip

    g.take(g.series.values(), make)


def window(g: QuestionMaker) -> None:
    def make(s: Series):
        found = g.pick_window(s)
        if not found:
            return False
        months, inside = found
        answer = "; ".join(f"{_qty_text(p)} on {p.day.isoformat()}" for p in inside)
        return g.ask("window", "window", {"name": s.name, "period": _period_words(months)}, answer=answer,
                     value=[p.value for p in inside], relevant=[p.rid for p in inside], unit=s.unit,
                     measurement=s.name, window_start=_months_ago(g.now, months).isoformat(), window_months=months,
                     tolerance=0.0)  # fmt: skip

    g.take(g.series.values(), make)


def trend(g: QuestionMaker) -> None:
    def make(s: Series):
        days = [p.day for p in s.points]
        if len(set(days)) != len(days) or len(s.points) < 3:
            return False
        for k in g.shuffled([k for k in (3, 4, 5) if k <= len(s.points)]):
            pts = s.points[-k:]
            found = trend_label([p.value for p in pts])
            if found is not None:
                label, rel = found
                break
        else:
            return False  # no clear trend over 3, 4 or 5 measurements
        steps = " -> ".join(f"{format_number(p.value)} ({p.day.isoformat()})" for p in pts)
        return g.ask("trend", "trend", {"name": s.name, "k": k}, answer=f"{label}: {steps} {s.unit}".strip(), value=label,
                     relevant=[p.rid for p in pts], unit=s.unit, measurement=s.name, relative_change=round(rel, 4))  # fmt: skip

    g.take(g.series.values(), make)


def count(g: QuestionMaker) -> None:
    def make_series(s: Series):
        found = g.pick_window(s)
        if not found:
            return False
        months, inside = found
        return g.ask("count_measurements", "count", {"name": s.name, "period": _period_words(months)},
                     answer=str(len(inside)), value=len(inside), relevant=[p.rid for p in inside], measurement=s.name,
                     window_start=_months_ago(g.now, months).isoformat(), window_months=months, tolerance=0)  # fmt: skip

    def make_year(year: int):
        encounters = [(k, d) for k, _, d in _dated(g.record, "Encounter", g.now) if d.year == year]
        if not encounters:
            return False
        return g.ask("count_encounters", "count", {"year": year}, answer=str(len(encounters)), value=len(encounters),
                     relevant=[k for k, _ in encounters], tolerance=0)  # fmt: skip

    years = sorted({d.year for _, _, d in _dated(g.record, "Encounter", g.now)})
    candidates = [("s", s) for s in g.series.values()] + [("y", y) for y in years[-3:]]
    g.take(candidates, lambda c: make_series(c[1]) if c[0] == "s" else make_year(c[1]))


def average(g: QuestionMaker) -> None:
    def make(s: Series):
        found = g.pick_window(s, min_count=2)
        if not found:
            return False
        months, inside = found
        mean = sum(p.value for p in inside) / len(inside)
        shown = rounded(round(mean, 2))
        return g.ask("average", "average", {"name": s.name, "period": _period_words(months)},
                     answer=f"{format_number(shown)} {s.unit} (mean of {len(inside)}: "
                            f"{', '.join(format_number(p.value) for p in inside)})".replace("  ", " "),
                     value=shown, relevant=[p.rid for p in inside], unit=s.unit, measurement=s.name,
                     window_start=_months_ago(g.now, months).isoformat(), window_months=months,
                     tolerance=max(0.01 * abs(mean), 0.01))  # fmt: skip

    g.take(g.series.values(), make)
