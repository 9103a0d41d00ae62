"""The `glimp calibrate` flow: record (or read) H_init, choose tau, show it, and store it if asked."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from glimp_cli.calibrate.drawing import (
    describe_choice, describe_distribution, render_frontier, render_histogram, write_plot,
)
from glimp_cli.calibrate.frontier import OBJECTIVES, FrontierRow, Pick, frontier, pick_tau
from glimp_cli.calibrate.models_yaml import (
    calibration_record, describe_write, measured_by_run, measured_in_traces, settings_to_write, write_tau,
)
from glimp_cli.calibrate.questions import calibration_set, check_held_out
from glimp_cli.calibrate.shares import TauShare, choose_by_share, share_at
from glimp_cli.calibrate.sweep import (
    Calibration, ModelsOnDemand, default_runs_dir, parse_shares, run_calibration,
)
from glimp_cli.calibrate.traces import Distribution, distribution_from_traces, trace_questions
from glimp_cli.config import PairSpec, Registry
from glimp_cli.errors import InputError, UsageError
from glimp_cli.policies import ADAPTIVE_WARMUP, LARGE, SMALL
from glimp_cli.questions import Question

INTERRUPTED = 130  # the exit status of a calibration stopped by Ctrl-C


@dataclass(frozen=True)
class CalibrateOptions:
    """What `glimp calibrate` was asked to do, as parsed from its command line."""

    questions: Path | None = None
    traces: Path | None = None
    traces_mode: str | None = None
    limit: int | None = None
    offset: int = 0
    question_field: str | None = None
    answer_field: str | None = None
    id_field: str | None = None
    large_share: float | None = None
    sweep: bool = False
    shares: str = "0.25,0.5,0.75"
    adaptive: bool = False
    warmup: int = ADAPTIVE_WARMUP
    objective: str | None = None
    max_drop: float = 1.0
    max_latency_ratio: float = 0.8
    runs_dir: Path | None = None
    plot: Path | None = None
    write_to: Path | None = None  # the models.yaml that --write stores tau in (None: nothing is written)
    exclude: Path | None = None
    allow_overlap: bool = False


def check_options(options: CalibrateOptions) -> None:
    """Refuse option combinations that cannot work, before any file is read or model loaded."""
    if options.traces and (options.questions or options.sweep):
        raise UsageError("--traces reads recorded steps: give it without a questions file and without --sweep")
    if options.objective and options.objective not in OBJECTIVES:
        raise UsageError(f"--objective {options.objective!r} is not one of {', '.join(OBJECTIVES)}")
    if options.objective and not options.sweep:
        raise UsageError("--objective picks from the sweep: add --sweep")
    if options.objective and options.large_share is not None:
        raise UsageError("pick tau by --large-share or by --objective, not both")
    if options.write_to and not options.objective and options.large_share is None:
        raise UsageError("--write needs a tau to write: choose it with --large-share or --sweep --objective")
    if options.large_share is not None and not 0 <= options.large_share <= 1:  # also NaN
        raise UsageError(f"--large-share {options.large_share} is not between 0 and 1")
    if not (0 <= options.max_drop < math.inf and 0 < options.max_latency_ratio < math.inf):  # also NaN
        raise UsageError("--max-drop must be a finite number >= 0 and --max-latency-ratio a finite number > 0")
    if options.sweep:
        parse_shares(options.shares)


@dataclass
class Recorded:
    """H_init values and, after a sweep, its frontier; `questions` is None for traces."""

    dist: Distribution
    questions: list[Question] | None = None
    source: Path | None = None  # the questions file the small model ran over
    rows: list[FrontierRow] | None = None


def run_command(options: CalibrateOptions, registry: Registry, pair: PairSpec, out: Console, err: Console,
                cache: Path) -> int:
    """The whole command over a resolved pair; returns the exit status (0, or INTERRUPTED).

    `cache` is where default runs directories go; results and pictures are printed on `out`,
    progress and warnings on `err`.
    """
    check_options(options)
    recorded = record_h_init(options, registry, pair, err, cache)
    if recorded is None:
        return INTERRUPTED
    at, pick = choose(options, recorded, pair)
    show(options, recorded, at, pick, pair, out, err)
    if options.write_to:
        store(options, recorded, at, pick, registry, pair, out)
    return 0


def record_h_init(options: CalibrateOptions, registry: Registry, pair: PairSpec, err: Console,
           cache: Path) -> Recorded | None:
    """The H_init values: read from --traces, or recorded by a small-alone run (and a sweep); None if interrupted."""
    from glimp_cli.batch import batch_settings
    from glimp_cli.progress import BatchProgress
    from glimp_cli.questions import load_questions, question_source

    if options.traces:
        _check_held_out(options, trace_questions(options.traces), err)
        return Recorded(distribution_from_traces(options.traces, options.traces_mode))
    source = Path(options.questions or calibration_set())
    loaded, skipped = load_questions(source, options.question_field, options.answer_field, options.id_field,
                                     options.limit, options.offset)
    for line in skipped:
        err.print(f"{source}:{line.line}: {line.reason}", markup=False)
    if not loaded:
        raise InputError(f"{source}: no questions to calibrate on")
    _check_held_out(options, [q.question for q in loaded], err)
    where = options.runs_dir or default_runs_dir(cache / "calibrate", pair, loaded)

    def progress(run, pending: int):
        err.print(f"{run.label}: {pending} of {len(loaded)} questions to run into {run.path}", markup=False)
        return BatchProgress(err, {run.mode: pending})

    def on_done(run, outcome) -> None:
        for qid, _, why in outcome.failed:
            err.print(f"glimp: question {qid} failed in {run.label}: {why}", markup=False)
        if not outcome.written and not outcome.interrupted:
            err.print(f"{run.label}: reused {outcome.already_done} results from {run.path}", markup=False)

    used = {SMALL, LARGE} if options.sweep else {SMALL}
    base = batch_settings(registry, pair, used, False, question_source(source, options.limit, options.offset))
    grid = parse_shares(options.shares) if options.sweep else None
    models = ModelsOnDemand(registry, pair)
    try:
        result = run_calibration(loaded, pair, models.router, where, grid, options.adaptive, options.warmup,
                                 progress, on_done, base)
    except KeyboardInterrupt:
        result = Calibration(None, [], True)
    finally:
        models.close()
    if result.interrupted:
        err.print(f"interrupted: finished runs are kept in {where}; run the same command to go on", markup=False)
        return None
    rows = frontier(result.runs, loaded) if options.sweep else None
    return Recorded(result.dist, loaded, source, rows)


def _check_held_out(options: CalibrateOptions, texts: list[str], err: Console) -> None:
    if options.exclude:
        note = check_held_out(texts, options.exclude, options.allow_overlap)
        if note:
            err.print(f"glimp: warning: {note}", markup=False)


def choose(options: CalibrateOptions, recorded: Recorded, pair: PairSpec) -> tuple[TauShare, Pick | None]:
    """The tau to show (and write): by --large-share, by the sweep's objective, else the pair's own."""
    values = recorded.dist.values
    at = choose_by_share(values, options.large_share) if options.large_share is not None else None
    pick = None
    if recorded.rows is not None and options.objective:
        pick = pick_tau(recorded.rows, options.objective, options.max_drop, options.max_latency_ratio)
        if pick.row is not None:
            at = share_at(values, pick.row.run.tau)
    return at or share_at(values, pair.tau), pick


def show(options: CalibrateOptions, recorded: Recorded, at: TauShare, pick: Pick | None, pair: PairSpec,
         out: Console, err: Console) -> None:
    """The distribution, the histogram with tau, the frontier after a sweep, and the PNG if asked."""
    chosen = pick.row if pick else None
    out.print(describe_distribution(recorded.dist), markup=False)
    out.print()
    out.print(render_histogram(recorded.dist, at))
    out.print()
    out.print(describe_choice(at), markup=False)
    if recorded.rows is not None:
        out.print()
        out.print(render_frontier(recorded.rows, chosen))
        if pick is not None:
            out.print(f"{options.objective}: {pick.reason}", markup=False)
            if pick.note:
                out.print(f"note: {pick.note}", markup=False)
    if options.plot:
        title = f"glimp calibrate · pair {pair.name} ({pair.small} / {pair.large})"
        err.print(f"wrote {write_plot(options.plot, recorded.dist, at, recorded.rows, chosen, title)}", markup=False)


def store(options: CalibrateOptions, recorded: Recorded, at: TauShare, pick: Pick | None, registry: Registry,
          pair: PairSpec, out: Console) -> None:
    """--write: tau, the settings its H_init values were measured with where the pair differs, the record."""
    if pick is not None and pick.row is None:
        raise InputError(f"nothing written: {pick.reason}")
    dist = recorded.dist
    measured = measured_in_traces(dist) if options.traces else measured_by_run(pair, recorded.source)
    changed = settings_to_write(registry.pair(pair.name), measured,
                                uses_large=options.objective is not None or dist.mode != SMALL)
    share = pick.row.run.share if pick is not None else at.target
    entry = calibration_record(measured, at.tau, dist.n, share, options.objective)
    change = write_tau(options.write_to, registry, pair.name, at.tau, changed, entry)
    out.print(describe_write(change), markup=False, soft_wrap=True)  # paths stay whole
