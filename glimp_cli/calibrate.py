"""`glimp calibrate`: pick tau from recorded H_init values, and show what it trades.

Everything here reads batch results files (the JSONL that `glimp batch` writes, each step with its
h_init). The distribution comes from a small-mode run over calibration questions (the probe is the
small model's first token, so small mode records every step's H_init for free) or from any recorded
traces; a tau for a target large share is a quantile of it; a sweep is a set of batch runs, one
results file per tau, that a rerun resumes and reuses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import tempfile
import unicodedata
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from glimp_cli.batch import BatchOutcome, ResultsFile, pair_settings, run_batch
from glimp_cli.config import PairSpec, Registry, load_registry
from glimp_cli.errors import ConfigError, InputError, MissingExtraError, UsageError
from glimp_cli.policies import ADAPTIVE_WARMUP, LARGE, SMALL, Policy, make_policy, share_threshold
from glimp_cli.questions import Question
from glimp_cli.report import ModeRow, load_results, numbered_results, summarize, wilson_interval
from glimp_cli.router import Router

CALIBRATION_SET = "data/calibration.jsonl"
# Which mode's steps give the H_init values when a traces file holds several: small mode probes
# every step of a trace that no routing changed, so it comes first.
TRACE_MODES = ("small", "glimp", "adaptive", "random", "step_entropy", "step_perplexity", "large")
DEFAULT_SHARES = (0.25, 0.5, 0.75)
OBJECTIVES = ("fastest-within-drop", "most-accurate-under-latency")
COLOURS = {SMALL: "cyan", LARGE: "magenta"}
# The pair settings the recorded H_init values depend on, so --write stores them with tau: where a
# step ends (delimiter; max_step_tokens, which cuts a step and probes mid-sentence), how H_init is
# estimated (estimator), and what the traces say at each step boundary (temperature and top_p: the
# probe is read at temperature 1 from raw logits, but the context it is read after was sampled with
# them). Not max_tokens: it only cuts traces short, so each recorded value is one that a longer trace
# holds too. Not seed: it picks one draw, not the distribution.
MEASURED_KEYS = ("delimiter", "estimator", "temperature", "top_p", "max_step_tokens")


def calibration_set() -> Path:
    """The shipped calibration questions: the last 100 GSM8K test problems (see data/SOURCES.md)."""
    return Path(str(resources.files("glimp_cli").joinpath(CALIBRATION_SET)))


# --- the H_init distribution ------------------------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    """The H_init values (nats, sorted) of every probed step of some traces."""

    values: tuple[float, ...]
    n_traces: int
    mode: str
    source: str
    recorded_with: frozenset = frozenset()  # (pair, estimator) pairs named in the traces' settings
    # What the traces were recorded with, each distinct one once: the MEASURED_KEYS, the models and
    # the questions file (see `recorded_settings`).
    recorded: tuple[dict, ...] = ()

    @property
    def n(self) -> int:
        return len(self.values)


def read_traces(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every line of a results file; a line that is not a whole result is an error."""
    numbered, warnings = numbered_results(path)
    if warnings:
        problem = warnings[0].removesuffix("; skipped")
        raise InputError(f"{problem}: calibrate reads only whole results files "
                         "(glimp batch --resume repairs a torn last line)")
    return numbered


def trace_values(path: str | Path, line: int, record: dict) -> list[float]:
    """The H_init values of one record's probed steps; a step without a valid h_init names its line."""
    steps = record.get("steps")
    if not isinstance(steps, list):
        raise InputError(f"{path}: line {line}: no 'steps' list (not a glimp batch trace)")
    values = []
    for number, step in enumerate(steps, 1):
        if not isinstance(step, dict) or "h_init" not in step:
            raise InputError(f"{path}: line {line}: step {number} has no h_init (not a glimp batch trace)")
        h = step["h_init"]
        if h is None:  # a step nobody probed: the answer, or a baseline that does no routing work
            continue
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h < 0:
            raise InputError(f"{path}: line {line}: step {number} has h_init {h!r}, not an entropy in nats")
        values.append(float(h))
    return values


