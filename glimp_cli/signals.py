"""Routing signals besides H_init, from the small model's next-token logits at a step's start or its first tokens.

Each is a number where larger means "this step looks harder" (so every signal ranks steps the same way
H_init does and one threshold rule routes on any of them), and each says what it costs: how many tokens
the small model must draw before the step can be routed on it.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from glimp_cli.entropy import log_softmax


def top_probabilities(logits: np.ndarray) -> tuple[float, float]:
    """The largest and second-largest next-token probabilities."""
    _, p = log_softmax(logits)
    if p.size < 2:
        return float(p.max()), 0.0
    two = np.partition(p, -2)[-2:]
    return float(two[1]), float(two[0])


def top1_doubt(logits: np.ndarray) -> float:
    """1 - the most likely token's probability: 0 when the small model is sure of the first token."""
    return 1.0 - top_probabilities(logits)[0]


def margin_doubt(logits: np.ndarray) -> float:
    """1 - (p1 - p2), the top-1/top-2 margin turned so that a narrow margin is a high value."""
    p1, p2 = top_probabilities(logits)
    return 1.0 - (p1 - p2)


def first_tokens_entropy(entropies: Sequence[float], k: int, how: str = "mean") -> float:
    """Mean or max entropy (nats) of the first `k` drafted tokens' distributions (fewer if the step is shorter)."""
    if k < 1 or not entropies:
        raise ValueError("need k >= 1 and at least one entropy")
    first = list(entropies[:k])
    return max(first) if how == "max" else sum(first) / len(first)


def perplexity(logprobs: Sequence[float]) -> float:
    """exp(mean negative log-probability) of the tokens a draft drew."""
    return math.exp(-sum(logprobs) / len(logprobs))


# A list number that opens a line ("2. ", "10) ") says nothing about the step it opens.
MAX_ENUMERATOR_DIGITS = 3


def content_start(text: str) -> int | None:
    """Where a step's content begins: its first letter or digit that is not a list number; None while undecided.

    Whitespace, line breaks, punctuation and markup (`\\[`, `**`, `- `, `$`) are not content; a number of up
    to three digits followed by `.` or `)` and whitespace is a list number, any other number is content
    ("16 - 3"). None means the text read so far cannot tell yet (no content, or "2" that may become "2. ").
    """
    i = 0
    while i < len(text):
        char = text[i]
        if char.isalpha():
            return i
        if not char.isdigit():
            i += 1
            continue
        j = i
        while j < len(text) and text[j].isdigit():
            j += 1
        if j - i > MAX_ENUMERATOR_DIGITS or not _opens_line(text, i):
            return i  # a number that cannot be a list number is content
        if j == len(text) or (text[j] in ".)" and j + 1 == len(text)):
            return None  # "2" or "2." may still become a list number
        if text[j] in ".)" and text[j + 1].isspace():
            i = j + 1  # a list number: the content is what follows it
            continue
        return i
    return None


def _opens_line(text: str, i: int) -> bool:
    """Only whitespace between the last line break (or the start) and position `i`."""
    return not text[text.rfind("\n", 0, i) + 1:i].strip()


def content_token(token_bytes: Callable[[int], bytes], tokens: Sequence[int], cap: int) -> int | None:
    """Index of the token in which a step's content begins (see `content_start`), within its first `cap` tokens."""
    pieces: list[bytes] = []
    for token in tokens[:cap]:
        pieces.append(token_bytes(token))
        text = b"".join(pieces).decode("utf-8", errors="ignore")
        start = content_start(text)
        if start is not None:
            return token_at(pieces, text, start)
    return None


def token_at(pieces: Sequence[bytes], text: str, char: int) -> int:
    """Index of the token in which character `char` of `text` (the pieces decoded) begins.

    Counted in bytes: a character split over two tokens begins in the first.
    """
    offset = len(text[:char].encode("utf-8"))
    total = 0
    for i, piece in enumerate(pieces):
        total += len(piece)
        if total > offset:
            return i
    return len(pieces) - 1
