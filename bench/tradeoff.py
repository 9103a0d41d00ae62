"""The paper's claim measured: accuracy bought per large-model token, H_init routing against other ways to spend them.

Run from the repo root: `python bench/tradeoff.py [--pair P] [--questions 100] [--offset 0] [--plot docs/tradeoff.png]`.
Runs small alone, large alone, glimp at the taus that send about 20 / 35 / 50% of small-alone calibration
steps to the large model, random routing at each glimp run's reached share, the step-level signals
(step_entropy, step_perplexity) at thresholds picked for the same shares on the calibration drafts, and
adaptive at 35%, on held-out GSM8K test questions, greedy. Every run is a `glimp batch` results file in
--runs-dir; questions go one at a time through every run (question-major), so a noisy shared machine
slows all runs alike; a rerun resumes where the last stopped (Ctrl-C or a kill loses only the trace in
flight), and `--report` prints the tables from whatever has finished, loading no model.

The rates `glimp profile` measures are re-measured every --profile-every questions. Each run's latency
relative to large alone (measured, ratio of sums over the same questions) is set against the bound for
its work relative to large alone's (each record's decode, prefill and probes at the rates measured last
before it): the machine's speed, which changes within minutes on a shared machine, cancels out of both
ratios, and what is left is glimp's own overhead.
A smoke run on the fast pair: `--pair tiny --questions 3 --calibration-questions 6 --max-tokens 96`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from glimp_cli import calibrate
from glimp_cli.batch import ResultsFile, matched_share, pair_settings, run_batch
from glimp_cli.config import PairSpec, compile_probe_skip, load_registry
from glimp_cli.engine import pair_policy
from glimp_cli.errors import GlimpError, InputError, UsageError
from glimp_cli.policies import LARGE, SMALL, always_large
from glimp_cli.profile import Rates, bound_seconds, median_rates, profile_engine, rates_from_dict
from glimp_cli.questions import Question, load_questions
from glimp_cli.report import (
    ModeRow, Paired, common_ids, load_results, paired_comparison, recovered_gap, run_row,
)
from glimp_cli.router import Router

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "gsm8k" / "test-1-1219.jsonl"  # GSM8K test rows 1-1219: no calibration row
SHARES = (0.2, 0.35, 0.5)
ADAPTIVE_SHARE = 0.35
# Drafts the large model rewrites are judged at these step ends (see router.write_small).
JUDGED_STOPS = frozenset({"delimiter", "max_step_tokens", "max_tokens", "repetition"})


# --- the runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRun:
    """One policy on the evaluation questions, into its own results file."""

    label: str
    family: str  # small, large, glimp, random, step_entropy, step_perplexity or adaptive (its batch mode)
    pair: PairSpec  # the pair with this run's mode and threshold
    path: Path
    target: float | None = None  # the calibration share its threshold was picked for
    matched: str | None = None  # random: the label of the glimp run whose reached share it runs at
    variant: str | None = None  # a glimp variant: "skip", "content" or "writer" (see plan_runs)

    @property
    def style(self) -> str:
        """How the picture draws it: its family, or family + variant."""
        return self.family if self.variant is None else f"{self.family}_{self.variant}"

    @property
    def mode(self) -> str:
        return self.pair.mode

    @property
    def threshold(self) -> float | None:
        return {"glimp": self.pair.tau, "adaptive": self.pair.tau, "step_entropy": self.pair.step_entropy_threshold,
                "step_perplexity": self.pair.step_perplexity_threshold}.get(self.family)

    def settings(self, large_share: float | None = None) -> dict:
        """What every record of its file carries (random: the share it ran this question at)."""
        settings = pair_settings(self.pair)
        settings["large_share"] = {"random": large_share, "adaptive": self.pair.large_share}.get(self.family)
        if self.matched:
            settings["matched_to"] = self.matched
        return settings

    def policy(self, large_share: float | None = None):
        pair = self.pair if large_share is None else dataclasses.replace(self.pair, large_share=large_share)
        return pair_policy(pair)


@dataclass(frozen=True)
class Thresholds:
    """Per target share: glimp's tau and the step signals' thresholds; adaptive's warm-up tau."""

    taus: dict  # share -> tau
    entropy: dict  # share -> mean-token-entropy threshold
    perplexity: dict  # share -> perplexity threshold
    adaptive_tau: float
    skip_taus: dict = field(default_factory=dict)  # share -> tau of the --probe-skip H_init
    content_taus: dict = field(default_factory=dict)  # share -> tau of H_init at the first token of content
    after_large_taus: dict = field(default_factory=dict)  # share -> tau of H_init after a large step


