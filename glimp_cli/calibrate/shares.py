"""tau for a target large share: a quantile of the recorded H_init values, with how sure that is."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from glimp_cli.errors import InputError, UsageError
from glimp_cli.policies import share_threshold
from glimp_cli.report import wilson_interval


def tau_text(tau: float) -> str:
    """tau as the tables and file names show it: 4 decimals, or -inf / inf."""
    return f"{tau:.4f}" if math.isfinite(tau) else ("-inf" if tau < 0 else "inf")


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
