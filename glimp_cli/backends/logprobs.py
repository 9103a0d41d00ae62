"""The log-probabilities a completions server reports, in either format, and the estimates read from them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from glimp_cli.entropy import entropy_and_logprob, topk_entropy_from_logprobs


@dataclass(frozen=True)
class Position:
    """One generated token's log-probabilities as a server reported them."""

    text: str
    logprob: float  # the generated token's (NaN when the server gave none)
    top: list[tuple[str, float]]  # (token text, logprob) of the top-K; a masked token is -inf


def _logprob(value) -> float:
    """A server's log-probability; null is a token it gave no number for (masked, like a -inf logit)."""
    return -math.inf if value is None else float(value)


def _chosen(value) -> float:
    """The generated token's own log-probability; NaN when the server gave none."""
    return math.nan if value is None else float(value)


def parse_logprobs(logprobs: object) -> list[Position]:
    """The positions of one event's `logprobs`, in either format servers use for completions.

    The legacy OpenAI one (llama-cpp-python's server, vLLM): parallel `tokens` / `token_logprobs` /
    `top_logprobs` (a dict keyed by token text, so tokens with equal text collapse into one entry).
    The chat-style one (llama.cpp's `llama-server`): `content`, a list of {token, logprob, top_logprobs:
    [{token, logprob}]}, which keeps tokens with equal text apart.
    """
    if not isinstance(logprobs, dict):
        return []
    content = logprobs.get("content")
    if isinstance(content, list):
        return [Position(str(c.get("token", "")), _chosen(c.get("logprob")),
                         [(str(t.get("token", "")), _logprob(t.get("logprob"))) for t in c.get("top_logprobs") or []
                          if isinstance(t, dict)])
                for c in content if isinstance(c, dict)]
    tops = logprobs.get("top_logprobs")
    if not tops:
        return []
    texts = logprobs.get("tokens") or []
    chosen = logprobs.get("token_logprobs") or []
    return [Position(str(texts[i]) if i < len(texts) else "",
                     _chosen(chosen[i] if i < len(chosen) else None),
                     [(str(k), _logprob(v)) for k, v in (top or {}).items()])
            for i, top in enumerate(tops)]


def position_entropy(top: list[tuple[str, float]], k: int) -> float:
    """Renormalised entropy (nats) of the K best entries of one position's top log-probabilities."""
    values = np.array([lp for _, lp in top], dtype=np.float64)
    return topk_entropy_from_logprobs(np.sort(values)[::-1][:k])


def topk_score(logprobs: np.ndarray, position: int) -> tuple[float, float]:
    """Renormalised top-K entropy and the chosen entry's log-probability as the server reported it (nats)."""
    entropy, _ = entropy_and_logprob(logprobs)
    return entropy, float(logprobs[position])