def plan_runs(pair: PairSpec, th: Thresholds, runs_dir: Path, adaptive_share: float = ADAPTIVE_SHARE,
              probe_skip: str | None = None) -> list[BenchRun]:
    """Every run, in the order each question goes through them (a random run after its glimp run)."""
    def run(label, family, path, target=None, matched=None, variant=None, **changes) -> BenchRun:
        return BenchRun(label, family, dataclasses.replace(pair, mode=family, **changes), runs_dir / path,
                        target, matched, variant)

    runs = [run("small alone", "small", "small.jsonl", 0.0), run("large alone", "large", "large.jsonl", 1.0)]
    for share in sorted(th.taus):
        tau, name = th.taus[share], f"{share:.0%}"
        glimp = run(f"glimp {name}", "glimp", f"glimp-tau{tau:.4f}.jsonl", share, tau=tau)
        runs += [glimp, run(f"random ~ glimp {name}", "random", f"random-glimp-tau{tau:.4f}.jsonl", share,
                            matched=glimp.label, tau=tau)]
    for share in sorted(th.entropy):
        t = th.entropy[share]
        runs.append(run(f"step_entropy {share:.0%}", "step_entropy", f"step_entropy-{t:.4f}.jsonl", share,
                        step_entropy_threshold=t))
    for share in sorted(th.perplexity):
        t = th.perplexity[share]
        runs.append(run(f"step_perplexity {share:.0%}", "step_perplexity", f"step_perplexity-{t:.4f}.jsonl",
                        share, step_perplexity_threshold=t))
    runs.append(run(f"adaptive {adaptive_share:.0%}", "adaptive",
                    f"adaptive-share{adaptive_share:.2f}-tau{th.adaptive_tau:.4f}.jsonl", adaptive_share,
                    tau=th.adaptive_tau, large_share=adaptive_share))
    # The variants the traces suggested (docs/tradeoff.md), each with taus of its own for the share. They
    # are compared with plain glimp and with the random run nearest in large tokens; the content probe
    # also with a random run of its own, at its reached share.
    for share in sorted(th.skip_taus):
        tau = th.skip_taus[share]
        runs.append(run(f"glimp skip {share:.0%}", "glimp", f"glimp-skip-tau{tau:.4f}.jsonl", share, variant="skip",
                        tau=tau, probe_skip=probe_skip))
    # H_init at the first token of content (probe_at: content): a random run at its own reached share too.
    for share in sorted(th.content_taus):
        tau, name = th.content_taus[share], f"{share:.0%}"
        content = run(f"glimp content {name}", "glimp", f"glimp-content-tau{tau:.4f}.jsonl", share,
                      variant="content", tau=tau, probe_at="content")
        runs += [content, run(f"random ~ glimp content {name}", "random", f"random-glimp-content-tau{tau:.4f}.jsonl",
                              share, matched=content.label, variant="content", tau=tau)]
    for share in sorted(th.after_large_taus):
        tau, after = th.taus[share], th.after_large_taus[share]
        runs.append(run(f"glimp by writer {share:.0%}", "glimp", f"glimp-tau{tau:.4f}-after-large{after:.4f}.jsonl",
                        share, variant="writer", tau=tau, tau_after_large=after))
    # Ties in the calibration record can give two shares one threshold: that is one run, not two.
    unique = {}
    for r in runs:
        unique.setdefault(r.path, r)
    return list(unique.values())


