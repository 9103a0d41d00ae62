"""Routing policies: small callables that map a step's H_init to the model that writes it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence

import numpy as np

from glimp_cli.errors import ConfigError

Role = Literal["small", "large"]
SMALL: Role = "small"
LARGE: Role = "large"


@dataclass(frozen=True)
class DraftScore:
    """Step-level signals of a small-model draft, from its per-token distributions (nats)."""

    mean_entropy: float
    perplexity: float


@dataclass(frozen=True)
class Policy:
    """Chooses `small` or `large` per step.

    `needs_probe` False means no H_init is computed; `large_answers` False lets the small model
    write the final answer too (small-alone); `models` are the models it ever uses.
    """

    name: str
    choose: Callable[[float | None, np.random.Generator], Role]
    needs_probe: bool = True
    large_answers: bool = True
    models: frozenset = frozenset({"small", "large"})
    timing: str = "routed"  # "baseline" when its latencies include no routing work at all
    # Draft-then-verify policies: the small model drafts every step, and the large model rewrites
    # it when `rewrite(draft)` says so (the step-level signals the paper compares H_init against).
    rewrite: Callable[[DraftScore], bool] | None = None
    # Stateful policies (e.g. adaptive thresholds) give each trace a fresh copy of themselves.
    for_trace: Callable[[], "Policy"] | None = None


    def __call__(self, h_init: float | None, rng: np.random.Generator) -> Role:
        return self.choose(h_init, rng)


def threshold(tau: float) -> Policy:
    """GlimpRouter: the small model keeps a step whose H_init <= tau."""
    return Policy(f"glimp(tau={tau:g})", lambda h, rng: SMALL if h is not None and h <= tau else LARGE)


def threshold_by_writer(tau: float, tau_after_large: float) -> Policy:
    """GlimpRouter with a tau that depends on who wrote the previous step: `tau_after_large` after a large one.

    The previous writer is the one this policy chose for the trace's previous probed step (the first
    step is routed at `tau`); each trace gets a fresh copy (`for_trace`).
    """
    name = f"glimp(tau={tau:g}, after_large={tau_after_large:g})"

    def fresh() -> Policy:
        last: list[Role] = []

        def choose(h: float | None, rng: np.random.Generator) -> Role:
            limit = tau_after_large if last and last[-1] == LARGE else tau
            role = SMALL if h is not None and h <= limit else LARGE
            last[:] = [role]
            return role

        return Policy(name, choose)

    return replace(fresh(), for_trace=fresh)


def always_small() -> Policy:
    """Small-alone baseline: every reasoning step by the small model."""
    return Policy("small", lambda h, rng: SMALL, large_answers=False, models=frozenset({SMALL}),
                  timing="baseline")


def always_large(probe: bool = False) -> Policy:
    """Large-alone baseline; `probe=True` records H_init at the cost of small-model catch-up."""
    models = frozenset({SMALL, LARGE}) if probe else frozenset({LARGE})
    timing = "probed (not a baseline)" if probe else "baseline"
    return Policy("large", lambda h, rng: LARGE, needs_probe=probe, models=models, timing=timing)


def random_share(large_share: float) -> Policy:
    """Random baseline: each step goes to the large model with probability `large_share`."""
    if not 0.0 <= large_share <= 1.0:
        raise ConfigError(f"large_share {large_share} is not between 0 and 1")
    return Policy(
        f"random(large_share={large_share:g})",
        lambda h, rng: LARGE if rng.random() < large_share else SMALL,
    )


def step_entropy(threshold_nats: float) -> Policy:
    """Draft every step; the large model rewrites drafts whose mean token entropy exceeds the threshold."""
    return Policy(f"step_entropy(>{threshold_nats:g})", lambda h, rng: SMALL,
                  rewrite=lambda d: d.mean_entropy > threshold_nats)


def step_perplexity(threshold: float) -> Policy:
    """Draft every step; the large model rewrites drafts whose perplexity exceeds the threshold."""
    return Policy(f"step_perplexity(>{threshold:g})", lambda h, rng: SMALL,
                  rewrite=lambda d: d.perplexity > threshold)


def share_threshold(values: Sequence[float], share: float) -> float:
    """The threshold above which a `share` of `values` lie: the k-th smallest, k = round(n * (1 - share)).

    Rounding is half up; k = 0 (share near 1) gives -inf, so every value is above it. On ties the
    share above may come out lower than asked: count it, do not assume it.
    """
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"large share {share} is not between 0 and 1")
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values to take a threshold from")
    k = math.floor(len(ordered) * (1.0 - share) + 0.5)
    return -math.inf if k == 0 else float(ordered[k - 1])


ADAPTIVE_SHARE = 0.3  # target large share of an adaptive policy when none is given
ADAPTIVE_WARMUP = 2  # steps routed at the fixed tau before a trace has a quantile of its own


def adaptive(target_share: float, tau0: float, warmup: int = ADAPTIVE_WARMUP) -> Policy:
    """A per-question threshold that holds each trace's large share near `target_share`.

    The first `warmup` probed steps of a trace are routed at the fixed `tau0` (the calibrated tau for
    the same share). After that, with t probed steps so far (this one included) of which L went to
    the large model, the trace owes d = target_share * t - L large steps: a step goes to the large
    model when its H_init lies above `share_threshold(seen, clip(d, 0, 1))` of the H_init values
    this trace has seen, itself included. So a step is taken by the large model when the trace is
    behind its share and the step is among its harder ones (at d >= 1 whatever it is), and never
    when the trace is at or ahead of its share. A fixed tau holds the share only on average over
    questions (easy ones get no large step, hard ones many); this holds it within each question,
    whatever the scale of that question's entropies. Each trace gets a fresh copy (`for_trace`).
    """
    if not 0.0 <= target_share <= 1.0:
        raise ConfigError(f"adaptive large share {target_share} is not between 0 and 1")
    if warmup < 0:
        raise ConfigError(f"adaptive warm-up {warmup} must not be negative")
    name = f"adaptive(large_share={target_share:g}, warmup={warmup}, tau0={tau0:g})"

    def fresh() -> Policy:
        seen: list[float] = []
        large = 0

        def choose(h: float | None, rng: np.random.Generator) -> Role:
            nonlocal large
            if h is None:
                return LARGE
            seen.append(h)
            if len(seen) <= warmup:
                tau = tau0
            else:
                owed = min(max(target_share * len(seen) - large, 0.0), 1.0)
                tau = share_threshold(seen, owed)
            role = SMALL if h <= tau else LARGE
            large += role == LARGE
            return role

        return Policy(name, choose)

    return replace(fresh(), for_trace=fresh)


MODES = ("glimp", "small", "large", "random", "step_entropy", "step_perplexity", "adaptive")


def make_policy(mode: str, tau: float, large_share: float, probe_baseline: bool = False,
                step_entropy_threshold: float = 1.0, step_perplexity_threshold: float = 3.0,
                adaptive_share: float | None = None, adaptive_warmup: int = ADAPTIVE_WARMUP,
                tau_after_large: float | None = None) -> Policy:
    """The policy for a `--mode`; `probe_baseline` makes large mode record H_init.

    `adaptive` targets `adaptive_share` (ADAPTIVE_SHARE when None) and warms up at `tau`; glimp with
    `tau_after_large` routes a step after a large one at that tau instead.
    """
    if mode == "glimp":
        return threshold(tau) if tau_after_large is None else threshold_by_writer(tau, tau_after_large)
    if mode == "small":
        return always_small()
    if mode == "large":
        return always_large(probe=probe_baseline)
    if mode == "random":
        return random_share(large_share)
    if mode == "step_entropy":
        return step_entropy(step_entropy_threshold)
    if mode == "step_perplexity":
        return step_perplexity(step_perplexity_threshold)
    if mode == "adaptive":
        return adaptive(ADAPTIVE_SHARE if adaptive_share is None else adaptive_share, tau, adaptive_warmup)
    raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
