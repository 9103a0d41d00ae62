"""bench/tradeoff.py's thresholds, picked on the calibration questions for target large shares.

glimp's tau from H_init of small alone's steps (and each variant's from a small-alone run with its own probe),
the step signals' thresholds from the scores of small-model drafts, the tau after a large step from H_init
probed after large alone's steps. Every calibration run is a resumable results file; with no router
(`--report`) nothing runs, and each must already be complete.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from glimp_cli import calibrate
from glimp_cli.batch import ResultsFile, pair_settings, run_batch
from glimp_cli.config import PairSpec
from glimp_cli.engine import pair_policy
from glimp_cli.errors import InputError, UsageError
from glimp_cli.policies import SMALL, always_large
from glimp_cli.questions import Question
from glimp_cli.report import load_results

# Drafts the large model rewrites are judged at these step ends (see router.write_small).
JUDGED_STOPS = frozenset({"delimiter", "max_step_tokens", "max_tokens", "repetition"})


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