@dataclass
class Outcome:
    """What `run_interleaved` did."""

    written: int = 0
    failed: list = field(default_factory=list)  # (question id, run label, why)
    interrupted: bool = False


def run_interleaved(runs: list[BenchRun], questions: list[Question], files: dict[str, ResultsFile],
                    router_for: Callable[[BenchRun, float | None], Router],
                    on_question: Callable[[int, Question, list[dict]], None] | None = None,
                    stop: threading.Event | None = None,
                    on_result: Callable[[BenchRun, dict], None] | None = None) -> Outcome:
    """Each question through every run before the next question; (question, run) pairs on file are skipped.

    A random run's share is the pooled large share of steps its glimp run reached on the questions
    so far (this one included), so over the whole run it converges to glimp's reached share.
    Ctrl-C (or `stop`) ends it after the record in flight is dropped; everything finished is on disk.
    """
    outcome = Outcome()
    for k, question in enumerate(questions):
        written = []
        for run in runs:
            out = files[run.label]
            if (question.id, run.mode) in out.done:
                continue
            if stop is not None and stop.is_set():
                outcome.interrupted = True
                return outcome
            share = None
            if run.family == "random":
                share = matched_share(files[run.matched], questions[: k + 1])
                if share is None:  # its glimp run failed on every question so far
                    continue
            settings = run.settings(share)

            def finished(record: dict, run: BenchRun = run) -> None:
                written.append(record)
                if on_result is not None:
                    on_result(run, record)

            done = run_batch(lambda mode, recorded: router_for(run, share), [question], [run.mode], out, out.done,
                             lambda mode: settings, finished, stop)
            outcome.written += done.written
            outcome.failed += [(qid, run.label, why) for qid, _, why in done.failed]
            if done.interrupted:
                outcome.interrupted = True
                return outcome
        if on_question is not None:
            on_question(k, question, written)
    return outcome


# --- calibration: the thresholds ----------------------------------------------------------------


def draft_scores(path: Path, ids: set[str]) -> tuple[list[float], list[float]]:
    """(mean token entropies, perplexities) of every judged small-model draft in a step-entropy run."""
    entropies, perplexities = [], []
    for record in load_results(path)[0]:
        if record["id"] not in ids:
            continue
        for step in record["steps"]:
            signal = step.get("draft_signal")
            if step.get("model") == SMALL and isinstance(signal, dict) and step.get("stop_reason") in JUDGED_STOPS:
                entropies.append(signal["mean_entropy"])
                perplexities.append(signal["perplexity"])
    return entropies, perplexities


def drafts_pair(pair: PairSpec) -> PairSpec:
    """step_entropy that never rewrites: the small model drafts every step and each draft is scored."""
    return dataclasses.replace(pair, mode="step_entropy", step_entropy_threshold=math.inf)


def _small_alone_values(questions: list[Question], pair: PairSpec, make_router: Callable | None, cal_dir: Path,
                        what: str, say: Callable[[str], None]) -> tuple[float, ...]:
    """H_init of the small model's own steps on `questions` (run into `cal_dir` first unless `make_router` is None)."""
    if make_router is not None:
        cal_dir.mkdir(parents=True, exist_ok=True)
        result = calibrate.run_calibration(
            questions, pair, make_router, cal_dir,
            progress=lambda run, pending: say(f"calibration, {what or run.label}: {pending} of {len(questions)} "
                                              f"questions to run into {run.path}"))
        if result.interrupted:
            raise KeyboardInterrupt
    path = calibrate.recording_run(cal_dir).path
    ids = {q.id for q in questions}
    _check_complete(path, "small", ids)
    return calibrate.distribution_from_traces(path, SMALL, ids).values


