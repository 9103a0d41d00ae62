"""The Backend protocol, and the token loop shared by backends that evaluate token by token."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from time import perf_counter
from typing import Callable, Literal, Protocol, Sequence

import numpy as np

from glimp_cli.entropy import entropy_and_logprob
from glimp_cli.sampling import Sampling, sample_token
from glimp_cli.signals import content_start

TextSink = Callable[[str], None]


class ContextFull(Exception):
    """Raised by `extend` when the tokens would not fit the model's context window."""


@dataclass(frozen=True)
class StepStop:
    """When a step ends: at the delimiter, a stop string, an answer marker, or a token limit.

    `answer_markers` end the step as soon as one appears (a small-model draft handing the answer over).
    `final_markers` make the step that carries one the answer: it no longer ends at the first delimiter
    but runs until the answer is complete (see `answer_complete`), with up to `answer_tokens` tokens.
    """

    delimiter: str
    stop_strings: tuple[str, ...] = ()
    answer_markers: tuple[str, ...] = ()
    max_new_tokens: int = 256
    final_markers: tuple[str, ...] = ()
    answer_tokens: int | None = None  # the step's token limit once a final marker appeared
    answer_until_eos: bool = False  # the answer after the marker runs to end of generation (reasoning models)
    answering: bool = False  # the step is the answer from its first token (the marker is in the context already)

    def limit(self, answering: bool) -> int:
        """The step's token limit, before and after a final marker appeared."""
        if answering and self.answer_tokens is not None:
            return max(self.answer_tokens, self.max_new_tokens)
        return self.max_new_tokens


@dataclass(frozen=True)
class Written:
    """What one `write` produced: the step text (delimiter excluded) and every generated token."""

    text: str
    tokens: tuple[int, ...]
    reason: str  # delimiter | eos | stop_string | marker | length | context_full
    seconds: float
    entropies: tuple[float, ...] = ()  # per generated token, when the write was scored
    logprobs: tuple[float, ...] = ()


class Backend(Protocol):
    """One model with its own context (KV cache) that lives for a whole trace."""

    context: Literal["tokens"]  # the router keeps this context in token ids (a TextBackend's: "text")
    name: str
    n_ctx: int
    n_vocab: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    evaluated: int  # tokens this backend has evaluated since it was created

    @property
    def tokens(self) -> Sequence[int]:
        """The token ids now in the context."""

    def tokenize(self, text: str, special: bool = False, bos: bool = False) -> list[int]:
        """Token ids of `text`."""

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for."""

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens."""

    def extend(self, tokens: Sequence[int]) -> None:
        """Evaluate `tokens` after the context; raise ContextFull if they do not fit."""

    def rewind(self, n_tokens: int) -> None:
        """Drop the context after its first `n_tokens` tokens."""

    def next_logits(self) -> np.ndarray:
        """Full-vocabulary logits of the next token given the context.

        The array may be the engine's own output buffer (llama.cpp's is): it is valid only until the
        next `extend`, `rewind` or `next_logits`. A caller that keeps it longer copies it.
        """

    def write(self, first_token: int | None, stop: StepStop, sampling: Sampling,
              rng: np.random.Generator, on_text: TextSink | None = None,
              first_logits: np.ndarray | None = None) -> Written:
        """Generate one step, starting with `first_token` when given (the kept probe token).

        With `first_logits` (the distribution `first_token` was drawn from) the write is scored:
        every token's entropy and log-probability are recorded.
        """

    def close(self) -> None:
        """Release the model."""


class TextBackend(Protocol):
    """A model behind a server that takes text prompts (`context = "text"`).

    The router sets `prompt` per question and keeps `text` equal to prompt + steps, each followed by
    `delimiter` (a server refusing the bare prompt raises ContextLimitError), and sets `top_k`
    from the pair's `topk:K` estimator. `next_logits` returns the K best log-probabilities of the next
    token (best first), so the estimator renormalises them and `sample_token` draws a position among
    them; `write(first_token=position)` continues `text` with that candidate's text. `write` never
    changes `text`: the router settles the step into it. `probe_form` says how the probe saw the
    delimiter (recorded in the trace).
    """

    context: Literal["text"]
    name: str
    n_ctx: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    evaluated: int
    prompt: str
    text: str
    delimiter: str
    top_k: int
    probe_form: str | None

    def next_logits(self) -> np.ndarray:
        """Top-K log-probabilities of the next token after `text` (a new array each call)."""

    def write(self, first_token: int | None, stop: StepStop, sampling: Sampling,
              rng: np.random.Generator, on_text: TextSink | None = None,
              first_logits: np.ndarray | None = None) -> Written:
        """Generate one step after `text`, starting with candidate `first_token` of the last probe."""

    def close(self) -> None:
        """Release the connection."""


