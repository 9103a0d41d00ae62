"""A scripted fake backend for exact, fast tests of the routing loop through the real seam.

Each step of a script says what H_init the small model's probe shows and what text each model
writes if it gets the step. The tokenizer is byte-level with a few multi-character tokens (`The`,
` answer`, four spaces, `é` as one two-byte token) so merged tokens and characters split over several
tokens (`€` is three one-byte tokens) reach the fast tests. It mimics SmolLM2's trap too: a text that
ENDS in a blank line tokenizes it as one merged token, running text as two newlines; a probe after the
merged form shows H_init + WRONG_FORM_PENALTY, so a loop that uses the wrong form is caught.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from glimp_cli.backends.base import ContextFull, StepStop, TextSink, Written, write_tokens
from glimp_cli.sampling import Sampling

EOG, BOS, MERGED_BLANK_LINE = 0, 1, 2
FIRST_BYTE = 3  # token FIRST_BYTE + b stands for the single byte b
MULTI = (b"The", b" answer", b" is", b"    ", "\u00e9".encode())  # multi-character / multi-byte tokens
FIRST_MULTI = FIRST_BYTE + 256
N_VOCAB = 1024
PROMPT_END = "A:\n"  # the fake's prompt template must end its prompt with this (and no step may hold it)
END = "<eos>"  # a scripted text ending in this ends generation instead of writing the delimiter
WRONG_FORM_PENALTY = 1.0


def _pieces() -> dict[int, bytes]:
    table = {MERGED_BLANK_LINE: b"\n\n"}
    table.update({FIRST_BYTE + b: bytes([b]) for b in range(256)})
    table.update({FIRST_MULTI + i: piece for i, piece in enumerate(MULTI)})
    return table


PIECES = _pieces()


def tokenize_bytes(data: bytes) -> list[int]:
    """Greedy longest match over the multi-character tokens, else one token per byte."""
    ids, i = [], 0
    while i < len(data):
        for k, piece in sorted(enumerate(MULTI), key=lambda kp: -len(kp[1])):
            if data.startswith(piece, i):
                ids.append(FIRST_MULTI + k)
                i += len(piece)
                break
        else:
            ids.append(FIRST_BYTE + data[i])
            i += 1
    return ids


@dataclass(frozen=True)
class ScriptedStep:
    """What happens at one step: the probe's H_init and each model's text for it."""

    h_init: float
    small: str
    large: str
    # (prefix of the small text, H) pairs: the small model's entropy right after that prefix (a probe
    # that reads past a list marker sees it); elsewhere inside a step the fake is near-certain.
    after: tuple[tuple[str, float], ...] = ()


def logits_with_entropy(h: float, top: int, n_vocab: int = N_VOCAB) -> np.ndarray:
    """Logits whose softmax has entropy `h` nats and its maximum at `top`."""
    rest = n_vocab - 1

    def entropy(p: float) -> float:
        q = (1 - p) / rest
        return -(p * math.log(p) if p > 0 else 0.0) - (rest * q * math.log(q) if q > 0 else 0.0)

    h = min(max(h, 0.0), math.log(n_vocab))
    lo, hi = 1.0 / n_vocab, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if entropy(mid) > h else (lo, mid)
    p = (lo + hi) / 2
    probs = np.full(n_vocab, (1 - p) / rest)
    probs[top] = p
    return np.log(np.maximum(probs, 1e-300)).astype(np.float32)


class FakeBackend:
    """Writes its role's scripted text; counts evaluated tokens like a real backend."""

    context = "tokens"

    def __init__(self, name: str, role: str, script: Sequence[ScriptedStep], n_ctx: int = 4096,
                 writes_merged: bool = False, delimiter: str = "\n\n"):
        self.name = name
        self.role = role
        self.script = list(script)
        self.n_ctx = n_ctx
        self.n_vocab = N_VOCAB
        self.chat_template = None
        self.bos_token = ""
        self.eos_token = ""
        self.evaluated = 0
        self.extend_calls: list[tuple[int, ...]] = []
        self._tokens: list[int] = []
        self.closed = False
        self.writes_merged = writes_merged  # write a blank line as the merged token, not as two newlines
        self.delimiter = delimiter.encode()  # what separates the script's steps in the context
        self.logits_positions: list[int] = []  # context length at each next_logits call
        # One output buffer rewritten by every call, as llama.cpp's is: a caller that keeps an array
        # across `extend` sees it change, so the fast tests catch aliasing.
        self._logits = np.zeros(N_VOCAB, dtype=np.float32)

    @property
    def tokens(self) -> Sequence[int]:
        return self._tokens

    def tokenize(self, text: str, special: bool = False, bos: bool = False) -> list[int]:
        ids = tokenize_bytes(text.encode())
        newline = FIRST_BYTE + ord("\n")
        if text.endswith("\n\n") and ids[-2:] == [newline, newline]:
            ids[-2:] = [MERGED_BLANK_LINE]
        return ([BOS] if bos else []) + ids

    def token_bytes(self, token: int) -> bytes:
        return PIECES.get(token, b"")

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def extend(self, tokens: Sequence[int]) -> None:
        if len(self._tokens) + len(tokens) > self.n_ctx:
            raise ContextFull(self.name)
        self._tokens += list(tokens)
        self.evaluated += len(tokens)
        self.extend_calls.append(tuple(tokens))

    def rewind(self, n_tokens: int) -> None:
        del self._tokens[n_tokens:]

    def _trace_bytes(self) -> bytes:
        data = b"".join(self.token_bytes(t) for t in self._tokens)
        marker = PROMPT_END.encode()
        # The last one: a conversation's earlier turns in the prompt end with it too.
        return data.rsplit(marker, 1)[1] if marker in data else b""

    def next_logits(self) -> np.ndarray:
        self._logits[:] = self._compute_logits()
        return self._logits

    def _compute_logits(self) -> np.ndarray:
        self.logits_positions.append(len(self._tokens))
        trace = self._trace_bytes()
        index = trace.count(self.delimiter)
        partial = trace.rsplit(self.delimiter, 1)[-1]
        target = getattr(self.script[index], self.role) if index < len(self.script) else END
        full = (target[: -len(END)] + END if target.endswith(END) else target).encode()
        if not target.endswith(END):
            full += self.delimiter
        remaining = full[len(partial):] if full.startswith(partial) else END.encode()
        if not remaining or remaining.startswith(END.encode()):
            top = EOG
        elif self.writes_merged and remaining.startswith(b"\n\n"):
            top = MERGED_BLANK_LINE
        else:
            top = tokenize_bytes(remaining)[0]
        if partial == b"" and self.role == "small" and index < len(self.script):
            h = self.script[index].h_init
            if self._tokens and self._tokens[-1] == MERGED_BLANK_LINE:
                h += WRONG_FORM_PENALTY
            return logits_with_entropy(h, top)
        if self.role == "small" and index < len(self.script):
            for prefix, h in self.script[index].after:
                if partial == prefix.encode():
                    return logits_with_entropy(h, top)
        logits = np.zeros(N_VOCAB, dtype=np.float32)
        logits[top] = 60.0
        return logits

    def write(self, first_token: int | None, stop: StepStop, sampling: Sampling,
              rng: np.random.Generator, on_text: TextSink | None = None,
              first_logits: np.ndarray | None = None) -> Written:
        return write_tokens(self, first_token, stop, sampling, rng, on_text, first_logits)

    def close(self) -> None:
        self.closed = True
