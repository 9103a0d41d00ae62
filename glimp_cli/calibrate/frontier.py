"""Choosing from a sweep: each run's accuracy and latency over the same questions, the frontier, the objectives."""

from __future__ import annotations

from dataclasses import dataclass, replace

from glimp_cli.calibrate.sweep import Run
from glimp_cli.errors import UsageError
from glimp_cli.policies import LARGE
from glimp_cli.questions import Question
from glimp_cli.report import ModeRow, load_results, summarize

OBJECTIVES = ("fastest-within-drop", "most-accurate-under-latency")


@dataclass(frozen=True)
class FrontierRow:
    """A run's summary over the calibration questions, and whether no other run beats it on both axes."""

    run: Run
    stats: ModeRow
    pareto: bool = False
    # Of the steps that were probed, the share the large model wrote: what a tau's "picked for" share
    # predicts (the report's large share also counts the unprobed answer step).
    routed_large: float | None = None


def frontier(runs: list[Run], questions: list[Question]) -> list[FrontierRow]:
    """One row per run (in run order), latency relative to the large-alone run on the same questions."""
    ids = {q.id for q in questions}
    records = {run: [r for r in load_results(run.path)[0] if r["id"] in ids and r["mode"] == run.mode]
               for run in runs if run.path.exists()}
    large = next((recs for run, recs in records.items() if run.mode == LARGE), [])
    rows = []
    for run, recs in records.items():
        if not recs:
            continue
        summary = summarize(recs + ([] if run.mode == LARGE else large))
        probed = [s["model"] for r in recs for s in r["steps"] if s.get("h_init") is not None]
        routed = probed.count(LARGE) / len(probed) if probed else None
        rows.append(FrontierRow(run, next(s for s in summary if s.mode == run.mode), routed_large=routed))
    return [replace(row, pareto=not any(_dominates(other.stats, row.stats) for other in rows)) for row in rows]


def _dominates(a: ModeRow, b: ModeRow) -> bool:
    if a.accuracy is None or b.accuracy is None:
        return False
    return (a.accuracy >= b.accuracy and a.mean_latency <= b.mean_latency
            and (a.accuracy > b.accuracy or a.mean_latency < b.mean_latency))


@dataclass(frozen=True)
class Pick:
    """What an objective chose from the frontier (a glimp row, or None), and why."""

    row: FrontierRow | None
    reason: str
    note: str | None = None  # e.g. an adaptive run would have met the objective better


def pick_tau(rows: list[FrontierRow], objective: str, max_drop: float = 1.0,
             max_latency_ratio: float = 0.8) -> Pick:
    """Choose a fixed tau (a glimp row) by `objective`; adaptive rows are compared in a note only.

    fastest-within-drop: the lowest mean latency among rows whose accuracy is at least large-alone's
    minus `max_drop` points. most-accurate-under-latency: the highest accuracy among rows whose mean
    latency is at most `max_latency_ratio` times large-alone's (ties: the faster).
    """
    large = next((r for r in rows if r.run.mode == LARGE), None)
    if large is None:
        raise UsageError("the objective compares against large alone, and the sweep has no large-alone run")
    if objective == "fastest-within-drop":
        if large.stats.accuracy is None:
            raise UsageError("the calibration questions have no reference answers: an accuracy objective needs them")
        floor = large.stats.accuracy - max_drop / 100

        def fits(r: FrontierRow) -> bool:
            return r.stats.accuracy is not None and r.stats.accuracy >= floor - 1e-12

        def key(r: FrontierRow):
            return (r.stats.mean_latency, -r.stats.accuracy)

        goal = f"accuracy within {max_drop:g} points of large alone ({large.stats.accuracy:.1%})"
    elif objective == "most-accurate-under-latency":
        def fits(r: FrontierRow) -> bool:
            return (r.stats.latency_vs_large is not None and r.stats.latency_vs_large <= max_latency_ratio
                    and r.stats.accuracy is not None)

        def key(r: FrontierRow):
            return (-r.stats.accuracy, r.stats.mean_latency)

        goal = f"mean latency at most {max_latency_ratio:g}× large alone"
    else:
        raise UsageError(f"--objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    fixed = sorted((r for r in rows if r.run.mode == "glimp" and fits(r)), key=key)
    adaptive = sorted((r for r in rows if r.run.mode == "adaptive" and fits(r)), key=key)
    note = None
    if adaptive and (not fixed or key(adaptive[0]) < key(fixed[0])):
        note = (f"{adaptive[0].run.label} meets it better ({_row_brief(adaptive[0])}), but it is a policy, "
                "not a tau, so it cannot be written to models.yaml")
    if not fixed:
        return Pick(None, f"no tau of the sweep keeps {goal}", note)
    return Pick(fixed[0], f"the {'fastest' if objective == OBJECTIVES[0] else 'most accurate'} tau with {goal}: "
                          f"{_row_brief(fixed[0])}", note)


def _row_brief(row: FrontierRow) -> str:
    s = row.stats
    acc = "-" if s.accuracy is None else f"{s.accuracy:.1%}"
    ratio = "-" if s.latency_vs_large is None else f"{s.latency_vs_large:.2f}×"
    return f"accuracy {acc}, {s.mean_latency:.2f} s mean, {ratio} large alone"