def distribution_from_traces(path: str | Path, mode: str | None = None,
                             ids: set[str] | None = None) -> Distribution:
    """The H_init distribution of a results file's traces of one mode (`ids`: only those questions).

    Without `mode`, the first of TRACE_MODES whose traces carry H_init values is used.
    """
    numbered = [(line, r) for line, r in read_traces(path) if ids is None or r["id"] in ids]
    if not numbered:
        raise InputError(f"{path}: holds no traces" + (" of these questions" if ids is not None else ""))
    per_mode: dict[str, list[tuple[dict, list[float]]]] = {}
    for line, record in numbered:
        per_mode.setdefault(record["mode"], []).append((record, trace_values(path, line, record)))
    probed = [m for m, traces in per_mode.items() if any(values for _, values in traces)]
    span = f"lines {numbered[0][0]}-{numbered[-1][0]}" if len(numbered) > 1 else f"line {numbered[0][0]}"
    if mode is None:
        if not probed:
            raise InputError(f"{path}: no step on {span} carries an h_init (large mode records none unless "
                             "run with --probe-baseline): record traces with glimp batch --mode small")
        mode = next((m for m in TRACE_MODES if m in probed), sorted(probed)[0])
    elif mode not in per_mode:
        raise UsageError(f"{path} holds no {mode} traces (it has {', '.join(sorted(per_mode))})")
    elif mode not in probed:
        raise InputError(f"{path}: no step of the {mode} traces on {span} carries an h_init")
    traces = per_mode[mode]
    values = sorted(v for _, vs in traces for v in vs)
    recorded = frozenset((r["settings"].get("pair"), r["settings"].get("estimator")) for r, _ in traces)
    distinct = {json.dumps(recorded_settings(r["settings"]), sort_keys=True): recorded_settings(r["settings"])
                for r, _ in traces}
    return Distribution(tuple(values), len(traces), mode, str(path), recorded, tuple(distinct.values()))


def recorded_settings(settings: dict) -> dict:
    """From a results line's settings: the MEASURED_KEYS, both model names and the questions file."""
    models = settings.get("models") if isinstance(settings.get("models"), dict) else {}
    questions = settings.get("questions") if isinstance(settings.get("questions"), dict) else {}
    return {**{key: settings.get(key) for key in MEASURED_KEYS}, SMALL: models.get(SMALL),
            LARGE: models.get(LARGE), "questions": questions.get("path")}


def trace_questions(path: str | Path) -> list[str]:
    """The distinct question texts of a results file's traces (for the held-out check)."""
    return list(dict.fromkeys(r.get("question") for _, r in read_traces(path) if isinstance(r.get("question"), str)))


# --- tau for a share, and how sure that is ----------------------------------------------------


def round_tau(tau: float) -> float:
    """tau rounded UP to 4 decimals, so every step at or below the exact quantile stays at or below it."""
    if not math.isfinite(tau):
        return tau
    rounded = round(tau, 4)
    return rounded if rounded >= tau - 1e-9 else round(rounded + 1e-4, 4)


def tau_for_share(values: Sequence[float], share: float) -> float:
    """The tau at which `share` of the recorded steps lie above it (so the large model would take them)."""
    return round_tau(share_threshold(values, share))


@dataclass(frozen=True)
class TauShare:
    """A tau and the share of recorded steps above it, with a 95% interval for that share.

    `ci` is the Wilson interval of the share at this tau given `n` steps: where the share of future
    steps above this tau lies, at 95%, if steps were independent draws (steps of one question are
    not quite: the interval is on the optimistic side). `tau_ci`, when a share was targeted, maps
    that interval back through the order statistics: the taus at which the recorded share equals the
    interval's ends, rounded outwards. By duality it is, roughly, where the tau that truly gives the
    target share lies.
    """

    tau: float
    n: int
    above: int
    ci: tuple[float, float]
    target: float | None = None
    tau_ci: tuple[float, float] | None = None

    @property
    def share(self) -> float:
        return self.above / self.n


def share_at(values: Sequence[float], tau: float) -> TauShare:
    """The share of `values` above `tau`, with its 95% Wilson interval."""
    if not values:
        raise InputError("no H_init values to calibrate on")
    above = sum(v > tau for v in values)
    return TauShare(tau, len(values), above, wilson_interval(above, len(values)))


def order_statistic(values: Sequence[float], k: int) -> float:
    """The k-th smallest value (1-based); k <= 0 is -inf, below every value."""
    ordered = sorted(values)
    return -math.inf if k <= 0 else float(ordered[min(k, len(ordered)) - 1])