def _recorded_run(path: Path, questions: list[Question], mode: str, settings: dict, policy, make_router: Callable | None,
                  what: str, say: Callable[[str], None]) -> None:
    """One calibration run of `policy` into `path` (resumed; nothing runs when `make_router` is None), then checked complete."""
    if make_router is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        out, done = ResultsFile.open(path, resume=True, settings_key=settings, questions=questions)
        with out:
            pending = sum((q.id, mode) not in done for q in questions)
            if pending:
                say(f"calibration, {what}: {pending} of {len(questions)} questions to run into {path}")
            result = run_batch(lambda m, recorded: make_router(policy), questions, [mode], out, done,
                               lambda m: settings)
        if result.interrupted:
            raise KeyboardInterrupt
    _check_complete(path, mode, {q.id for q in questions})


def calibrate_thresholds(questions: list[Question], pair: PairSpec, make_router: Callable | None, cal_dir: Path,
                         shares: tuple, adaptive_share: float, taus: list[float] | None = None,
                         say: Callable[[str], None] = lambda line: None,
                         step_shares: tuple | None = None,
                         draft_questions: list[Question] | None = None) -> Thresholds:
    """Thresholds from the calibration questions: small alone gives H_init, a scoring run the draft signals.

    The scoring run takes `draft_questions` (default: the same questions). With `make_router` None
    nothing runs: both runs must already be complete in `cal_dir`.
    """
    tau_of = dict(zip(shares, taus)) if taus else {}
    if not taus or adaptive_share not in tau_of:
        values = _small_alone_values(questions, pair, make_router, cal_dir, "", say)
        tau_of = tau_of or {s: calibrate.tau_for_share(values, s) for s in shares}
        adaptive_tau = tau_of[adaptive_share] if adaptive_share in tau_of else calibrate.tau_for_share(values, adaptive_share)
    else:
        adaptive_tau = tau_of[adaptive_share]
    drafts = drafts_pair(pair)
    path = cal_dir / "drafts.jsonl"
    questions = questions if draft_questions is None else draft_questions
    _recorded_run(path, questions, drafts.mode, {**pair_settings(drafts), "large_share": None}, pair_policy(drafts),
                  make_router, "scored drafts", say)
    entropies, perplexities = draft_scores(path, {q.id for q in questions})
    if not entropies:
        raise InputError(f"{path}: no scored small-model drafts to pick step thresholds from")
    step_shares = shares if step_shares is None else step_shares
    return Thresholds(tau_of, {s: calibrate.tau_for_share(entropies, s) for s in step_shares},
                      {s: calibrate.tau_for_share(perplexities, s) for s in step_shares}, adaptive_tau)


def calibrate_after_large_taus(questions: list[Question], pair: PairSpec, make_router: Callable | None,
                               path: Path, shares: tuple, say: Callable[[str], None] = lambda line: None) -> dict:
    """Taus for steps after a large one: from H_init probed after every step of large alone (--probe-baseline)."""
    settings = {**pair_settings(dataclasses.replace(pair, mode="large")), "large_share": None, "probe_baseline": True}
    _recorded_run(path, questions, "large", settings, always_large(probe=True), make_router,
                  "H_init after large steps", say)
    values = calibrate.distribution_from_traces(path, "large", {q.id for q in questions}).values
    return {s: calibrate.tau_for_share(values, s) for s in shares}


def calibrate_skip_taus(questions: list[Question], pair: PairSpec, make_router: Callable | None, cal_dir: Path,
                        shares: tuple, say: Callable[[str], None] = lambda line: None) -> dict:
    """Taus of `pair`'s own probe (its probe_skip or probe_at) from a small-alone run of its own in `cal_dir`."""
    what = f"probe_skip {pair.probe_skip!r}" if pair.probe_skip is not None else f"probe_at {pair.probe_at}"
    values = _small_alone_values(questions, pair, make_router, cal_dir, what, say)
    return {s: calibrate.tau_for_share(values, s) for s in shares}


def _check_complete(path: Path, mode: str, ids: set[str]) -> None:
    have = {r["id"] for r in load_results(path)[0] if r["mode"] == mode} if path.exists() else set()
    if not ids <= have:
        raise UsageError(f"{path}: the calibration run has {len(ids & have)} of {len(ids)} questions: "
                         "run without --report to finish it")


