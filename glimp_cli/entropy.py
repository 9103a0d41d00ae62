"""Entropy of the small model's next-token distribution, in nats."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from glimp_cli.errors import BackendError, ConfigError

# An estimator maps full-vocabulary logits to an entropy in nats.
Estimator = Callable[[np.ndarray], float]


def log_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities, probabilities) of softmax(logits) in float64, at temperature 1.

    The one rule for every entropy and score in glimp: a -inf logit is a masked token (probability 0);
    a NaN or +inf logit, or no finite logit at all, raises BackendError instead of routing on it.
    """
    z = np.asarray(logits, dtype=np.float64)
    top = z.max() if z.size else -math.inf  # max propagates NaN: one pass finds NaN, +inf and all -inf
    if not math.isfinite(top):
        nan = int(np.isnan(z).sum())
        what = (f"{nan} NaN logit{'s' if nan != 1 else ''}" if nan else
                "a +inf logit" if top > 0 else "no finite logit")
        raise BackendError(f"the model produced {what} (of {z.size}): its output is broken "
                           "(a damaged GGUF, or an overflow in a GPU/quantised build)")
    z = z - top
    p = np.exp(z)
    total = p.sum()  # >= 1: the top entry is exp(0)
    return z - math.log(total), p / total


def entropy_and_logprob(logits: np.ndarray, token: int | None = None) -> tuple[float, float | None]:
    """Entropy (nats) of softmax(logits) and the log-probability of `token` (None without one)."""
    logp, p = log_softmax(logits)
    masked = np.isneginf(logp)
    # A masked token adds 0 * -inf = nan to the sum; its true contribution is 0.
    entropy = -float(np.dot(p[~masked], logp[~masked])) if masked.any() else -float(np.dot(p, logp))
    return (entropy if entropy > 0 else 0.0), (None if token is None else float(logp[token]))


def exact_entropy(logits: np.ndarray) -> float:
    """Shannon entropy (nats) of softmax(logits) over the full vocabulary, at temperature 1."""
    return entropy_and_logprob(logits)[0]


def topk_entropy_from_logprobs(logprobs: np.ndarray) -> float:
    """Entropy (nats) of the top log-probabilities renormalised to sum to 1, as the paper's code does."""
    return entropy_and_logprob(logprobs)[0]


def topk_entropy(logits: np.ndarray, k: int) -> float:
    """Top-k estimate from full logits: the k largest log-probabilities, renormalised (<= ln k)."""
    z = np.asarray(logits, dtype=np.float64)
    if k < z.size:
        if np.isnan(z).any():  # argpartition would rank NaN as largest; let the one rule reject it
            return exact_entropy(z)
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
