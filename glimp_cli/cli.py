"""The `glimp` command line: parses options and wires the library parts together."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from glimp_cli import __version__
from glimp_cli.cli_options import (
    ConfigOpt, PairOpt, PairOptions, ProbeOpt, VerboseOpt, pair_options, resolve_pair, with_pair_options,
)
from glimp_cli.errors import GlimpError

DEBUG_ENV = "GLIMP_DEBUG"

app = typer.Typer(
    help="Fast collaborative reasoning: a small model probes each step, a large model takes the hard ones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def user_errors():
    """Turn glimp errors into one line on stderr and an exit code; $GLIMP_DEBUG keeps tracebacks."""
    try:
        yield
    except GlimpError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        err.print(f"glimp: error: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


@app.command()
@with_pair_options
def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question to reason about."),
    opts: PairOptions = pair_options(),
    probe_baseline: bool = ProbeOpt,
    config: Optional[Path] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the whole trace as one JSON object."),
    verbose: bool = VerboseOpt,
):
    """Answer one question, routing each reasoning step between the small and the large model."""
    with user_errors():
        from glimp_cli.engine import Engine, pair_policy
        from glimp_cli.errors import UsageError
        from glimp_cli.grading import extract_answer
        from glimp_cli.render import LiveView, summary_table

        if not question.strip():
            raise UsageError("the question is empty")
        registry, pair_spec = resolve_pair(ctx, config, opts.pair, opts.settings, verbose, err)
        policy = pair_policy(pair_spec, probe_baseline)
        engine = Engine.load(registry, pair_spec, set(policy.models))
        if verbose:
            for role, backend in engine.backends.items():
                err.print(f"{role}: {backend.name} from {getattr(backend, 'path', '?')}", markup=False)
        out = Console(highlight=False)
        view = None if as_json else LiveView(out, probing=policy.needs_probe)
        trace = engine.router(policy).run(question, view)
        interrupted = False
        try:
            for step in trace:
                if view:
                    view.step_finished(step)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            engine.close()
        answer = extract_answer(trace.answer_text) if trace.steps else None
        if as_json:
            record = trace.to_dict()
            record.update(pair=pair_spec.name, small=pair_spec.small, large=pair_spec.large, tau=pair_spec.tau,
                          mode=pair_spec.mode, estimator=pair_spec.estimator, extracted_answer=answer,
                          timing=policy.timing, version=__version__)
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.print()
            out.print(summary_table(trace, answer))
        if interrupted:
            raise typer.Exit(130)


@app.command()
def models(
    config: Optional[Path] = ConfigOpt,
):
    """List the models and pairs of the registry, where each GGUF comes from and whether it is here."""
    with user_errors():
        from glimp_cli.config import load_registry
        from glimp_cli.render import registry_tables

        registry = load_registry(config)
        out = Console(highlight=False)
        for table in registry_tables(registry):
            out.print(table)
            out.print()


ConcurrencyOpt = typer.Option(
    1, "--concurrency", envvar="GLIMP_CONCURRENCY",
    help="Questions in flight at once (threads), for models behind servers (backend openai) only. "
         "Each question's steps stay in order; results are written as questions finish.")

BatchModeOpt = typer.Option(
    None, "--mode", envvar="GLIMP_MODE",
    help="Modes to run: glimp, small, large, random, step_entropy, step_perplexity, all of them, or a comma "
         "list such as glimp,large (default: the pair's mode). Without --large-share, random runs at the "
         "large share glimp reached.")


def _batch_modes(value: str) -> list[str]:
    from glimp_cli.batch import order_modes
    from glimp_cli.errors import UsageError
    from glimp_cli.policies import MODES

    names = [name.strip().lower() for name in value.split(",")]
    if not all(names):
        raise UsageError(f"--mode {value!r} has an empty entry")
    return order_modes(m for name in names for m in (MODES if name == "all" else (name,)))


@app.command()
@with_pair_options
def batch(
    ctx: typer.Context,
    questions: Path = typer.Argument(..., help="JSON Lines file, one question a line (GSM8K or AIME fields)."),
    output: Path = typer.Option(..., "--output", "-o", help="Results file: JSON Lines, one line per question and mode."),
    mode: Optional[str] = BatchModeOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the results file: skip each (question, mode) it holds. Settings must match."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results the file holds (emptied once the models have loaded)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Run at most this many questions (after --offset)."),
    offset: int = typer.Option(0, "--offset", help="Skip this many questions first."),
    shuffle: bool = typer.Option(False, "--shuffle", help="Shuffle the questions with --seed before --offset and --limit."),
    question_field: Optional[str] = typer.Option(None, "--question-field", help="Field holding the question (default: question, else problem)."),
    answer_field: Optional[str] = typer.Option(None, "--answer-field", help="Field holding the reference answer (default: answer)."),
    id_field: Optional[str] = typer.Option(None, "--id-field", help="Field holding the question id (default: id, else the line number)."),
    probe_baseline: bool = ProbeOpt,
    # batch's --mode is its own (above): a list of modes to run, not one mode to resolve into the pair.
    opts: PairOptions = pair_options(without=("mode",)),
    config: Optional[Path] = ConfigOpt,
    verbose: bool = VerboseOpt,
    concurrency: int = ConcurrencyOpt,
):
    """Run a question file through one or more modes into a resumable results file, then print the report.

    Each finished question is on disk before the next starts. Ctrl-C stops at once: the question in flight is dropped, everything finished is kept, and --resume picks up from there.

    Exit status:
    0 every question ran in every mode;
    1 an error stopped the batch (finished results are kept), or some questions failed (their prompt does not fit a model's context; --resume retries them);
    2 bad usage;
    3 the batch ran, but some input lines were skipped (each shown on stderr as FILE:LINE: reason);
    130 interrupted.
    """
    with user_errors():
        from glimp_cli.batch import (
            ResultsFile, batch_settings, check_random_share, pending_modes, run_batch,
        )
        from glimp_cli.engine import Engine, pair_policy
        from glimp_cli.errors import InputError, UsageError
        from glimp_cli.progress import BatchProgress
        from glimp_cli.questions import load_questions, question_source

        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        registry, pair_spec = resolve_pair(ctx, config, opts.pair, opts.settings, verbose, err)
        modes = _batch_modes(mode) if mode is not None else _batch_modes(pair_spec.mode)
        # Random runs at a share the user set (flag, environment or models.yaml), else at glimp's.
        share_given = opts.settings["large_share"] is not None or "large_share" in registry.pair_keys.get(pair_spec.name, ())
        share = pair_spec.large_share if share_given else None
        if verbose:
            err.print(f"modes: {', '.join(modes)}", markup=False)

        loaded, skipped = load_questions(questions, question_field, answer_field, id_field, limit, offset,
                                         shuffle, pair_spec.seed)
        for line in skipped:
            err.print(f"{questions}:{line.line}: {line.reason}", markup=False)
        if not loaded:
            raise InputError(f"{questions}: no questions to run"
                             + (" (check --offset and --limit)" if offset or limit is not None else ""))

        def settings_for_mode(name: str) -> dict:
            # Adaptive runs at the pair's share as its target; random at the given share, else glimp's.
            target = share if name == "random" else pair_spec.large_share if name == "adaptive" else None
            return {**key, "large_share": target}

        def policy_for(name: str, settings: dict):
            given = {} if settings["large_share"] is None else {"large_share": settings["large_share"]}
            return pair_policy(dataclasses.replace(pair_spec, mode=name, **given), probe_baseline)

        if not resume:
            check_random_share(modes, share, loaded)  # before anything is opened
        # Locates each model file the modes use: a missing one fails here, before the results are touched.
        used = set().union(*(pair_policy(dataclasses.replace(pair_spec, mode=m), probe_baseline).models
                             for m in modes))
        key = batch_settings(registry, pair_spec, used, probe_baseline,
                             question_source(questions, limit, offset, shuffle, pair_spec.seed))
        out, done = ResultsFile.open(output, resume, settings_for_mode, overwrite, loaded, questions)
        with out:
            if out.repaired:
                err.print(f"glimp: warning: {out.repaired}", markup=False)
            todo = pending_modes(loaded, modes, done)
            check_random_share(todo, share, loaded, out)
            roles = set().union(*(policy_for(m, settings_for_mode(m)).models for m in todo))
            pending = {m: sum((q.id, m) not in done for q in loaded) for m in todo}
            _check_concurrency(registry, pair_spec, roles, concurrency)
            outcome, interrupted = None, False
            engine = None
            extra: list = []  # one more Engine per extra --concurrency worker (remote models only)
            try:
                if todo:
                    engine = Engine.load(registry, pair_spec, roles)
                    extra += [Engine.load(registry, pair_spec, roles) for _ in range(concurrency - 1)]
                    with BatchProgress(err, pending) as progress:

                        def router_for_mode(name: str, settings: dict):
                            progress.mode_started(name, settings)
                            return engine.router(policy_for(name, settings))

                        outcome = run_batch(router_for_mode, loaded, modes, out, done, settings_for_mode,
                                            progress.result, concurrency=concurrency,
                                            worker_router=lambda name, settings, i: extra[i - 1].router(
                                                policy_for(name, settings)))
                    interrupted = outcome.interrupted
            except KeyboardInterrupt:  # while loading, or between questions
                interrupted = True
            finally:
                if engine is not None:
                    engine.close()
                for worker_engine in extra:
                    worker_engine.close()

        _batch_summary(output, len(loaded), outcome, interrupted)
        _print_report(output, as_json=False)
        if interrupted:
            raise typer.Exit(130)
        if outcome is not None and outcome.failed:
            raise typer.Exit(1)
        if skipped:
            raise typer.Exit(3)


def _check_concurrency(registry, pair_spec, roles: set, concurrency: int) -> None:
    """--concurrency above 1 only when every model the batch uses is behind a server."""
    from glimp_cli.backends import REMOTE_BACKENDS
    from glimp_cli.errors import UsageError

    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if concurrency == 1:
        return
    for role in sorted(roles):
        spec = registry.model(getattr(pair_spec, role))
        if spec.backend not in REMOTE_BACKENDS:
            raise UsageError(f"--concurrency {concurrency} needs models behind servers, but the {role} model "
                             f"{spec.name!r} runs in process (backend {spec.backend}): use --concurrency 1")


def _batch_summary(output: Path, n_questions: int, outcome, interrupted: bool) -> None:
    """One line on stderr for what the run did, and one per failed question."""
    if outcome is None and not interrupted:
        err.print(f"nothing to do: {output} holds all {n_questions} questions in every mode", markup=False)
        return
    if outcome is not None:
        for qid, name, why in outcome.failed:
            err.print(f"glimp: question {qid} failed in {name} mode: {why}", markup=False)
        line = f"wrote {outcome.written} results to {output}"
        if outcome.already_done:
            line += f" ({outcome.already_done} were there already)"
        if outcome.random_share is not None:
            line += f"; random mode ran at large share {outcome.random_share:.1%}"
        err.print(line, markup=False)
    if interrupted:
        err.print(f"interrupted: finished results are kept in {output}; continue with --resume", markup=False)


def _print_report(path: Path, as_json: bool) -> None:
    from glimp_cli.report import load_results, render_table, rows_to_json, summarize

    records, warnings = load_results(path)
    for warning in warnings:
        err.print(f"glimp: warning: {warning}", markup=False)
    rows = summarize(records)
    if as_json:
        sys.stdout.write(json.dumps(rows_to_json(rows), ensure_ascii=False, indent=2) + "\n")
    elif rows:
        out = Console(highlight=False)
        if not out.is_terminal and "COLUMNS" not in os.environ:
            out.width = max(out.width, 160)  # a log or pipe: room for every column, not 80 squeezed ones
        out.print()
        out.print(render_table(rows))
    else:
        err.print(f"no results in {path} yet", markup=False)


@app.command()
def report(
    results: Path = typer.Argument(..., help="A results file written by glimp batch (also of an interrupted run)."),
    as_json: bool = typer.Option(False, "--json", help="Print the per-mode rows as JSON."),
):
    """Summarize a batch results file per mode: accuracy with a 95% interval, latency, tokens, large share.

    Lines that cannot be read (such as the torn last line of a killed run) are skipped with a warning on stderr.

    Exit status: 0 done (also with skipped lines); 1 the file cannot be read.
    """
    with user_errors():
        _print_report(results, as_json)


@app.command()
@with_pair_options
def calibrate(
    ctx: typer.Context,
    questions: Optional[Path] = typer.Argument(
        None, help="Calibration questions, JSON Lines as for batch (default: the shipped set, the last 100 GSM8K test problems)."),
    traces: Optional[Path] = typer.Option(None, "--traces", help="Read H_init from a glimp batch results file instead of running the pair."),
    traces_mode: Optional[str] = typer.Option(None, "--traces-mode", help="With --traces: the mode whose steps to read (default: small if the file has it, else glimp, ...)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many questions (after --offset)."),
    offset: int = typer.Option(0, "--offset", help="Skip this many questions first."),
    question_field: Optional[str] = typer.Option(None, "--question-field", help="Field holding the question (default: question, else problem)."),
    answer_field: Optional[str] = typer.Option(None, "--answer-field", help="Field holding the reference answer (default: answer)."),
    id_field: Optional[str] = typer.Option(None, "--id-field", help="Field holding the question id (default: id, else the line number)."),
    large_share: Optional[float] = typer.Option(None, "--large-share", help="Pick tau so that this share of the recorded steps goes to the large model."),
    sweep: bool = typer.Option(False, "--sweep", help="Run batch at the taus of --shares, the adaptive policy, small and large alone; print the frontier."),
    shares: str = typer.Option("0.25,0.5,0.75", "--shares", help="Large shares whose taus (quantiles of the record) the sweep runs."),
    adaptive: bool = typer.Option(False, "--adaptive/--no-adaptive", help="Also sweep the adaptive per-question policy at each share (experimental: see the README)."),
    warmup: int = typer.Option(2, "--warmup", help="Adaptive policy: steps routed at the fixed tau before a trace's own quantile takes over."),
    objective: Optional[str] = typer.Option(
        None, "--objective", help="Pick tau from the sweep: fastest-within-drop (of large alone, --max-drop) "
                                  "or most-accurate-under-latency (--max-latency-ratio)."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="Accuracy points below large alone that fastest-within-drop accepts."),
    max_latency_ratio: float = typer.Option(0.8, "--max-latency-ratio", help="Mean latency / large alone's that most-accurate-under-latency accepts."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="Where the runs' batch files go and are reused (default: a folder per pair, questions and settings in the glimp cache)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: the H_init histogram, and the frontier after --sweep (needs the plot extra)."),
    write: bool = typer.Option(False, "--write", help="Store the chosen tau in the pair's entry of your models.yaml (--config, else the user file)."),
    exclude: Optional[Path] = typer.Option(None, "--exclude", help="Evaluation questions: refuse when calibration questions overlap them."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Calibrate even when questions overlap --exclude."),
    # calibrate records the small model alone, and its --large-share (above) picks tau rather than routes.
    opts: PairOptions = pair_options(without=("mode", "large_share", "tau_after_large")),
    config: Optional[Path] = ConfigOpt,
    verbose: bool = VerboseOpt,
):
    """Pick tau from data: record every step's H_init on calibration questions, show the distribution, choose.

    Without --traces the small model runs alone over the questions (its first token is the probe, so every step's H_init comes free); that run is kept in --runs-dir and reused. --large-share picks tau as a quantile of the record; --sweep --objective picks it from measured accuracy and latency.

    Exit status: 0 done; 1 an error (or the objective found no tau to write); 2 bad usage; 130 interrupted.
    """
    with user_errors():
        from glimp_cli.calibrate import CalibrateOptions, check_options, run_command
        from glimp_cli.config import user_config
        from glimp_cli.sources import cache_dir

        options = CalibrateOptions(
            questions=questions, traces=traces, traces_mode=traces_mode, limit=limit, offset=offset,
            question_field=question_field, answer_field=answer_field, id_field=id_field, large_share=large_share,
            sweep=sweep, shares=shares, adaptive=adaptive, warmup=warmup, objective=objective, max_drop=max_drop,
            max_latency_ratio=max_latency_ratio, runs_dir=runs_dir, plot=plot,
            write_to=(config or user_config()) if write else None, exclude=exclude, allow_overlap=allow_overlap)
        check_options(options)
        registry, pair_spec = resolve_pair(ctx, config, opts.pair, opts.settings, verbose, err)
        out = Console(highlight=False)
        if not out.is_terminal and "COLUMNS" not in os.environ:
            out.width = max(out.width, 160)  # a log or pipe: room for the frontier's columns
        status = run_command(options, registry, pair_spec, out, err, cache_dir())
        if status:
            raise typer.Exit(status)


@app.command()
def profile(
    pair: Optional[str] = PairOpt,
    config: Optional[Path] = ConfigOpt,
    step_tokens: int = typer.Option(40, "--step-tokens", min=1, help="Tokens per reasoning step: the catch-up batch measured, and tokens per probe in the bound."),
    as_json: bool = typer.Option(False, "--json", help="Print the rates, the bound and the verdict as one JSON object."),
):
    """Measure this machine's decode, catch-up prefill and probe costs, and the latency glimp can reach.

    Takes a few seconds after the models load. Prints glimp's time relative to large alone at large shares 0 to 1, the break-even share, and whether routing saves wall time here or only large-model tokens.
    """
    with user_errors():
        from glimp_cli.config import load_registry
        from glimp_cli.engine import Engine
        from glimp_cli.profile import profile_engine, render_profile

        registry = load_registry(config)
        pair_spec = registry.pair(pair)
        engine = Engine.load(registry, pair_spec, {"small", "large"})
        try:
            measured = profile_engine(engine, step_tokens)
        finally:
            engine.close()
        if as_json:
            sys.stdout.write(json.dumps(measured.to_dict(), ensure_ascii=False) + "\n")
        else:
            out = Console(highlight=False)
            if not out.is_terminal and "COLUMNS" not in os.environ:
                out.width = max(out.width, 120)  # a log or pipe: the tables on one line each
            out.print(render_profile(measured))


@app.command()
@with_pair_options
def serve(
    ctx: typer.Context,
    pair: Optional[list[str]] = typer.Option(
        None, "--pair", envvar="GLIMP_PAIR", metavar="PAIR", help="Pair to serve; repeat for several (default: the registry's default_pair)."),
    host: str = typer.Option("127.0.0.1", "--host", envvar="GLIMP_HOST", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8000, "--port", envvar="GLIMP_PORT", help="Port to listen on (0: any free port)."),
    workers: int = typer.Option(1, "--workers", envvar="GLIMP_WORKERS", help="Workers per pair, each with its own loaded models (one request at a time each)."),
    queue: int = typer.Option(8, "--queue", envvar="GLIMP_QUEUE", help="Requests per pair that may wait for a worker; past that the answer is 503 with Retry-After."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="NAME of an environment variable holding the API key; then every /v1 route needs Authorization: Bearer KEY."),
    max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", help="Largest request body accepted (413 past it)."),
    cors_origin: Optional[list[str]] = typer.Option(
        None, "--cors-origin", metavar="ORIGIN", help="Let pages from ORIGIN (scheme://host[:port], or * for any) call the API from a browser; repeat or separate with commas (default: none)."),
    quiet: bool = typer.Option(False, "--quiet", help="No access-log line per request (method, path, status, seconds, model, tokens) on stderr."),
    prompt_cache: bool = typer.Option(True, "--prompt-cache/--no-prompt-cache", help="Keep a conversation's earlier turns in the KV cache of the worker that served them, so its next turn evaluates only what is new (logits then differ from a fresh start's in the last digits, as with llama-server's cache_prompt)."),
    # serve's --pair is its own (first above): repeatable, one set of workers per pair.
    opts: PairOptions = pair_options(without=("pair",)),
    config: Optional[Path] = ConfigOpt,
    verbose: bool = VerboseOpt,
):
    """Serve the router behind an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a live page at /.

    Settings given here are the defaults of every request; a request overrides temperature, top_p, seed and max_tokens with the OpenAI fields, and tau, mode, large_share and max_step_tokens as extra body fields. Needs the serve extra of glimp (starlette, uvicorn, sse-starlette).
    """
    with user_errors():
        from glimp_cli.serve import ServeOptions
        from glimp_cli.serve import serve as run_server

        specs, registry = [], None
        for name in dict.fromkeys(pair or [None]):
            registry, spec = resolve_pair(ctx, config, name, opts.settings, verbose, err)
            specs.append(spec)
        stopped = run_server(ServeOptions(registry, specs, host, port, workers, queue, api_key_env, max_body_bytes,
                                          tuple(cors_origin or ()), quiet=quiet, prompt_cache=prompt_cache,
                                          log=lambda line: err.print(line, markup=False)))
        err.print(f"glimp serve: stopped ({stopped})", markup=False)


def version_callback(value: bool):
    if value:
        typer.echo(f"glimp {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                       help="Print the version and exit.")):
    """glimp: GlimpRouter on llama.cpp."""


def main() -> None:
    app()