# --- the profile rates the records were timed under ----------------------------------------------


class ProfileLog:
    """Profiles measured while the benchmark runs, and after which profile each record was written.

    One JSON line per profile or record, on disk before the next question: a record is bounded with
    the rates measured last before it (at most `--profile-every` questions earlier), so the bound
    follows a shared machine's load through a run of hours and across sessions.
    """

    def __init__(self, path: Path):
        self.path = path

    def add_profile(self, data: dict) -> None:
        self._append({"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "profile": data})

    def add_record(self, label: str, qid: str) -> None:
        self._append({"record": [label, qid]})

    def rates(self) -> tuple[Callable[[str, str], Rates | None], int]:
        """(run label, question id) -> the rates its record was timed under, and how many profiles there are.

        A record with no entry (killed between its write and the log's) gets the median of all profiles.
        """
        measured, under, current = [], {}, None
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        for line in lines:
            try:
                entry = json.loads(line)
                if "profile" in entry:
                    current = rates_from_dict(entry["profile"])
                    measured.append(current)
                elif current is not None:
                    under[tuple(entry["record"])] = current
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
        fallback = median_rates(measured) if measured else None
        return (lambda label, qid: under.get((label, qid), fallback)), len(measured)

    def _append(self, entry: dict) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")
            file.flush()
            os.fsync(file.fileno())


class Models:
    """The pair's two models, loaded (and profiled) when the first run needs them."""

    def __init__(self, registry, pair: PairSpec, log: ProfileLog, console: Console):
        self.registry, self.pair, self.log, self.console = registry, pair, log, console
        self.engine = None

    def router(self, policy, pair: PairSpec | None = None) -> Router:
        from glimp_cli.engine import Engine

        if self.engine is None:
            self.engine = Engine.load(self.registry, self.pair, {SMALL, LARGE})
            self.profile()
        return self.engine.router(policy, pair or self.pair)

    def profile(self) -> None:
        """Measure the rates now (models loaded) and log them for the records that follow."""
        if self.engine is None:
            return
        profile = profile_engine(self.engine)
        self.log.add_profile(profile.to_dict())
        r = profile.rates
        self.console.print(f"profile: decode small {r.small.decode:.1f} / large {r.large.decode:.1f} tok/s, "
                           f"prefill small {r.small.prefill:.1f} / large {r.large.prefill:.1f} tok/s, probe "
                           f"{r.probe_vs_decode:.3f} small decode tokens. {profile.verdict()}", markup=False)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


# --- the tables -------------------------------------------------------------------------------


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


def run_records(run: BenchRun, ids: set[str] | None = None) -> list[dict]:
    """A run's records (of its mode), only of `ids` when given."""
    if not run.path.exists():
        return []
    return [r for r in load_results(run.path)[0] if r["mode"] == run.mode and (ids is None or r["id"] in ids)]


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


# --- the picture --------------------------------------------------------------------------------

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


# --- the command --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", help="pair from models.yaml (default: its default pair)")
    p.add_argument("--config", type=Path, help="models.yaml layered over the packaged one")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="evaluation questions (default: %(default)s)")
    p.add_argument("--questions", type=int, default=100, help="how many evaluation questions (after --offset)")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--calibration", type=Path, help="calibration questions (default: the shipped set)")
    p.add_argument("--calibration-questions", type=int, help="use only the first N calibration questions")
    p.add_argument("--draft-questions", type=int, help="score drafts for the step thresholds on only N calibration "
                                                       "questions (default: all of them)")
    p.add_argument("--draft-offset", type=int, default=0, help="the first calibration question of --draft-questions")
    p.add_argument("--shares", default=",".join(map(str, SHARES)), help="calibration large shares (default %(default)s)")
    p.add_argument("--step-shares", help="shares the step_entropy / step_perplexity thresholds are picked for "
                                          "(default: --shares; fewer make the run shorter)")
    p.add_argument("--taus", help="glimp taus for --shares, comma-separated, instead of calibrating them")
    p.add_argument("--adaptive-share", type=float, default=ADAPTIVE_SHARE)
    p.add_argument("--probe-skip", help="also run glimp with H_init read past leading text matching this regex "
                                        "(e.g. a list number), at taus from a small-alone run with that probe")
    p.add_argument("--probe-content", action="store_true", help="also run glimp with H_init at the first token "
                   "of content (probe_at: content), with taus of its own, and random at its reached share")
    p.add_argument("--by-writer", action="store_true", help="also run glimp with its own tau after a large step, "
                                                            "from H_init probed after large alone's steps")
    p.add_argument("--variant-shares", default="0.35", help="calibration shares of those variants (default %(default)s)")
    p.add_argument("--variant-calibration-questions", type=int,
                   help="the variants' own calibration runs on only the first N calibration questions")
    p.add_argument("--max-tokens", type=int, help="token budget per trace (default: the pair's); e.g. small for a smoke run")
    p.add_argument("--forced-answer-tokens", type=int,
                   help="tokens to state a forced answer in (default: the pair's); 0 reproduces runs made before "
                        "answers were forced")
    p.add_argument("--profile-every", type=int, default=10, help="re-measure the rates every N questions")
    p.add_argument("--runs-dir", type=Path, help="results files (default: bench/results/tradeoff-<pair>)")
    p.add_argument("--only", help="run (and report) only these runs, comma-separated labels, e.g. "
                                  "'glimp 20%%,glimp skip 35%%' to pair two of them on more questions")
    p.add_argument("--report", action="store_true", help="print the tables from the finished results only")
    p.add_argument("--plot", type=Path, help="write the accuracy / large-token-share picture (PNG) here")
    p.add_argument("--markdown", type=Path, help="write both tables as Markdown here")
    return p.parse_args(argv)


def only_runs(runs: list[BenchRun], labels: str) -> list[BenchRun]:
    """The runs named in the comma-separated `labels`, in plan order; an unknown label is refused."""
    wanted = [label.strip() for label in labels.split(",") if label.strip()]
    known = {r.label for r in runs}
    unknown = [label for label in wanted if label not in known]
    if unknown or not wanted:
        raise UsageError(f"--only {unknown[0] if unknown else labels!r}: not a run of this plan "
                         f"(runs: {', '.join(r.label for r in runs)})")
    chosen = [r for r in runs if r.label in wanted]
    for r in chosen:
        if r.matched and r.matched not in wanted:
            raise UsageError(f"--only: {r.label!r} runs at the share {r.matched!r} reaches: name that run too")
    return chosen


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--{what} {text!r}: give numbers such as 0.2,0.35,0.5") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(highlight=False, stderr=True, soft_wrap=True)
    out = Console(highlight=False, width=max(Console().width, 170))
    registry = load_registry(args.config)
    pair = registry.pair(args.pair)
    if args.max_tokens is not None:
        if args.max_tokens < 1:
            raise UsageError("--max-tokens must be at least 1")
        pair = dataclasses.replace(pair, max_tokens=args.max_tokens)
    if args.forced_answer_tokens is not None:
        if args.forced_answer_tokens < 0:
            raise UsageError("--forced-answer-tokens must be at least 0")
        pair = dataclasses.replace(pair, forced_answer_tokens=args.forced_answer_tokens)
    if args.profile_every < 1:
        raise UsageError("--profile-every must be at least 1")
    shares = _floats(args.shares, "shares")
    taus = list(_floats(args.taus, "taus")) if args.taus else None
    if taus and len(taus) != len(shares):
        raise UsageError(f"--taus gives {len(taus)} taus for {len(shares)} shares")
    step_shares = _floats(args.step_shares, "step-shares") if args.step_shares else shares
    if not shares or not all(0 < s < 1 for s in (*shares, *step_shares, args.adaptive_share)):
        raise UsageError("--shares, --step-shares and --adaptive-share must be between 0 and 1")
    variant_shares = _floats(args.variant_shares, "variant-shares")
    if not all(0 < s < 1 for s in variant_shares):
        raise UsageError("--variant-shares must be between 0 and 1")
    if args.probe_skip is not None:
        compile_probe_skip(args.probe_skip, "--probe-skip")
    runs_dir = args.runs_dir or REPO / "bench" / "results" / f"tradeoff-{pair.name}"
    if not args.report:
        runs_dir.mkdir(parents=True, exist_ok=True)
    questions, skipped = load_questions(args.data, limit=args.questions, offset=args.offset)
    cal_questions, _ = load_questions(args.calibration or calibrate.calibration_set(),
                                      limit=args.calibration_questions)
    if skipped:
        console.print(f"{args.data}: {len(skipped)} lines skipped (first: line {skipped[0].line}: {skipped[0].reason})")
    if not questions or not cal_questions:
        raise InputError("no evaluation or no calibration questions (check --questions, --offset, the files)")
    overlap = calibrate.count_overlap((q.question for q in cal_questions), (q.question for q in questions))
    if overlap:
        raise UsageError(f"{overlap} calibration questions are also evaluation questions: the taus would not be held out")

    log = ProfileLog(runs_dir / "profiles.jsonl")
    models = Models(registry, pair, log, console)
    interrupted, runs = False, None
    try:
        th = calibrate_thresholds(cal_questions, pair, None if args.report else lambda policy: models.router(policy),
                                  runs_dir / "calibration", shares, args.adaptive_share, taus,
                                  lambda line: console.print(line, markup=False), step_shares,
                                  draft_questions=cal_questions[args.draft_offset:][:args.draft_questions])
        variant_questions = cal_questions[:args.variant_calibration_questions]
        say = lambda line: console.print(line, markup=False)  # noqa: E731
        if args.probe_skip is not None:
            skip_pair = dataclasses.replace(pair, probe_skip=args.probe_skip)
            th = dataclasses.replace(th, skip_taus=calibrate_skip_taus(
                variant_questions, skip_pair, None if args.report else lambda policy: models.router(policy, skip_pair),
                runs_dir / "calibration-probe-skip", variant_shares, say))
        if args.probe_content:
            content_pair = dataclasses.replace(pair, probe_at="content")
            th = dataclasses.replace(th, content_taus=calibrate_skip_taus(
                variant_questions, content_pair,
                None if args.report else lambda policy: models.router(policy, content_pair),
                runs_dir / "calibration-probe-content", variant_shares, say))
        if args.by_writer:
            missing = [s for s in variant_shares if s not in th.taus]
            if missing:
                raise UsageError(f"--variant-shares {missing[0]:g} is not one of --shares: --by-writer routes a step "
                                 "after a small one at glimp's tau for the share")
            th = dataclasses.replace(th, after_large_taus=calibrate_after_large_taus(
                variant_questions, pair, None if args.report else lambda policy: models.router(policy),
                runs_dir / "calibration-after-large" / "large.jsonl", variant_shares, say))
        runs = plan_runs(pair, th, runs_dir, args.adaptive_share, args.probe_skip)
        if args.only:
            runs = only_runs(runs, args.only)
        console.print("thresholds: glimp tau " + ", ".join(f"{t:.4g} ({s:.0%})" for s, t in th.taus.items())
                      + "; step_entropy " + ", ".join(f"{t:.4g} ({s:.0%})" for s, t in th.entropy.items())
                      + "; step_perplexity " + ", ".join(f"{t:.4g} ({s:.0%})" for s, t in th.perplexity.items())
                      + f"; adaptive tau0 {th.adaptive_tau:.4g}"
                      + "".join(f"; skip tau {t:.4g} ({s:.0%})" for s, t in th.skip_taus.items())
                      + "".join(f"; content tau {t:.4g} ({s:.0%})" for s, t in th.content_taus.items())
                      + "".join(f"; tau after large {t:.4g} ({s:.0%})" for s, t in th.after_large_taus.items()),
                      markup=False)
        if not args.report:
            interrupted = run_all(runs, questions, models, log, console, args.profile_every)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        models.close()
    if interrupted:
        console.print(f"interrupted: every finished question is kept in {runs_dir}; rerun the same command to go on")
    if runs is None:
        return 130
    report(runs, questions, runs_dir, pair, out, args.plot, args.markdown, console)
    return 130 if interrupted else 0


def run_all(runs: list[BenchRun], questions: list[Question], models: Models, log: ProfileLog, console: Console,
            profile_every: int) -> bool:
    """Open every run's file, run what is missing question-major; True if interrupted."""
    files = {}
    try:
        for run in runs:
            files[run.label], _ = ResultsFile.open(run.path, resume=True, settings_key=run.settings(),
                                                   questions=questions)
            if files[run.label].repaired:
                console.print(f"warning: {files[run.label].repaired}")
        left = sum(any((q.id, r.mode) not in files[r.label].done for r in runs) for q in questions)
        console.print(f"{len(runs)} runs × {len(questions)} questions; {left} questions not finished by every run")
        routers: dict[str, Router] = {}
        started = time.monotonic()
        finished = 0

        def router_for(run: BenchRun, share: float | None) -> Router:
            if run.family == "random":
                return models.router(run.policy(share), run.pair)
            if run.label not in routers:
                routers[run.label] = models.router(run.policy(), run.pair)
            return routers[run.label]

        def on_question(k: int, question: Question, written: list[dict]) -> None:
            nonlocal finished
            if not written:
                return
            finished += 1
            rate = (time.monotonic() - started) / finished
            marks = " ".join(f"{'✓' if r['correct'] else '✗'}{r['wall_seconds']:.0f}s" for r in written)
            console.print(f"[{k + 1}/{len(questions)}] id {question.id}: {marks} · "
                          f"~{rate * (len(questions) - k - 1) / 60:.0f} min left", markup=False)
            if finished % profile_every == 0:
                models.profile()

        outcome = run_interleaved(runs, questions, files, router_for, on_question,
                                  on_result=lambda run, record: log.add_record(run.label, record["id"]))
    finally:
        for file in files.values():
            file.close()
    for qid, label, why in outcome.failed:
        console.print(f"question {qid} failed in {label}: {why}")
    return outcome.interrupted


def report(runs: list[BenchRun], questions: list[Question], runs_dir: Path, pair: PairSpec, out: Console,
           plot: Path | None, md: Path | None, console: Console) -> None:
    """The tables (and picture) over the evaluation questions that every run has finished."""
    wanted = {q.id for q in questions}
    records = {run.label: run_records(run, wanted) for run in runs}
    ids = common_ids(list(records.values()))
    records = {label: [r for r in recs if r["id"] in ids] for label, recs in records.items()}
    if not ids:
        console.print("no question is finished by every run yet: no table")
        return
    rates_for, profiles = ProfileLog(runs_dir / "profiles.jsonl").rates()
    rows = tradeoff_rows(runs, records, rates_for)
    pairs = comparisons(rows, records)
    for table in render_tables(rows, pairs, len(ids)):
        out.print(table)
        out.print()
    note = (f"Pair {pair.name} ({pair.small} / {pair.large}), greedy, {len(ids)} of {len(questions)} questions; "
            + (f"each record bounded at the rates profiled last before it ({profiles} profiles)." if profiles else
               "no profile recorded: no bound."))
    out.print(note, markup=False)
    if md:
        md.write_text(markdown(rows, pairs, len(ids), note), encoding="utf-8")
        console.print(f"wrote {md}")
    if plot:
        title = f"{pair.small} / {pair.large}: accuracy for large-model tokens, {len(ids)} GSM8K questions"
        console.print(f"wrote {write_plot(plot, rows, title)}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GlimpError as exc:
        if os.environ.get("GLIMP_DEBUG"):
            raise
        print(f"tradeoff: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
