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

The parts: the plan, the loop and the profile log in bench/tradeoff_runs.py, the thresholds in
bench/tradeoff_thresholds.py, the statistics and tables in bench/tradeoff_tables.py, the picture in
bench/tradeoff_plot.py; this file is the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from glimp_cli import calibrate
from glimp_cli.batch import ResultsFile
from glimp_cli.config import PairSpec, compile_probe_skip, load_registry
from glimp_cli.errors import GlimpError, InputError, UsageError
from glimp_cli.questions import Question, load_questions
from glimp_cli.report import common_ids
from glimp_cli.router import Router

from common import DEFAULT_DATA, REPO
from tradeoff_plot import write_plot
from tradeoff_runs import ADAPTIVE_SHARE, BenchRun, Models, ProfileLog, plan_runs, run_interleaved, run_records
from tradeoff_tables import comparisons, markdown, render_tables, tradeoff_rows
from tradeoff_thresholds import calibrate_after_large_taus, calibrate_skip_taus, calibrate_thresholds

SHARES = (0.2, 0.35, 0.5)


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
