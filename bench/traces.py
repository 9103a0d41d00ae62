"""What the recorded traces say about why H_init routes as it does: by how a step begins, and by who wrote the step before.

Run from the repo root after bench/tradeoff.py: `python bench/traces.py [--runs-dir bench/results/tradeoff-default]`.
Reads the results files only (no model is loaded) and prints three tables:
- steps by how they begin (a list marker such as "2." or "-", a line stating the answer, anything else): how many,
  the median H_init the probe saw, and the share each routed run gave the large model;
- H_init by the writer of the step before: in a glimp run the writer depends on the previous H_init, in a random
  run it does not, so only the random runs show what the writer itself does to H_init;
- who wrote the first step.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from glimp_cli.policies import LARGE, SMALL
from glimp_cli.report import load_results

from common import REPO

DEFAULT_MARKER = r"\s*(\d+[.)]|[-*•])\s"  # a numbered or bulleted list item
KINDS = ("list item", "answer", "other")


def step_kind(text: str, marker: re.Pattern, answer_markers: tuple[str, ...]) -> str:
    """How a step begins: a list item, a line stating the answer, or anything else."""
    if marker.match(text):
        return "list item"
    if any(m in text for m in answer_markers):
        return "answer"
    return "other"


def probed_steps(record: dict):
    """(previous writer or None, step) for each step after the first whose H_init was probed."""
    steps = record.get("steps") or []
    for before, step in zip(steps, steps[1:]):
        if step.get("h_init") is not None:
            yield before["model"], step


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}" if values else "-"


def _share(flags: list[bool]) -> str:
    return f"{sum(flags) / len(flags):.0%}" if flags else "-"


def run_tau(record: dict) -> float | None:
    """The tau a run routed by; a random run's is the one of the glimp run it was matched to (named in its file)."""
    settings = record.get("settings") or {}
    return settings.get("tau") if record.get("mode") in ("glimp", "random") else None


def load_runs(runs_dir: Path) -> dict[str, list[dict]]:
    """Every results file of the runs dir (calibration runs excluded), by file name."""
    runs = {}
    for path in sorted(runs_dir.glob("*.jsonl")):
        if path.name == "profiles.jsonl":
            continue
        records, _ = load_results(path)
        if records:
            runs[path.stem] = records
    return runs


def kind_table(runs: dict[str, list[dict]], marker: re.Pattern, answer_markers: tuple[str, ...]) -> Table:
    table = Table(title="steps after the first, by how they begin: how many, median H_init, share the large model wrote",
                  title_justify="left", show_edge=False)
    table.add_column("run")
    for kind in KINDS:
        table.add_column(f"{kind}: n / H_init / large", justify="right")
    for name, records in runs.items():
        cells = []
        for kind in KINDS:
            steps = [s for r in records for s in (r.get("steps") or [])[1:]
                     if step_kind(s["text"], marker, answer_markers) == kind]
            hs = [s["h_init"] for s in steps if s.get("h_init") is not None]
            routed = records[0].get("mode") not in ("small", "large")
            cells.append(f"{len(steps)} / {_median(hs)} / {_share([s['model'] == LARGE for s in steps]) if routed else '-'}")
        table.add_row(name, *cells)
    return table


def writer_table(runs: dict[str, list[dict]]) -> Table:
    table = Table(title="H_init by who wrote the step before (probed steps after the first): median, share above tau",
                  title_justify="left", show_edge=False,
                  caption="random runs route without looking at H_init: their columns show what the writer does to it")
    for column in ("run", "tau", "after small: n / median / > tau", "after large: n / median / > tau"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, records in runs.items():
        if records[0].get("mode") not in ("glimp", "random"):
            continue
        tau = run_tau(records[0])
        after_large = (records[0].get("settings") or {}).get("tau_after_large", tau)
        cells = []
        for writer, limit in ((SMALL, tau), (LARGE, after_large)):
            hs = [s["h_init"] for r in records for w, s in probed_steps(r) if w == writer]
            cells.append(f"{len(hs)} / {_median(hs)} / {_share([h > limit for h in hs]) if limit is not None else '-'}")
        taus = "-" if tau is None else f"{tau:.4g}" + ("" if after_large == tau else f", {after_large:.4g} after large")
        table.add_row(name, taus, *cells)
    return table


def first_step_table(runs: dict[str, list[dict]]) -> Table:
    table = Table(title="the first step", title_justify="left", show_edge=False)
    for column in ("run", "questions", "written by the large model", "median H_init"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, records in runs.items():
        firsts = [r["steps"][0] for r in records if r.get("steps")]
        hs = [s["h_init"] for s in firsts if s.get("h_init") is not None]
        table.add_row(name, str(len(firsts)), _share([s["model"] == LARGE for s in firsts]), _median(hs))
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, default=REPO / "bench" / "results" / "tradeoff-default")
    p.add_argument("--marker", default=DEFAULT_MARKER, help="regex of a list item's start (default %(default)r)")
    p.add_argument("--answer-marker", action="append", help="text that states the answer (default: 'The answer is')")
    args = p.parse_args(argv)
    err = Console(stderr=True, highlight=False)
    try:
        marker = re.compile(args.marker)
    except re.error as exc:
        err.print(f"traces: error: --marker {args.marker!r}: {exc}", markup=False)
        return 2
    runs = load_runs(args.runs_dir)
    if not runs:
        err.print(f"traces: error: {args.runs_dir}: no results files", markup=False)
        return 1
    out = Console(highlight=False, width=max(Console().width, 150))
    for table in (kind_table(runs, marker, tuple(args.answer_marker or ("The answer is",))), writer_table(runs),
                  first_step_table(runs)):
        out.print(table)
        out.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
