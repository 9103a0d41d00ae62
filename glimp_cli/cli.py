"""The `glimp` command line: parses options and wires the library parts together."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console

from glimp_cli import __version__
from glimp_cli.errors import GlimpError

DEBUG_ENV = "GLIMP_DEBUG"

app = typer.Typer(
    help="Fast collaborative reasoning: a small model probes each step, a large model takes the hard ones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Mode(str, Enum):
    glimp = "glimp"
    small = "small"
    large = "large"
    random = "random"


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


# Options shared by the commands that run a pair; each can also come from the environment.
ConfigOpt = typer.Option(None, "--config", envvar="GLIMP_CONFIG", help="models.yaml layered over the packaged one.")
PairOpt = typer.Option(None, "--pair", envvar="GLIMP_PAIR", help="Pair from models.yaml [default: its default_pair].")
SmallOpt = typer.Option(None, "--small", envvar="GLIMP_SMALL", help="Small model (overrides the pair's).")
LargeOpt = typer.Option(None, "--large", envvar="GLIMP_LARGE", help="Large model (overrides the pair's).")
TauOpt = typer.Option(None, "--tau", envvar="GLIMP_TAU", help="H_init threshold in nats: the small model keeps steps with H_init <= tau.")
ModeOpt = typer.Option(None, "--mode", envvar="GLIMP_MODE", help="glimp routes by H_init; small/large run one model alone; random routes at --large-share.")
ShareOpt = typer.Option(None, "--large-share", envvar="GLIMP_LARGE_SHARE", help="Share of steps for the large model in random mode.")
TempOpt = typer.Option(None, "--temperature", envvar="GLIMP_TEMPERATURE", help="Sampling temperature (0 = greedy).")
TopPOpt = typer.Option(None, "--top-p", envvar="GLIMP_TOP_P", help="Nucleus sampling mass.")
SeedOpt = typer.Option(None, "--seed", envvar="GLIMP_SEED", help="Seed for sampling and the random policy.")
MaxTokOpt = typer.Option(None, "--max-tokens", envvar="GLIMP_MAX_TOKENS", help="Token budget of the whole trace.")
MaxStepOpt = typer.Option(None, "--max-step-tokens", envvar="GLIMP_MAX_STEP_TOKENS", help="Token limit of one step.")
DelimOpt = typer.Option(None, "--delimiter", envvar="GLIMP_DELIMITER", help="Step delimiter; escapes such as \\n are read [default: a blank line].")
EstOpt = typer.Option(None, "--estimator", envvar="GLIMP_ESTIMATOR", help="H_init estimator: exact (full vocabulary) or topk:K.")
ProbeOpt = typer.Option(False, "--probe-baseline", help="In large mode, also probe the small model to record H_init (timings are then not a baseline).")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Say which source each setting came from, and where the models are.")


def _overrides(ctx: click.Context, values: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Settings given on the command line or in the environment, with their source."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        source = ctx.get_parameter_source(key)
        # Compared by name: typer may carry its own copy of click's ParameterSource enum.
        origin = "environment" if getattr(source, "name", "") == "ENVIRONMENT" else "flag"
        if key == "delimiter":
            value = codecs.decode(value, "unicode_escape")
        if isinstance(value, Enum):
            value = value.value
        out[key] = (value, origin)
    return out


def _resolve(ctx: click.Context, config: Optional[Path], pair_name: Optional[str], values: dict, verbose: bool):
    from glimp_cli.config import apply_overrides, load_registry

    registry = load_registry(config)
    pair = registry.pair(pair_name)
    overrides = _overrides(ctx, values)
    pair, sources = apply_overrides(pair, overrides, registry.pair_keys.get(pair.name, frozenset()))
    for role in ("small", "large"):
        registry.model(getattr(pair, role))  # a broken or unknown model fails here, before loading
    if verbose:
        err.print(f"config: {', '.join(str(f) for f in registry.files)}", markup=False)
        err.print(f"pair: {pair.name}", markup=False)
        for key, source in sources.items():
            err.print(f"  {key} = {getattr(pair, key)!r}  ({source})", markup=False)
    return registry, pair


@app.command()
def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question to reason about."),
    pair: Optional[str] = PairOpt,
    small: Optional[str] = SmallOpt,
    large: Optional[str] = LargeOpt,
    tau: Optional[float] = TauOpt,
    mode: Optional[Mode] = ModeOpt,
    large_share: Optional[float] = ShareOpt,
    temperature: Optional[float] = TempOpt,
    top_p: Optional[float] = TopPOpt,
    seed: Optional[int] = SeedOpt,
    max_tokens: Optional[int] = MaxTokOpt,
    max_step_tokens: Optional[int] = MaxStepOpt,
    delimiter: Optional[str] = DelimOpt,
    estimator: Optional[str] = EstOpt,
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
        values = dict(small=small, large=large, tau=tau, mode=mode, large_share=large_share,
                      temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens,
                      max_step_tokens=max_step_tokens, delimiter=delimiter, estimator=estimator)
        registry, pair_spec = _resolve(ctx, config, pair, values, verbose)
        policy = pair_policy(pair_spec, probe_baseline)
        engine = Engine.load(registry, pair_spec, set(policy.models))
        if verbose:
            for role, backend in engine.backends.items():
                err.print(f"{role}: {backend.name} from {getattr(backend, 'path', '?')}", markup=False)
        out = Console(highlight=False)
        view = None if as_json else LiveView(out)
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
