"""Draw a token from logits with top-p and temperature, reproducibly from a numpy Generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from glimp_cli.entropy import log_softmax


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of a pair; temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0


def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick the next token id: argmax when greedy, else a tempered draw from the nucleus.

    The order is llama.cpp's (its sampler chain, llama-cpp-python's server and llama-server): the
    nucleus is cut from the untempered distribution, then the temperature reshapes what is kept,
    so an in-process model and a served one draw from the same set.
    """
    if sampling.temperature <= 0:
        token = int(np.argmax(logits))
        if not math.isfinite(float(logits[token])):
            log_softmax(logits)  # NaN, +inf or nothing finite: the one error for broken logits
        return token
    z = np.asarray(logits, dtype=np.float64)
    ids = None
    if sampling.top_p < 1.0:
        logp, p = log_softmax(z)
        ids = _nucleus(p, sampling.top_p)
        z = logp[ids]
    z = z / sampling.temperature
    top = z.max()
    if not math.isfinite(top):
        log_softmax(logits)  # raises the one error for broken logits
    q = np.exp(z - top)
    q /= q.sum()
    drawn = int(rng.choice(q.size, p=q))
    return drawn if ids is None else int(ids[drawn])


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Ids of the smallest set of most likely tokens whose mass reaches top_p, most likely first.

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
