"""Pictures of a calibration: the H_init histogram and the frontier, in the terminal (rich) and as a PNG."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from glimp_cli.calibrate.frontier import FrontierRow
from glimp_cli.calibrate.shares import TauShare, tau_text
from glimp_cli.calibrate.traces import Distribution
from glimp_cli.errors import InputError, MissingExtraError
from glimp_cli.policies import LARGE, SMALL

COLOURS = {SMALL: "cyan", LARGE: "magenta"}


@dataclass(frozen=True)
class Bin:
    """Steps with low <= H_init < high (the last bin includes its high edge), split by the side of tau."""

    low: float
    high: float
    small: int
    large: int


def nice_width(span: float, bins: int) -> float:
    """A bin width of 1, 2, 2.5 or 5 times a power of ten, at least span / bins."""
    raw = max(span, 1e-9) / bins
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))


def histogram(values: Sequence[float], tau: float, bins: int = 16) -> list[Bin]:
    """Counts per bin of a nice width, at most about `bins` of them, from the smallest value to the largest."""
    if not values:
        return []
    low, high = min(values), max(values)
    width = nice_width(high - low, bins)
    start = math.floor(low / width + 1e-9) * width
    count = max(1, math.ceil((high - start) / width - 1e-9))
    if start + count * width <= high:
        count += 1  # the largest value sits exactly on an edge: give it a bin
    out = [[0, 0] for _ in range(count)]
    for v in values:
        index = min(int((v - start) / width), count - 1)
        out[index][v > tau] += 1
    return [Bin(round(start + i * width, 10), round(start + (i + 1) * width, 10), s, l)
            for i, (s, l) in enumerate(out)]


def describe_distribution(dist: Distribution) -> str:
    v = dist.values
    q1, median, q3 = statistics.quantiles(v, n=4) if len(v) > 1 else (v[0], v[0], v[0])
    return (f"H_init of {dist.n} steps in {dist.n_traces} traces ({dist.mode} mode) from {dist.source}\n"
            f"  min {v[0]:.2f} · quartiles {q1:.2f} / {median:.2f} / {q3:.2f} · max {v[-1]:.2f} · "
            f"mean {statistics.fmean(v):.2f} nats")


def render_histogram(dist: Distribution, at: TauShare, width: int = 44) -> Group:
    """Bars of H_init per bin, cyan where the small model keeps the step, magenta where the large takes it."""
    bins = histogram(dist.values, at.tau)
    top = max(b.small + b.large for b in bins)
    lines: list[Text] = []
    marker = Text(f"{'':>11} ┄┄ tau {tau_text(at.tau)} ┄┄ ↑ small {1 - at.share:.1%} ({at.n - at.above}) "
                  f"· ↓ large {at.share:.1%} ({at.above})", style="bold")
    if at.tau < bins[0].low:
        lines.append(marker)
    for b in bins:
        small = round(b.small / top * width)
        large = round(b.large / top * width)
        if b.small and not small:
            small = 1
        if b.large and not large:
            large = 1
        line = Text(f"{b.low:5.2f}–{b.high:5.2f} │ ")
        line.append("█" * small, style=COLOURS[SMALL])
        line.append("█" * large, style=COLOURS[LARGE])
        line.append(f" {b.small + b.large}" if b.small + b.large else "")
        lines.append(line)
        if b.low <= at.tau < b.high or (b is bins[-1] and at.tau >= b.high):
            lines.append(marker)
    return Group(*lines)


def describe_choice(at: TauShare) -> str:
    """What a tau means on these steps, in words, with its intervals."""
    low, high = at.ci
    lines = []
    if at.target is not None:
        lines.append(f"tau {tau_text(at.tau)} for a large share of {at.target:.0%}: "
                     f"{at.above} of {at.n} recorded steps ({at.share:.1%}) are above it")
    else:
        lines.append(f"tau {tau_text(at.tau)}: {at.above} of {at.n} recorded steps ({at.share:.1%}) are above it")
    lines.append(f"  large share at this tau: {low:.1%}–{high:.1%} at 95% (Wilson; steps taken as independent)")
    if at.tau_ci is not None:
        lines.append(f"  the tau that truly gives {at.target:.0%}: {tau_text(at.tau_ci[0])}–{tau_text(at.tau_ci[1])} "
                     "at about 95% (order statistics)")
    return "\n".join(lines)


def render_frontier(rows: list[FrontierRow], chosen: FrontierRow | None = None) -> Table:
    """The sweep as a table: one row per run."""
    table = Table(title="calibration sweep: accuracy / latency frontier", title_justify="left", show_edge=False,
                  caption="picked for: share of the recorded steps above tau · routed large: share of the run's probed "
                          "steps that the large model wrote · large share: of all steps, the answer included",
                  caption_justify="left")
    for name in ("run", "tau", "picked for", "routed large", "n", "accuracy (95% CI)", "mean s", "vs large",
                 "large share", ""):
        table.add_column(name, justify="left" if name in ("run", "") else "right")
    for row in rows:
        s = row.stats
        accuracy = "-" if s.accuracy is None else f"{s.accuracy:.1%} ({s.ci_low:.1%}–{s.ci_high:.1%})"
        ratio = "-" if s.latency_vs_large is None else f"{s.latency_vs_large:.2f}×"
        share = "-" if s.large_share_steps is None else f"{s.large_share_steps:.1%}"
        routed = "-" if row.routed_large is None else f"{row.routed_large:.1%}"
        picked = "-" if row.run.share is None or row.run.mode in (SMALL, LARGE) else f"{row.run.share:.0%}"
        flags = ("frontier" if row.pareto else "") + ("  ← chosen" if row is chosen else "")
        table.add_row(Text(row.run.label, style=_row_style(row.run.mode)),
                      "-" if row.run.tau is None else tau_text(row.run.tau), picked, routed, str(s.n), accuracy,
                      f"{s.mean_latency:.2f}", ratio, share, flags)
    return table


def _row_style(mode: str) -> str:
    return {SMALL: COLOURS[SMALL], LARGE: COLOURS[LARGE], "adaptive": "yellow"}.get(mode, "")


def write_plot(path: str | Path, dist: Distribution, at: TauShare, rows: list[FrontierRow] | None = None,
               chosen: FrontierRow | None = None, title: str = "") -> Path:
    """A PNG: the H_init histogram with tau marked, and the accuracy-latency frontier after a sweep."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError("--plot needs matplotlib: pip install 'glimp[plot]'") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
    panels = 2 if rows else 1
    fig = Figure(figsize=(6.4 * panels, 4.8), dpi=120, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _plot_histogram(axes[0], dist, at)
    if rows:
        _plot_frontier(axes[1], rows, chosen)
    if title:
        fig.suptitle(title)
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _plot_histogram(ax, dist: Distribution, at: TauShare) -> None:
    bins = histogram(dist.values, at.tau, bins=24)
    edges = [b.low for b in bins]
    widths = [b.high - b.low for b in bins]
    ax.bar(edges, [b.small for b in bins], width=widths, align="edge", color="#17becf", edgecolor="white",
           label=f"small keeps: {1 - at.share:.1%} ({at.n - at.above} steps)")
    ax.bar(edges, [b.large for b in bins], width=widths, align="edge", bottom=[b.small for b in bins],
           color="#c2185b", edgecolor="white", label=f"large takes: {at.share:.1%} ({at.above} steps)")
    if math.isfinite(at.tau):
        ax.axvline(at.tau, color="black", linestyle="--", linewidth=1.5)
        ax.text(at.tau, 0.97, f" tau = {at.tau:.4g} ", transform=ax.get_xaxis_transform(), rotation=90,
                ha="right", va="top", fontsize=10, fontweight="bold",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    if at.tau_ci is not None and all(math.isfinite(t) for t in at.tau_ci):
        ax.axvspan(*at.tau_ci, color="grey", alpha=0.15, label="95% interval of tau")
    ax.set_xlabel("H_init (nats): entropy of the small model's first token of a step")
    ax.set_ylabel("steps")
    ax.set_title(f"H_init of {dist.n} steps, {dist.n_traces} traces ({dist.mode} mode)")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3, fontsize=8, frameon=False)


def _plot_frontier(ax, rows: list[FrontierRow], chosen: FrontierRow | None) -> None:
    graded = [r for r in rows if r.stats.accuracy is not None and r.stats.latency_vs_large is not None]
    if not graded:
        ax.text(0.5, 0.5, "no graded questions: no accuracy to plot", ha="center", va="center")
        ax.set_axis_off()
        return
    styles = {"glimp": ("o", "#1f77b4", "glimp (fixed tau)"), "adaptive": ("^", "#ff7f0e", "adaptive"),
              SMALL: ("s", "#17becf", "small alone"), LARGE: ("D", "#c2185b", "large alone")}
    for mode, (marker, colour, label) in styles.items():
        mine = sorted((r for r in graded if r.run.mode == mode), key=lambda r: r.stats.latency_vs_large)
        if not mine:
            continue
        x = [r.stats.latency_vs_large for r in mine]
        y = [100 * r.stats.accuracy for r in mine]
        err = [[100 * (r.stats.accuracy - r.stats.ci_low) for r in mine],
               [100 * (r.stats.ci_high - r.stats.accuracy) for r in mine]]
        ax.errorbar(x, y, yerr=err, fmt=marker + ("-" if len(mine) > 1 else ""), color=colour, capsize=3,
                    label=label, alpha=0.9)
        for i, (r, xi, yi) in enumerate(zip(mine, x, y)):
            stagger = 11 * (i % 2)  # neighbours' labels on alternate lines
            if r.run.mode == "glimp":
                ax.annotate(f"tau {r.run.tau:.3g}", (xi, yi), xytext=(4, 5 + stagger), textcoords="offset points",
                            fontsize=8, color=colour)
            elif r.run.mode == "adaptive":
                ax.annotate(f"share {r.run.share:.0%}", (xi, yi), xytext=(4, -12 - stagger),
                            textcoords="offset points", fontsize=8, color=colour)
    if chosen is not None and chosen in graded:
        ax.scatter([chosen.stats.latency_vs_large], [100 * chosen.stats.accuracy], s=260, facecolors="none",
                   edgecolors="black", linewidths=1.5, label="chosen", zorder=5)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("mean latency relative to large alone")
    ax.set_ylabel("accuracy (%) with 95% interval")
    ax.set_ylim(bottom=min(-2.0, ax.get_ylim()[0]))
    ax.set_title(f"accuracy vs latency on {max(r.stats.n for r in graded)} questions")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=5, fontsize=8, frameon=False)
