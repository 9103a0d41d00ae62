"""bench/tradeoff.py's picture: accuracy against the large model's share of tokens, one line per policy family."""

from __future__ import annotations

from pathlib import Path

from glimp_cli.errors import InputError, UsageError

from tradeoff_tables import TradeoffRow

STYLES = {"glimp": ("o", "#1f77b4", "glimp (H_init)"), "random": ("x", "#7f7f7f", "random at glimp's share"),
          "step_entropy": ("v", "#2ca02c", "step_entropy"), "step_perplexity": ("^", "#9467bd", "step_perplexity"),
          "adaptive": ("*", "#ff7f0e", "adaptive"), "small": ("s", "#17becf", "small alone"),
          "large": ("D", "#c2185b", "large alone"),
          "glimp_skip": ("P", "#d62728", "glimp, H_init past a list marker"),
          "glimp_content": ("*", "#9467bd", "glimp, H_init at the first token of content"),
          "random_content": ("x", "#9467bd", "random at glimp content's share"),
          "glimp_writer": ("X", "#8c564b", "glimp, tau by previous writer")}
# Families at about the same share are drawn a little apart, so their interval bars do not hide each other.
DODGE = {"glimp": -0.009, "random": -0.003, "step_entropy": 0.003, "step_perplexity": 0.009,
         "glimp_skip": -0.006, "glimp_writer": 0.006, "glimp_content": 0.0,
         "random_content": 0.0}


def write_plot(path: Path, rows: list[TradeoffRow], title: str) -> Path:
    """Accuracy against the large model's share of tokens, one line per policy family, 95% intervals."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'glimp[plot]'") from None
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
    fig = Figure(figsize=(7.5, 5.2), dpi=130, layout="constrained")
    ax = fig.subplots()
    graded = [r for r in rows if r.stats.accuracy is not None and r.stats.large_share_tokens is not None]
    ends = {r.run.family: r for r in graded if r.run.family in ("small", "large")}
    if len(ends) == 2:
        ax.plot([0, ends["large"].stats.large_share_tokens], [100 * ends["small"].stats.accuracy,
                100 * ends["large"].stats.accuracy], ":", color="grey", linewidth=1, label="small–large chord")
    for family, (marker, colour, label) in STYLES.items():
        mine = sorted((r for r in graded if r.run.style == family), key=lambda r: r.stats.large_share_tokens)
        if not mine:
            continue
        x = [r.stats.large_share_tokens + DODGE.get(family, 0.0) for r in mine]
        y = [100 * r.stats.accuracy for r in mine]
        err = [[100 * (r.stats.accuracy - r.stats.ci_low) for r in mine],
               [100 * (r.stats.ci_high - r.stats.accuracy) for r in mine]]
        big = family in ("small", "large", "adaptive")
        ax.errorbar(x, y, yerr=err, fmt=marker + ("" if big or len(mine) == 1 else "-"), color=colour, capsize=3,
                    markersize=9 if big else 6, label=label, alpha=0.9)
    ax.set_xlabel("large model's share of the trace tokens (families dodged by up to ±0.009 so bars stay apart)")
    ax.set_ylabel("accuracy (%), 95% Wilson interval")
    ax.set_xlim(-0.03, 1.03)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=4, fontsize=8, frameon=False)
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
