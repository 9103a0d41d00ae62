"""bench/tradeoff.py's runs: which policies run on the evaluation questions (the plan), the question-major
loop that runs them, and the models and the profile log the records are timed under.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console

from glimp_cli.batch import ResultsFile, matched_share, pair_settings, run_batch
from glimp_cli.config import PairSpec
from glimp_cli.engine import pair_policy
from glimp_cli.policies import LARGE, SMALL
from glimp_cli.profile import Rates, median_rates, profile_engine, rates_from_dict
from glimp_cli.questions import Question
from glimp_cli.report import load_results
from glimp_cli.router import Router

from tradeoff_thresholds import Thresholds

ADAPTIVE_SHARE = 0.35


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



def run_records(run: BenchRun, ids: set[str] | None = None) -> list[dict]:
    """A run's records (of its mode), only of `ids` when given."""
    if not run.path.exists():
        return []
    return [r for r in load_results(run.path)[0] if r["mode"] == run.mode and (ids is None or r["id"] in ids)]



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