def choose_by_share(values: Sequence[float], share: float) -> TauShare:
    """tau for a target large share, the share it really gives here, and both intervals."""
    if not 0.0 <= share <= 1.0:
        raise UsageError(f"--large-share {share} is not between 0 and 1")
    found = share_at(values, tau_for_share(values, share))
    low, high = found.ci
    n = found.n
    # More large steps (share `high`) needs a lower tau: the floor keeps the interval outward.
    tau_ci = (round_tau(order_statistic(values, math.floor(n * (1 - high) + 1e-9))),
              round_tau(order_statistic(values, math.ceil(n * (1 - low) - 1e-9))))
    return replace(found, target=share, tau_ci=tau_ci)


# --- the histogram ----------------------------------------------------------------------------


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


def _tau_text(tau: float) -> str:
    return f"{tau:.4f}" if math.isfinite(tau) else ("-inf" if tau < 0 else "inf")


def render_histogram(dist: Distribution, at: TauShare, width: int = 44) -> Group:
    """Bars of H_init per bin, cyan where the small model keeps the step, magenta where the large takes it."""
    bins = histogram(dist.values, at.tau)
    top = max(b.small + b.large for b in bins)
    lines: list[Text] = []
    marker = Text(f"{'':>11} ┄┄ tau {_tau_text(at.tau)} ┄┄ ↑ small {1 - at.share:.1%} ({at.n - at.above}) "
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
        lines.append(f"tau {_tau_text(at.tau)} for a large share of {at.target:.0%}: "
                     f"{at.above} of {at.n} recorded steps ({at.share:.1%}) are above it")
    else:
        lines.append(f"tau {_tau_text(at.tau)}: {at.above} of {at.n} recorded steps ({at.share:.1%}) are above it")
    lines.append(f"  large share at this tau: {low:.1%}–{high:.1%} at 95% (Wilson; steps taken as independent)")
    if at.tau_ci is not None:
        lines.append(f"  the tau that truly gives {at.target:.0%}: {_tau_text(at.tau_ci[0])}–{_tau_text(at.tau_ci[1])} "
                     "at about 95% (order statistics)")
    return "\n".join(lines)


# --- held-out honesty -------------------------------------------------------------------------


def normalize_question(text: str) -> str:
    """Question text compared case-, width- and whitespace-blind."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def count_overlap(calibration: Iterable[str], evaluation: Iterable[str]) -> int:
    """How many calibration questions also appear in the evaluation questions."""
    held_out = {normalize_question(q) for q in evaluation}
    return sum(normalize_question(q) in held_out for q in calibration)


def check_held_out(calibration: list[str], eval_path: str | Path, allow: bool) -> str | None:
    """Refuse calibration questions that the evaluation file also holds (unless `allow`); a note if allowed."""
    from glimp_cli.questions import load_questions

    evaluation, _ = load_questions(eval_path)
    overlap = count_overlap(calibration, (q.question for q in evaluation))
    if not overlap:
        return None
    what = f"{overlap} of {len(calibration)} calibration questions also appear in {eval_path}"
    if not allow:
        raise UsageError(f"{what}: calibrate on held-out questions, or pass --allow-overlap")
    return f"{what} (allowed by --allow-overlap: the tau is not held out for them)"


# --- the sweep --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One batch run of a sweep, into its own results file (tau is part of a file's settings)."""

    label: str
    mode: str
    tau: float | None  # None for small and large alone: they use no threshold
    share: float | None  # the large share of recorded steps its tau was picked for (adaptive: its target)
    path: Path
    warmup: int | None = None


def recording_run(runs_dir: Path) -> Run:
    """The small-alone run: the always-small baseline, and the H_init record of every step."""
    return Run("small alone", "small", None, 0.0, Path(runs_dir) / "small.jsonl")


def plan_sweep(values: Sequence[float], shares: Sequence[float], runs_dir: Path, adaptive: bool = False,
               warmup: int = ADAPTIVE_WARMUP) -> list[Run]:
    """small alone, glimp at the tau of each share, (with `adaptive`) adaptive at each share, large alone."""
    runs_dir = Path(runs_dir)
    for share in shares:
        if not 0.0 <= share <= 1.0:
            raise UsageError(f"--shares: {share} is not between 0 and 1")
    taus = {share: tau_for_share(values, share) for share in sorted(set(shares))}
    runs = [recording_run(runs_dir)]
    done_taus: set[float] = set()
    for share, tau in taus.items():
        if tau not in done_taus:  # ties in the record can give two shares one tau
            done_taus.add(tau)
            runs.append(Run(f"glimp tau {_tau_text(tau)}", "glimp", tau, share,
                            runs_dir / f"glimp-tau{_tau_text(tau)}.jsonl"))
    if adaptive:
        for share, tau in taus.items():
            runs.append(Run(f"adaptive {share:.0%}", "adaptive", tau, share,
                            runs_dir / f"adaptive-share{share:.2f}-tau{_tau_text(tau)}-warmup{warmup}.jsonl",
                            warmup))
    runs.append(Run("large alone", "large", None, 1.0, runs_dir / "large.jsonl"))
    return runs


def run_settings(pair: PairSpec, run: Run, base: dict | None = None) -> dict:
    """The settings recorded with (and checked against) every line of a run's file.

    `base` is the batch key of the pair (batch.batch_settings: with its models' details); without
    it, the pair's own settings.
    """
    settings = dict(base) if base is not None else pair_settings(pair)
    settings["tau"] = run.tau
    settings["large_share"] = run.share if run.mode == "adaptive" else None
    if run.mode == "adaptive":
        settings["adaptive_warmup"] = run.warmup
    return settings


def run_policy(run: Run) -> Policy:
    """The routing policy of a run."""
    return make_policy(run.mode, 0.0 if run.tau is None else run.tau, 0.0,
                       adaptive_share=run.share, adaptive_warmup=ADAPTIVE_WARMUP if run.warmup is None else run.warmup)


def default_runs_dir(base: Path, pair: PairSpec, questions: list[Question]) -> Path:
    """A directory named by the pair and a digest of the questions and settings: a rerun finds it again."""
    digest = hashlib.sha256(json.dumps(
        [[q.id, q.question, q.reference] for q in questions] + [{**pair_settings(pair), "tau": None}],
        sort_keys=True).encode()).hexdigest()[:12]
    return Path(base) / f"{pair.name}-{digest}"


def execute_run(run: Run, questions: list[Question], pair: PairSpec, make_router: Callable[[Policy], Router],
                progress: Callable[[Run, int], Any] | None = None, base: dict | None = None) -> BatchOutcome:
    """Run (or resume) one run of the sweep into its file; questions already there are reused.

    `make_router(policy)` wraps models loaded once; it is not called when nothing is left to run.
    `progress(run, pending)` may return a context manager with `mode_started` and `result` (BatchProgress).
    `base`: the settings every run's lines share (see run_settings). A file whose lines hold other
    settings, or another question under one of these ids, is refused.
    """
    run.path.parent.mkdir(parents=True, exist_ok=True)
    settings = run_settings(pair, run, base)
    out, done = ResultsFile.open(run.path, resume=True, settings_key=settings, questions=questions)
    with out:
        pending = sum((q.id, run.mode) not in done for q in questions)
        if not pending:
            return BatchOutcome(already_done=len(questions))
        tracker = progress(run, pending) if progress else None

        def router_for_mode(mode: str, recorded: dict) -> Router:
            if tracker is not None:
                tracker.mode_started(mode, recorded)
            return make_router(run_policy(run))

        if tracker is None:
            return run_batch(router_for_mode, questions, [run.mode], out, done, lambda mode: settings)
        with tracker:
            return run_batch(router_for_mode, questions, [run.mode], out, done, lambda mode: settings,
                             tracker.result)


class ModelsOnDemand:
    """The pair's models, each loaded when a run first needs it: a rerun that reuses every file loads none."""

    def __init__(self, registry: Registry, pair: PairSpec):
        self.registry = registry
        self.pair = pair
        self.engine = None

    def router(self, policy: Policy) -> Router:
        from glimp_cli.engine import Engine

        have = set(self.engine.backends) if self.engine else set()
        missing = set(policy.models) - have
        if missing:
            more = Engine.load(self.registry, self.pair, missing)
            if self.engine is None:
                self.engine = more
            else:
                self.engine.backends.update(more.backends)
        return self.engine.router(policy)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def parse_shares(text: str) -> list[float]:
    """`--shares 0.25,0.5,0.75` as numbers between 0 and 1."""
    try:
        shares = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--shares {text!r}: give large shares such as 0.25,0.5,0.75") from None
    if not shares or not all(0.0 <= s <= 1.0 for s in shares):
        raise UsageError(f"--shares {text!r}: give large shares between 0 and 1, such as 0.25,0.5,0.75")
    return shares


@dataclass
class Calibration:
    """What `run_calibration` did: the recorded distribution and the runs, unless interrupted first."""

    dist: Distribution | None
    runs: list[Run]
    interrupted: bool = False


def run_calibration(questions: list[Question], pair: PairSpec, make_router: Callable[[Policy], Router],
                    runs_dir: Path, shares: Sequence[float] | None = None, adaptive: bool = False,
                    warmup: int = ADAPTIVE_WARMUP, progress: Callable[[Run, int], Any] | None = None,
                    on_done: Callable[[Run, BatchOutcome], None] | None = None,
                    base: dict | None = None) -> Calibration:
    """Record H_init with a small-alone run, then (with `shares`) sweep the taus of those shares.

    Every run resumes its file in `runs_dir`, so a rerun only runs what is missing. Ctrl-C stops
    after the question in flight (dropped; everything finished is kept) with `interrupted` set.
    `base`: the settings all runs' lines share (see run_settings).
    """
    recording = recording_run(runs_dir)
    runs = [recording]
    done = execute_run(recording, questions, pair, make_router, progress, base)
    if on_done:
        on_done(recording, done)
    if done.interrupted:
        return Calibration(None, runs, True)
    dist = distribution_from_traces(recording.path, SMALL, {q.id for q in questions})
    if shares is None:
        return Calibration(dist, runs)
    runs = plan_sweep(dist.values, shares, runs_dir, adaptive, warmup)
    for run in runs[1:]:
        done = execute_run(run, questions, pair, make_router, progress, base)
        if on_done:
            on_done(run, done)
        if done.interrupted:
            return Calibration(dist, runs, True)
    return Calibration(dist, runs)


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
                      "-" if row.run.tau is None else _tau_text(row.run.tau), picked, routed, str(s.n), accuracy,
                      f"{s.mean_latency:.2f}", ratio, share, flags)
    return table


