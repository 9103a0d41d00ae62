"""Entropy of the small model's next-token distribution, in nats."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from glimp_cli.errors import BackendError, ConfigError

# An estimator maps full-vocabulary logits to an entropy in nats.
Estimator = Callable[[np.ndarray], float]


def _checked_top(z: np.ndarray) -> float:
    """The largest logit, after the one rule's checks (see log_softmax)."""
    top = z.max() if z.size else -math.inf  # max propagates NaN: one pass finds NaN, +inf and all -inf
    if not math.isfinite(top):
        nan = int(np.isnan(z).sum())
        what = (f"{nan} NaN logit{'s' if nan != 1 else ''}" if nan else
                "a +inf logit" if top > 0 else "no finite logit")
        raise BackendError(f"the model produced {what} (of {z.size}): its output is broken "
                           "(a damaged GGUF, or an overflow in a GPU/quantised build)")
    return float(top)


def _shifted(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(logits - max, exp of that, its sum) in float64, after the one rule's checks (see log_softmax)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - _checked_top(z)
    p = np.exp(z)
    return z, p, float(p.sum())  # the sum is >= 1: the top entry is exp(0)


def log_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities, probabilities) of softmax(logits) in float64, at temperature 1.

    The one rule for every entropy and score in glimp: a -inf logit is a masked token (probability 0);
    a NaN or +inf logit, or no finite logit at all, raises BackendError instead of routing on it.
    """
    z, p, total = _shifted(logits)
    return z - math.log(total), p / total


def entropy_and_logprob(logits: np.ndarray, token: int | None = None) -> tuple[float, float | None]:
    """Entropy (nats) of softmax(logits) and the log-probability of `token` (None without one)."""
    # The probe's hot path, once per step: H = log(total) - sum(p z) / total on the shifted logits, in
    # the logits' own precision (llama.cpp's float32: exp is 3x cheaper, the error ~1e-6 nats) with
    # float64 sums. Not np.dot: OpenBLAS wakes its threads for it, and with llama.cpp's threads on
    # the same cores that took 4 ms instead of 0.02 (bench/engine.py's probe row).
    z = np.asarray(logits)
    if z.dtype not in (np.float32, np.float64):
        z = z.astype(np.float64)
    z = z - z.dtype.type(_checked_top(z))
    p = np.exp(z)
    total = float(p.sum(dtype=np.float64))  # >= 1: the top entry is exp(0)
    with np.errstate(invalid="ignore"):
        weighted = float(np.multiply(p, z).sum(dtype=np.float64))
    if math.isnan(weighted):  # only masked tokens can do this (0 * -inf): their true contribution is 0
        kept = p > 0
        weighted = float(np.multiply(p[kept], z[kept]).sum(dtype=np.float64))
    log_total = math.log(total)
    entropy = log_total - weighted / total
    return (entropy if entropy > 0 else 0.0), (None if token is None else float(z[token]) - log_total)


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