class StepScanner:
    """Finds where a step ends in decoded text, and streams only text that is surely the step's."""

    def __init__(self, stop: StepStop, on_text: TextSink | None):
        self._stop = stop
        # errors="replace" only for bytes that can never become a character; an incomplete character
        # at the end is held back in the decoder (see `close`).
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._on_text = on_text
        self._watched = (stop.delimiter, *stop.stop_strings, *stop.answer_markers, *stop.final_markers)
        self.buffer = ""
        self.text = ""
        self._emitted = 0
        self._final_at: int | None = 0 if stop.answering else None  # where the answer begins (after its marker)

    @property
    def answering(self) -> bool:
        """True once a final marker appeared: the step is the answer."""
        return self._final_at is not None

    def feed(self, piece: bytes) -> str | None:
        """Add one token's bytes; return why the step ends here, or None."""
        self.buffer += self._decoder.decode(piece)
        end = self._end()
        if end is None:
            self._emit(len(self.buffer) - self._held_back())
            return None
        self.text = self.buffer[: end[0]]
        self._emit(len(self.text))
        return end[1]

    def close(self) -> None:
        """End the step where generation stopped (end of generation, a token limit).

        Bytes of a character cut by the limit are dropped, never turned into U+FFFD: the text must
        be what both contexts can hold.
        """
        self.text = self.buffer
        self._emit(len(self.text))

    def _end(self) -> tuple[int, str] | None:
        found = []
        for s in self._stop.stop_strings:
            i = self.buffer.find(s)
            if i >= 0:
                found.append((i, "stop_string"))
        for m in self._stop.answer_markers:
            i = self.buffer.find(m)
            if i >= 0:
                found.append((i, "marker"))
        i = self._first_delimiter()
        if self._final_at is None:
            hits = [(j, m) for m in self._stop.final_markers if (j := self.buffer.find(m)) >= 0]
            if hits and (i < 0 or min(hits)[0] < i):
                j, m = min(hits)
                self._final_at = j + len(m)
        if self._final_at is not None:
            i = self._answer_end()
        if i >= 0:
            found.append((i, "delimiter"))
        return min(found) if found else None

    def _first_delimiter(self) -> int:
        delim = self._stop.delimiter
        i = self.buffer.find(delim)
        # A delimiter before any content would make an empty step or one of markup alone (`\[`, `---`,
        # a list number): it stays inside the step, which then goes on with the line it opens.
        while i >= 0 and content_start(self.buffer[:i + len(delim)]) is None:
            i = self.buffer.find(delim, i + 1)
        return i

    def _answer_end(self) -> int:
        """The first delimiter after the answer itself, or -1 while the answer is not complete."""
        if self._stop.answer_until_eos:
            return -1
        start = self._final_at
        i = self.buffer.find(self._stop.delimiter, start)
        while i >= 0 and not answer_complete(self.buffer[start:i]):
            i = self.buffer.find(self._stop.delimiter, i + 1)
        return i

    def _held_back(self) -> int:
        """Length of the longest tail that could still grow into a watched string."""
        tail = 0
        for w in self._watched:
            for k in range(min(len(w) - 1, len(self.buffer)), tail, -1):
                if self.buffer.endswith(w[:k]):
                    tail = k
                    break
        return tail

    def _emit(self, upto: int) -> None:
        if self._on_text and upto > self._emitted:
            self._on_text(self.buffer[self._emitted:upto])
        self._emitted = max(self._emitted, upto)


def has_content(text: str) -> bool:
    """Whether text holds a letter or a digit: a step of its own, as opposed to markup or whitespace."""
    return any(c.isalnum() for c in text)


def answer_complete(after_marker: str) -> bool:
    """Whether the text after an answer marker holds an answer yet: a letter or digit.

    `The answer is:` then the number on the next line must not end at that line break; `The answer
    is 4.` may.
    """
    return has_content(after_marker)


def write_tokens(backend: Backend, first_token: int | None, stop: StepStop, sampling: Sampling,
                 rng: np.random.Generator, on_text: TextSink | None = None,
                 first_logits: np.ndarray | None = None) -> Written:
    """The decode loop: sample, evaluate, scan; the end-of-generation token is never evaluated."""
    start = perf_counter()
    scanner = StepScanner(stop, on_text)
    tokens: list[int] = []
    scored = first_logits is not None
    entropies: list[float] = []
    logprobs: list[float] = []
    token, logits = first_token, first_logits
    reason = "length"
    while len(tokens) < stop.limit(scanner.answering):
        if token is None:
            logits = backend.next_logits()
            token = sample_token(logits, sampling, rng)
        if backend.is_eog(token):
            reason = "eos"
            break
        if scored:
            entropy, logprob = _score(logits, token)
            entropies.append(entropy)
            logprobs.append(logprob)
        try:
            backend.extend((token,))
        except ContextFull:
            reason = "context_full"
            break
        tokens.append(token)
        ended = scanner.feed(backend.token_bytes(token))
        if ended:
            reason = ended
            break
        token = None
    if reason in ("eos", "length", "context_full"):
        scanner.close()
    return Written(scanner.text, tuple(tokens), reason, perf_counter() - start,
                   tuple(entropies), tuple(logprobs))


def _score(logits: np.ndarray, token: int) -> tuple[float, float]:
    """Entropy (nats) of softmax(logits) and the log-probability of `token`, at temperature 1."""
    return entropy_and_logprob(logits, token)
