"""bench/tradeoff.py's statistics and tables: a row per run (accuracy, large share, latency against its bound),
the runs compared question by question, and both as rich tables and as Markdown.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from rich.table import Table

from glimp_cli.profile import Rates, bound_seconds
from glimp_cli.report import ModeRow, Paired, paired_comparison, recovered_gap, run_row

from tradeoff_runs import BenchRun

@dataclass(frozen=True)
class TradeoffRow:
    """One run over the questions every run finished."""

    run: BenchRun
    stats: ModeRow
    gap: float | None  # (acc - small) / (large - small)
    bound: float | None  # the profile bound for its work / that for large alone's, same questions
    vs_bound: float | None  # (latency / large alone's) / bound
    timed_with_large: bool = True  # each record timed under the same profile as large alone's record


@dataclass(frozen=True)
class Comparison:
    """Run `a` against run `b`, question by question."""

    a: TradeoffRow
    b: TradeoffRow
    paired: Paired



def tradeoff_rows(runs: list[BenchRun], records: dict[str, list[dict]],
                  rates_for: Callable[[str, str], Rates | None]) -> list[TradeoffRow]:
    """A row per run with records; `records` must already hold the same questions for every run.

    `rates_for(run label, question id)` gives the profile rates a record is bounded with (None: no bound).
    Both bounds of a row are taken at the rates of the run's own records, so the machine's speed cancels
    out of their ratio. A run whose records were not timed under the same profiles as large alone's (a
    run added in a later session: most of its records under other profiles) gets no latency: wall times
    of different sessions are not a ratio.
    """
    large = next((records[r.label] for r in runs if r.family == "large"), [])
    stats = {r.label: run_row(records[r.label], large) for r in runs if records[r.label]}
    small_acc = next((stats[r.label].accuracy for r in runs if r.family == "small" and r.label in stats), None)
    large_acc = next((stats[r.label].accuracy for r in runs if r.family == "large" and r.label in stats), None)
    large_run = next((r for r in runs if r.family == "large" and r.label in stats), None)
    large_by_id = {r["id"]: r for r in records[large_run.label]} if large_run else {}
    rows = []
    for run in runs:
        if run.label not in stats:
            continue
        s = stats[run.label]
        rates = [rates_for(run.label, r["id"]) for r in records[run.label]]
        # Question-major runs of one session share large alone's profile on all but the questions a
        # resume split (2 of 100 here); a run added in a later session shares it on none.
        shared = sum(rate is rates_for(large_run.label, r["id"]) for r, rate in zip(records[run.label], rates)) \
            if large_run is not None else 0
        together = large_run is not None and shared > len(rates) / 2
        bound = None
        if large_run is not None and rates and all(rate is not None for rate in rates):
            ideal = sum(bound_seconds(r, rate) for r, rate in zip(records[run.label], rates))
            large_ideal = sum(bound_seconds(large_by_id[r["id"]], rate) for r, rate in zip(records[run.label], rates))
            bound = ideal / large_ideal if large_ideal else None
        if not together:
            s = dataclasses.replace(s, latency_vs_large=None)
        vs_bound = s.latency_vs_large / bound if bound and s.latency_vs_large is not None else None
        rows.append(TradeoffRow(run, s, recovered_gap(s.accuracy, small_acc, large_acc), bound, vs_bound, together))
    return rows


def comparisons(rows: list[TradeoffRow], records: dict[str, list[dict]]) -> list[Comparison]:
    """Each glimp run against random at its share and the step signals at its target; adaptive likewise."""
    by = {(row.run.family, row.run.target, row.run.variant): row for row in rows}
    out = []
    for row in rows:
        if row.run.family == "glimp":
            rivals = [next((r for r in rows if r.run.matched == row.run.label), None),
                      by.get(("step_entropy", row.run.target, None)), by.get(("step_perplexity", row.run.target, None))]
            if row.run.variant is not None:
                # A variant against plain glimp at the same calibration share, plain glimp and random nearest
                # to it in large tokens.
                def nearest(family: str) -> TradeoffRow | None:
                    plain = [r for r in rows if r.run.family == family and r.run.variant is None]
                    return min(plain, key=lambda r: abs(r.stats.large_share_tokens - row.stats.large_share_tokens),
                               default=None)
                rivals = [r for r in (rivals[0], by.get(("glimp", row.run.target, None)), nearest("glimp"),
                                      nearest("random")) if r is not None]
                rivals = list({id(r): r for r in rivals}.values())
        elif row.run.family == "adaptive":
            rivals = [by.get(("glimp", row.run.target, None)), next(
                (r for r in rows if r.run.family == "random" and r.run.target == row.run.target
                 and r.run.variant is None), None)]
        else:
            continue
        out += [Comparison(row, rival, paired_comparison(records[row.run.label], records[rival.run.label]))
                for rival in rivals if rival is not None]
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def _threshold(run: BenchRun) -> str:
    t = run.threshold
    if t is None:
        return "-"
    name = {"glimp": "tau", "adaptive": "tau0", "step_entropy": "H>", "step_perplexity": "ppl>"}[run.family]
    if run.pair.tau_after_large is not None and run.family == "glimp":
        return f"{name} {t:.4g}, {run.pair.tau_after_large:.4g} after large"
    return f"{name} {t:.4g}"


ROW_COLUMNS = ("run", "threshold", "picked for", "accuracy (95% CI)", "large share steps / tokens", "vs large",
               "recovered gap", "bound vs large", "measured / bound")
PAIR_COLUMNS = ("run A", "run B", "large tokens A / B", "A right only", "B right only", "both same", "McNemar p")


def row_cells(row: TradeoffRow) -> list[str]:
    s = row.stats
    accuracy = "-" if s.accuracy is None else f"{s.accuracy:.1%} ({s.ci_low:.1%}–{s.ci_high:.1%})"
    picked = "-" if row.run.target is None or row.run.family in ("small", "large") else f"{row.run.target:.0%}"
    if row.run.family == "random":
        picked = "glimp's reached"
    if row.run.variant is not None:
        picked += " (own taus)"
    return [row.run.label, _threshold(row.run), picked, accuracy,
            f"{_pct(s.large_share_steps)} / {_pct(s.large_share_tokens)}", _num(s.latency_vs_large, suffix="×"),
            _num(row.gap), _num(row.bound, suffix="×"), _num(row.vs_bound)]


def pair_cells(c: Comparison) -> list[str]:
    return [c.a.run.label, c.b.run.label,
            f"{_pct(c.a.stats.large_share_tokens)} / {_pct(c.b.stats.large_share_tokens)}",
            str(c.paired.wins), str(c.paired.losses), str(c.paired.ties), f"{c.paired.p:.3g}"]


def render_tables(rows: list[TradeoffRow], pairs: list[Comparison], n: int) -> list[Table]:
    main = Table(title=f"accuracy for large-model tokens, {n} questions finished by every run", title_justify="left",
                 show_edge=False, caption="vs large: latency / large alone's, ratio of sums (- : not timed in the "
                 "same session as large alone) · recovered gap: "
                 "(acc - small) / (large - small) · bound vs large: the glimp profile bound for the run's own "
                 "decode, prefill and probe work / that for large alone's · measured / bound: vs large / bound",
                 caption_justify="left")
    for name in ROW_COLUMNS:
        main.add_column(name, justify="left" if name == "run" else "right")
    for row in rows:
        main.add_row(*row_cells(row))
    paired = Table(title="paired on the same questions (exact McNemar on the discordant ones)",
                   title_justify="left", show_edge=False)
    for name in PAIR_COLUMNS:
        paired.add_column(name, justify="left" if name.startswith("run") else "right")
    for c in pairs:
        paired.add_row(*pair_cells(c))
    return [main, paired]


def markdown(rows: list[TradeoffRow], pairs: list[Comparison], n: int, note: str) -> str:
    """Both tables as Markdown, for the README."""
    def table(columns, lines) -> list[str]:
        return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
            "| " + " | ".join(cells) + " |" for cells in lines]

    untimed = [r.run.label for r in rows if not r.timed_with_large]
    if untimed:
        note += (f" {', '.join(untimed)}: run in a later session than large alone, so no latency ratio (-); "
                 "its bound is at its own rates for both.")
    return "\n".join([f"{n} questions finished by every run. {note}", ""]
                     + table(ROW_COLUMNS, [row_cells(r) for r in rows]) + [""]
                     + table(PAIR_COLUMNS, [pair_cells(c) for c in pairs])) + "\n"
