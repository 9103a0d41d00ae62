"""Entropy of the small model's next-token distribution, in nats."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from glimp_cli.errors import ConfigError

# An estimator maps full-vocabulary logits to an entropy in nats.
Estimator = Callable[[np.ndarray], float]


def exact_entropy(logits: np.ndarray) -> float:
    """Shannon entropy (nats) of softmax(logits) over the full vocabulary, at temperature 1."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    # -inf logits (masked tokens) contribute exp(-inf) = 0 and must not give 0 * -inf = nan.
    finite = np.isfinite(z)
    if not finite.all():
        z = z[finite]
    p = np.exp(z)
    total = p.sum()
    return float(math.log(total) - (p * z).sum() / total)


def topk_entropy_from_logprobs(logprobs: np.ndarray) -> float:
    """Entropy (nats) of the top log-probabilities renormalised to sum to 1, as the paper's code does."""
    lp = np.asarray(logprobs, dtype=np.float64)
    lp = lp[np.isfinite(lp)]
    if lp.size == 0:
        return 0.0
    z = lp - lp.max()
    p = np.exp(z)
    total = p.sum()
    return float(math.log(total) - (p * z).sum() / total)


def topk_entropy(logits: np.ndarray, k: int) -> float:
    """Top-k estimate from full logits: the k largest log-probabilities, renormalised (<= ln k)."""
    z = np.asarray(logits, dtype=np.float64)
    if k < z.size:
        z = z[np.argpartition(z, -k)[-k:]]
    return topk_entropy_from_logprobs(z)


@dataclass(frozen=True)
class EstimatorSpec:
    """A parsed `estimator` setting: `exact` or `topk:K`."""

    name: str
    k: int | None = None

    def __str__(self) -> str:
        return self.name if self.k is None else f"{self.name}:{self.k}"

    def from_logits(self, logits: np.ndarray) -> float:
        """H_init from full-vocabulary logits."""
        if self.k is None:
            return exact_entropy(logits)
        return topk_entropy(logits, self.k)


def parse_estimator(text: str) -> EstimatorSpec:
    """Parse `exact` or `topk:K` (K >= 2); raise ConfigError naming the value otherwise."""
    text = str(text).strip()
    if text == "exact":
        return EstimatorSpec("exact")
    if text.startswith("topk:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 2:
            return EstimatorSpec("topk", k)
    raise ConfigError(f"estimator {text!r} is not 'exact' or 'topk:K' with K >= 2")