def _row_style(mode: str) -> str:
    return {SMALL: COLOURS[SMALL], LARGE: COLOURS[LARGE], "adaptive": "yellow"}.get(mode, "")


# --- the picture ------------------------------------------------------------------------------


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


# --- storing tau in models.yaml ---------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """What a tau was measured with: the MEASURED_KEYS settings, the models, where the steps came from."""

    settings: dict
    small: str
    large: str
    mode: str = SMALL
    questions: str | None = None
    traces: str | None = None


def measured_by_run(pair: PairSpec, questions: str | Path) -> Measured:
    """A calibration run of `pair` (with its command-line overrides) over the questions file `questions`."""
    return Measured({key: getattr(pair, key) for key in MEASURED_KEYS}, pair.small, pair.large, SMALL,
                    str(Path(questions).resolve()))


def measured_in_traces(dist: Distribution) -> Measured:
    """The settings a traces file's traces were recorded with; refused unless they are one set, known."""
    if not dist.recorded:
        raise InputError(f"{dist.source}: its traces record no settings")
    first = dist.recorded[0]
    for other in dist.recorded[1:]:
        for key in (k for k in first if k != "questions" and first[k] != other[k]):
            raise InputError(f"{dist.source}: its {dist.mode} traces were recorded with {key}={first[key]!r} "
                             f"and with {key}={other[key]!r}: calibrate on traces of one setting")
    for key in (*MEASURED_KEYS, SMALL, LARGE):
        if first[key] is None:
            raise InputError(f"{dist.source}: its traces do not record {key}, so their tau cannot be stored "
                             "with what it was measured with")
    questions = {r["questions"] for r in dist.recorded}
    return Measured({key: first[key] for key in MEASURED_KEYS}, first[SMALL], first[LARGE], dist.mode,
                    questions.pop() if len(questions) == 1 else None, str(Path(dist.source).resolve()))


