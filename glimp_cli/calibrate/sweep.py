"""Sweeps: plan the runs (small alone, glimp at the tau of each share, adaptive, large alone) and run them.

A run is a batch run into its own results file in the runs directory, so a rerun resumes and reuses
every finished question and loads no model when nothing is left.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from glimp_cli.batch import BatchOutcome, pair_settings, run_batch
from glimp_cli.calibrate.shares import tau_for_share, tau_text
from glimp_cli.calibrate.traces import Distribution, distribution_from_traces
from glimp_cli.config import PairSpec, Registry
from glimp_cli.errors import UsageError
from glimp_cli.policies import ADAPTIVE_WARMUP, SMALL, Policy, make_policy
from glimp_cli.questions import Question
from glimp_cli.results_file import ResultsFile
from glimp_cli.router import Router

DEFAULT_SHARES = (0.25, 0.5, 0.75)


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
            runs.append(Run(f"glimp tau {tau_text(tau)}", "glimp", tau, share,
                            runs_dir / f"glimp-tau{tau_text(tau)}.jsonl"))
    if adaptive:
        for share, tau in taus.items():
            runs.append(Run(f"adaptive {share:.0%}", "adaptive", tau, share,
                            runs_dir / f"adaptive-share{share:.2f}-tau{tau_text(tau)}-warmup{warmup}.jsonl",
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
