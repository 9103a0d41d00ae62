"""The options the commands that run a pair share, declared once, and the one function that resolves them.

A command takes the whole set with one parameter, placed where the options show in its `--help`:

    @app.command()
    @with_pair_options
    def ask(ctx: typer.Context, question: str = ..., opts: PairOptions = pair_options(), ...):

`with_pair_options` puts the options (`--pair` ... `--tau-after-large`) in that parameter's place in
the signature typer reads, and hands the command the values it got as one `PairOptions`. A command
that declares one of them its own way leaves it out: `pair_options(without=("mode",))`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console


class Mode(str, Enum):
    glimp = "glimp"
    small = "small"
    large = "large"
    random = "random"
    step_entropy = "step_entropy"
    step_perplexity = "step_perplexity"
    adaptive = "adaptive"


# Options each command declares for itself where it lists them; each can also come from the environment.
ConfigOpt = typer.Option(None, "--config", envvar="GLIMP_CONFIG", help="models.yaml layered over the packaged one.")
PairOpt = typer.Option(None, "--pair", envvar="GLIMP_PAIR", help="Pair from models.yaml (default: its default_pair).")
ProbeOpt = typer.Option(False, "--probe-baseline", help="In large mode, also probe the small model to record H_init (timings are then not a baseline).")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Say which source each setting came from, and where the models are.")

# The pair options, in the order they show in --help: parameter name -> (type, option).
PAIR_OPTIONS: dict[str, tuple[Any, Any]] = {
    "pair": (Optional[str], PairOpt),
    "small": (Optional[str], typer.Option(None, "--small", envvar="GLIMP_SMALL", help="Small model (overrides the pair's).")),
    "large": (Optional[str], typer.Option(None, "--large", envvar="GLIMP_LARGE", help="Large model (overrides the pair's).")),
    "tau": (Optional[float], typer.Option(None, "--tau", envvar="GLIMP_TAU", help="H_init threshold in nats: the small model keeps steps with H_init <= tau.")),
    "mode": (Optional[Mode], typer.Option(None, "--mode", envvar="GLIMP_MODE", help="glimp routes by H_init; small/large run one model alone; random routes at --large-share; step_entropy/step_perplexity draft with the small model and let the large one rewrite uncertain drafts.")),
    "large_share": (Optional[float], typer.Option(None, "--large-share", envvar="GLIMP_LARGE_SHARE", help="Share of steps for the large model in random mode, and the adaptive mode's target.")),
    "temperature": (Optional[float], typer.Option(None, "--temperature", envvar="GLIMP_TEMPERATURE", help="Sampling temperature (0 = greedy).")),
    "top_p": (Optional[float], typer.Option(None, "--top-p", envvar="GLIMP_TOP_P", help="Nucleus sampling mass.")),
    "seed": (Optional[int], typer.Option(None, "--seed", envvar="GLIMP_SEED", help="Seed for sampling and the random policy.")),
    "max_tokens": (Optional[int], typer.Option(None, "--max-tokens", envvar="GLIMP_MAX_TOKENS", help="Token budget of the whole trace.")),
    "max_step_tokens": (Optional[int], typer.Option(None, "--max-step-tokens", envvar="GLIMP_MAX_STEP_TOKENS", help="Token limit of one step.")),
    "delimiter": (Optional[str], typer.Option(None, "--delimiter", envvar="GLIMP_DELIMITER", help="Step delimiter; the escapes \\n \\t \\r \\\\ \\xHH \\uXXXX are read, other characters kept as typed (default: a blank line).")),
    "estimator": (Optional[str], typer.Option(None, "--estimator", envvar="GLIMP_ESTIMATOR", help="H_init estimator: exact (full vocabulary) or topk:K.")),
    "probe_skip": (Optional[str], typer.Option(None, "--probe-skip", envvar="GLIMP_PROBE_SKIP", help="Regex of leading step text (e.g. a list number) the probe reads past: H_init is the entropy of the token after it (in-process small model only).")),
    "probe_at": (Optional[str], typer.Option(None, "--probe-at", envvar="GLIMP_PROBE_AT", help="Where the probe reads H_init: 'first' (the step's first token, the paper's) or 'content' (its first token of content, past markup and a list number; in-process small model only).")),
    "tau_after_large": (Optional[float], typer.Option(None, "--tau-after-large", envvar="GLIMP_TAU_AFTER_LARGE", help="glimp's tau for a step that follows a large-model step (default: tau for every step).")),
}


@dataclass(frozen=True)
class PairOptions:
    """What a command got for the pair options: the pair's name and the settings over it (None: not given)."""

    pair: Optional[str]
    settings: dict[str, Any]  # every option the command takes but --pair, by parameter name


@dataclass(frozen=True)
class _Slot:
    """Where a command takes the pair options, and which it leaves out."""

    without: frozenset[str]


def pair_options(without: tuple[str, ...] = ()) -> Any:
    """Mark the parameter that receives the pair options; `without` names those the command leaves out."""
    unknown = set(without) - set(PAIR_OPTIONS)
    if unknown:
        raise ValueError(f"no pair option named {sorted(unknown)[0]!r}")
    return _Slot(frozenset(without))


def with_pair_options(command: Callable) -> Callable:
    """Expand the command's `pair_options()` parameter into the options, and collect them back at call time."""
    signature = inspect.signature(command, eval_str=True)
    params = list(signature.parameters.values())
    at, slot = next((i, p) for i, p in enumerate(params) if isinstance(p.default, _Slot))
    names = [name for name in PAIR_OPTIONS if name not in slot.default.without]
    options = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=PAIR_OPTIONS[name][1],
                                 annotation=PAIR_OPTIONS[name][0]) for name in names]

    @functools.wraps(command)
    def run(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in names}
        kwargs[slot.name] = PairOptions(given.pop("pair", None), given)
        return command(*args, **kwargs)

    params[at:at + 1] = options
    run.__signature__ = signature.replace(parameters=params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


def resolve_pair(ctx: typer.Context, config: Optional[Path], pair_name: Optional[str], settings: dict,
                 verbose: bool, err: Console):
    """The registry and the named pair with the given settings over it; `verbose` says where each came from."""
    from glimp_cli.api import with_settings
    from glimp_cli.config import load_registry

    registry = load_registry(config)
    pair = registry.pair(pair_name)
    pair, sources = with_settings(registry, pair, _overrides(ctx, settings))
    if verbose:
        err.print(f"config: {', '.join(str(f) for f in registry.files)}", markup=False)
        err.print(f"pair: {pair.name}", markup=False)
        for key, source in sources.items():
            err.print(f"  {key} = {getattr(pair, key)!r}  ({source})", markup=False)
    return registry, pair


def _overrides(ctx: typer.Context, values: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Settings given on the command line or in the environment, with their source."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        source = ctx.get_parameter_source(key)
        # Compared by name: typer may carry its own copy of click's ParameterSource enum.
        origin = "environment" if getattr(source, "name", "") == "ENVIRONMENT" else "flag"
        if key == "delimiter":
            from glimp_cli.config import parse_delimiter

            value = parse_delimiter(value, _named(ctx, key, origin))
        if isinstance(value, Enum):
            value = value.value
        out[key] = (value, origin)
    return out


def _named(ctx: typer.Context, key: str, origin: str) -> str:
    """How the user gave parameter `key`: its flag (`--delimiter`) or its variable (`GLIMP_DELIMITER`)."""
    param = next(p for p in ctx.command.params if p.name == key)
    return param.envvar if origin == "environment" else param.opts[0]
