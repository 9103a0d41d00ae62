"""Draw a token from logits with temperature and top-p, reproducibly from a numpy Generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of a pair; temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0


def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick the next token id: argmax when greedy, else a draw from the tempered nucleus."""
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / sampling.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if sampling.top_p >= 1.0:
        return int(rng.choice(p.size, p=p))
    ids = _nucleus(p, sampling.top_p)
    q = p[ids] / p[ids].sum()
    return int(ids[rng.choice(ids.size, p=q)])


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Ids of the smallest set of most likely tokens whose mass reaches top_p.

    A full sort of a 262k vocabulary costs more than a decode step, so widen a partial
    selection until it holds the nucleus; the result is the same as with a full sort.
    """
    k = 64
    while True:
        k = min(k, p.size)
        top = np.argpartition(p, -k)[-k:] if k < p.size else np.arange(p.size)
        top = top[np.argsort(-p[top], kind="stable")]
        cum = np.cumsum(p[top])
        if cum[-1] >= top_p or k == p.size:
            cut = int(np.searchsorted(cum, top_p)) + 1
            return top[: min(cut, k)]
        k *= 4