def settings_to_write(pair: PairSpec, measured: Measured, uses_large: bool) -> dict[str, tuple[Any, Any]]:
    """key -> (the pair's value, the measured one) for each measured setting the pair holds otherwise.

    The models are not rewritten: a tau measured on another small model (or, when the large model
    shaped the steps, another large one) belongs to another pair, so that is refused.
    """
    roles = (SMALL, LARGE) if uses_large else (SMALL,)
    for role in roles:
        have, used = getattr(pair, role), getattr(measured, role)
        if have != used:
            raise UsageError(f"tau was measured with the {role} model {used!r}, but pair {pair.name!r} uses "
                             f"{have!r}: calibrate the pair's own models (no --{role}), or --write to a pair "
                             f"whose {role} model is {used!r}")
    return {key: (getattr(pair, key), value) for key, value in measured.settings.items()
            if getattr(pair, key) != value}


def calibration_record(measured: Measured, tau: float, steps: int, share: float | None,
                       objective: str | None = None, date: str | None = None) -> dict:
    """The `calibration:` mapping of a pair entry (config.CalibrationRecord), without empty fields."""
    from datetime import datetime, timezone

    record = {"tau": tau, "large_share": share, "objective": objective, "steps": steps, "mode": measured.mode,
              "questions": measured.questions, "traces": measured.traces, "small": measured.small,
              "large": measured.large, **measured.settings,
              "date": date or datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return {key: value for key, value in record.items() if value is not None}


@dataclass(frozen=True)
class TauWrite:
    """What `write_tau` changed."""

    path: Path
    pair: str
    old: float
    new: float
    added: bool  # the pair had no entry in that file: a full copy of it was added
    changed: dict = field(default_factory=dict)  # other pair settings written: key -> (old, new)
    calibration: dict | None = None  # the calibration record written with tau


def write_tau(path: str | Path, registry: Registry, pair_name: str, tau: float,
              changed: dict[str, tuple[Any, Any]] | None = None, calibration: dict | None = None) -> TauWrite:
    """Store `tau` (with the `changed` settings' new values and the `calibration` record) in the pair's
    entry of the models.yaml at `path`, keeping comments and other entries.

    A pair the file does not hold (it lives in the packaged file only) gets a full copy of its keys
    there, since an entry in a layered file replaces the packaged entry whole. The file is written to
    a temporary file beside it, checked to load with those values, and moved into place (os.replace).
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    path = Path(path).expanduser()
    yaml = YAML()  # round-trip: comments, order and quoting are kept
    yaml.width = 4096  # never re-wrap long lines of the user's file
    old = registry.pair(pair_name).tau
    changed = dict(changed or {})
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        data = yaml.load(text) if text.strip() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except Exception as exc:  # ruamel's parser errors share no public base class
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        data = CommentedMap()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if data.get("pairs") is None:
        data["pairs"] = CommentedMap()
    pairs = data["pairs"]
    added = pair_name not in pairs or pairs[pair_name] is None
    if added:
        origin = registry.origin.get(f"pairs.{pair_name}")
        raw = YAML(typ="safe").load(origin.read_text(encoding="utf-8"))["pairs"][pair_name]
        pairs[pair_name] = CommentedMap(raw)
    entry = pairs[pair_name]
    entry["tau"] = tau
    for key, (_, new) in changed.items():
        entry[key] = new
    if calibration is not None:
        entry["calibration"] = CommentedMap(calibration)
    want = {"tau": tau, **{key: new for key, (_, new) in changed.items()}}
    _replace_atomically(path, yaml, data, pair_name, want, calibration is not None)
    return TauWrite(path, pair_name, old, tau, added, changed, calibration)


def describe_write(change: TauWrite) -> str:
    """What --write did, in a line for tau and one for each kind of thing stored with it."""
    where = f"{change.path}: "
    what = "added the pair's entry with" if change.added else "set"
    lines = [f"{where}{what} pairs.{change.pair}.tau = {change.new:g} (was {change.old:g})"]
    if change.changed:
        settings = ", ".join(f"{key} = {new!r} (was {old!r})" for key, (old, new) in change.changed.items())
        lines.append(f"{where}also set {settings}: the recorded H_init values depend on them")
    record = change.calibration
    if record is not None:
        share = "" if record.get("large_share") is None else f"large share {record['large_share']:.0%}, "
        how = f" by {record['objective']}" if record.get("objective") else ""
        origin = record.get("traces") or record.get("questions") or "?"
        lines.append(f"{where}recorded pairs.{change.pair}.calibration: {share}{record['steps']} steps "
                     f"({record['mode']} mode) from {origin}{how}")
    return "\n".join(lines)


def _replace_atomically(path: Path, yaml, data, pair_name: str, want: dict, calibrated: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            yaml.dump(data, file)
            file.flush()
            os.fsync(file.fileno())
        written = load_registry(temp).pair(pair_name)
        for key, value in want.items():
            got = getattr(written, key)
            if not (got == value or (isinstance(got, float) and math.isnan(got) and math.isnan(value))):
                raise ConfigError(f"{path}: the rewritten file gives {key} {got!r}, not {value!r}; left unchanged")
        if calibrated and written.calibration is None:
            raise ConfigError(f"{path}: the rewritten file lost the calibration record; left unchanged")
        if path.exists():
            os.chmod(temp, path.stat().st_mode & 0o7777)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
