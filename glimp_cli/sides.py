"""The two kinds of side: what keeps one model's context equal to the prompt and the steps so far.

A side is the router's view of one model of the pair: `TokenSide` for a model in process (the context is
tokens, each step in canonical tokens), `TextSide` for a model behind a server (the context is text).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

from glimp_cli.backends.base import Backend, ContextFull, Written
from glimp_cli.config import PromptFormat
from glimp_cli.errors import ContextLimitError
from glimp_cli.policies import Role
from glimp_cli.prompts import Conversation, asking, render_prompt


@dataclass
class ModelSlot:
    """A backend with its prompt format and stop strings, as one side of the pair."""

    role: Role
    backend: Backend | None  # None when the policy never needs this model (a baseline)
    prompt: PromptFormat
    stop: tuple[str, ...] = ()


class TokenSide:
    """Keeps one model's context equal to prompt + steps, each step in canonical tokens."""

    def __init__(self, slot: ModelSlot, delimiter: str, prompt_cache: bool = False):
        self.slot = slot
        self.backend = slot.backend
        self.delimiter = delimiter
        # Keep the cached part of a conversation's earlier turns (see `start`).
        self.prompt_cache = prompt_cache
        self._header: tuple[int, ...] | None = None
        self.started = False
        self.steps_seen = 0
        self.context_len = 0
        self.prompt_len = 0
        self.evaluated_at_start = 0

    @functools.cached_property
    def delim_tokens(self) -> tuple[int, ...]:
        # H_init must not depend on who wrote the previous step. A tokenizer may merge a
        # trailing delimiter into one token (SmolLM2: "\n\n" -> 1116) while the model writes
        # it as it appears in running text (198, 198), and the probe after the two forms
        # differs by ~0.8 nats on average (NOTES.md). So every context ends each step with
        # the form the tokenizer gives when more text follows: the form the model writes.
        sentinel = "A"
        full = self.backend.tokenize(self.delimiter + sentinel)
        target = self.delimiter.encode()
        for k in range(len(full), 0, -1):
            if b"".join(self.backend.token_bytes(t) for t in full[:k]) == target:
                return tuple(full[:k])
        return tuple(self.backend.tokenize(self.delimiter))

    def continuation(self, text: str) -> list[int]:
        """Tokens of `text` as it is tokenized in running text, right after a delimiter."""
        if not text:
            return []
        toks = self.backend.tokenize(self.delimiter + text)
        n = len(self.delim_tokens)
        if tuple(toks[:n]) == self.delim_tokens:
            return toks[n:]
        return self.backend.tokenize(text)

    def prompt_tokens(self, question: str) -> list[int]:
        """The prompt's tokens; a conversation's earlier answers in the tokens the contexts held them in.

        Each earlier answer is tokenized as steps and delimiters, as the router settles a trace (a text
        tokenized whole can differ: Qwen merges ".\n" into one token), so that the next turn can keep the
        cache of the turn that wrote it. An answer the template does not write verbatim is tokenized with
        the text around it.
        """
        b = self.backend
        text = render_prompt(self.slot.prompt, question, b.chat_template, b.bos_token, b.eos_token, b.name)
        # A chat template may already write the BOS token as text.
        bos = not (b.bos_token and text.startswith(b.bos_token))
        tokens: list[int] = []
        cut = seen = 0  # the text is tokenized up to `cut`, and searched for the turns up to `seen`
        for turn in question.turns[:-1] if isinstance(question, Conversation) else ():
            at = text.find(turn.content, seen) if turn.content else -1
            if at < 0:
                continue
            if turn.role == "assistant":
                tokens += b.tokenize(text[cut:at], special=True, bos=bos and cut == 0)
                tokens += self.trace_tokens(turn.content)
                cut = at + len(turn.content)
            seen = at + len(turn.content)
        return tokens + b.tokenize(text[cut:], special=True, bos=bos and cut == 0)

    def trace_tokens(self, text: str) -> list[int]:
        """A trace's text as the contexts hold it: each step in running-text tokens, then the delimiter's."""
        tokens: list[int] = []
        for i, step in enumerate(text.split(self.delimiter)):
            tokens += (list(self.delim_tokens) if i else []) + self.continuation(step)
        return tokens

    def header(self) -> tuple[int, ...]:
        """The prompt tokens that do not depend on the question (reused across questions)."""
        if self._header is None:
            self._header = self.before_question("")
        return self._header

    def before_question(self, question: str) -> tuple[int, ...]:
        """The prompt tokens before the question itself: the header, and a conversation's earlier turns."""
        a, b = self.prompt_tokens(asking(question, "A")), self.prompt_tokens(asking(question, "B"))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return tuple(a[: max(0, n - 1)])  # the last shared token may merge with the question

    def start(self, question: str) -> int:
        """Put the prompt in the context; returns the tokens evaluated.

        The prompt is evaluated in up to three batches: the header, a conversation's earlier turns, the
        question. The header is reused whole from the last trace or evaluated whole, so the cache after
        `start` is the same either way. With `prompt_cache`, the cached part of the earlier turns is kept
        too: the next turn of a conversation evaluates only what its last answer's tokens do not cover,
        and its logits may differ from a fresh start's in the last digits, as llama-server's
        `cache_prompt` (NOTES.md: logits depend on how tokens were batched).
        """
        tokens = self.prompt_tokens(question)
        if len(tokens) >= self.backend.n_ctx:
            raise ContextLimitError(
                f"the prompt is {len(tokens)} tokens but model {self.backend.name!r} has a context of "
                f"{self.backend.n_ctx} (raise n_ctx in models.yaml or shorten the question)"
            )
        header = self.header()
        h = len(header) if tuple(tokens[: len(header)]) == header else 0
        q = h
        if isinstance(question, Conversation):
            history = self.before_question(question)
            if len(history) > h and tuple(tokens[: len(history)]) == history:
                q = len(history)
        cached = self.backend.tokens
        keep = h if tuple(cached[:h]) == tuple(tokens[:h]) else 0
        if self.prompt_cache and keep == h:
            keep = max(h, _shared_length(cached, tokens[:q]))
        before = self.evaluated_at_start = self.backend.evaluated
        self.backend.rewind(keep)
        for a, b in ((0, h), (h, q), (q, len(tokens))):
            if max(a, keep) < b:
                self.backend.extend(tokens[max(a, keep):b])
        self.started = True
        self.steps_seen = 0
        self.context_len = self.prompt_len = len(tokens)
        return self.backend.evaluated - before

    def sync(self, texts: Sequence[str]) -> int:
        """Catch up on steps the other model wrote, in one batch; returns tokens evaluated."""
        pending: list[int] = []
        for text in texts[self.steps_seen:]:
            pending += self.continuation(text) + list(self.delim_tokens)
        if pending:
            self.backend.extend(pending)
            self.context_len += len(pending)
        self.steps_seen = len(texts)
        return len(pending)

    def final_length(self, texts: Sequence[str]) -> int:
        """Context length once caught up on every step (tokenized, not evaluated)."""
        unseen = texts[self.steps_seen:]
        return self.context_len + sum(len(self.continuation(t)) + len(self.delim_tokens) for t in unseen)

    def evaluated_tokens(self) -> int:
        """Tokens this model evaluated since `start`."""
        return self.backend.evaluated - self.evaluated_at_start

    def append_answer_marker(self, marker: str, room: int) -> tuple[int, int]:
        """End the context with a delimiter and `marker`, leaving up to `room` tokens to answer in.

        A context too full for that loses the end of its trace (never the prompt) to make room, and with
        too little even then the answer gets what is left. Returns (tokens evaluated, room left).
        """
        delim = list(self.delim_tokens)
        tokens = list(self.backend.tokens)
        lead = [] if tuple(tokens[len(tokens) - len(delim):]) == self.delim_tokens else delim
        ask = self.continuation(marker)
        over = len(tokens) + len(lead) + len(ask) + room - self.backend.n_ctx
        if over > 0:
            keep = max(self.prompt_len, len(tokens) - over - len(delim))
            room = min(room, self.backend.n_ctx - keep - len(delim) - len(ask))
            if room < 1:
                raise ContextFull(f"{self.backend.name}: no room for the answer after the prompt")
            self.backend.rewind(keep)
            lead = delim
        self.backend.extend(lead + ask)
        self.context_len = len(self.backend.tokens)
        return len(lead) + len(ask), room

    def rewind_to_settled(self) -> None:
        """Forget what was added after the settled context (a dropped draft, the tokens a probe drew)."""
        self.backend.rewind(self.context_len)

    def count_unsettled(self, written: Written) -> None:
        """Count a step left in the context as written, not settled (the trace ends on it): its tokens."""
        self.context_len += len(written.tokens)

    probe_form = "in-process logits"

    def settle(self, written: Written, text: str) -> int:
        """Make the writer's context end with `text` + the canonical delimiter, keeping its own tokens.

        Returns how many of the generated tokens were kept.
        """
        target = text.encode()
        kept, acc = 0, b""
        for tok in written.tokens:
            piece = self.backend.token_bytes(tok)
            if not target.startswith(acc + piece):
                break
            acc += piece
            kept += 1
        while kept and not _char_boundary(target, len(acc)):
            kept -= 1
            acc = acc[: len(acc) - len(self.backend.token_bytes(written.tokens[kept]))]
        tail = self.continuation(target[len(acc):].decode()) + list(self.delim_tokens)
        if list(written.tokens[kept:]) != tail:
            self.backend.rewind(self.context_len + kept)
            self.backend.extend(tail)
        self.context_len += kept + len(tail)
        self.steps_seen += 1
        return kept


class TextSide:
    """Keeps a text-level model's context (a server's) equal to prompt + steps, each + the delimiter.

    The same small interface as `TokenSide`, on text: the server tokenizes and reuses its KV cache by
    prefix, so there is nothing to evaluate or rewind here, and a dropped draft was never added.
    How a context ending in the delimiter is tokenized is the backend's business (`probe_form`).
    `context_len` counts characters; what the server evaluated is not visible (None).
    """

    def __init__(self, slot: ModelSlot, delimiter: str, top_k: int):
        self.slot = slot
        self.backend = slot.backend
        self.delimiter = delimiter
        self.backend.delimiter = delimiter
        self.backend.top_k = top_k
        self.started = False
        self.steps_seen = 0
        self.context_len = 0

    def start(self, question: str) -> int:
        """Set the context to the prompt; the server prefills it inside the next request (returns 0)."""
        b = self.backend
        b.prompt = render_prompt(self.slot.prompt, question, b.chat_template, b.bos_token, b.eos_token, b.name)
        self._set(b.prompt)
        self.started = True
        self.steps_seen = 0
        return 0

    def sync(self, texts: Sequence[str]) -> int:
        """Append the steps the other model wrote (nothing is evaluated until the next request)."""
        unseen = texts[self.steps_seen:]
        if unseen:
            self._set(self.backend.text + "".join(t + self.delimiter for t in unseen))
        self.steps_seen = len(texts)
        return 0

    def settle(self, written: Written, text: str) -> int:
        """Append the step the model wrote itself; every generated token counts as kept."""
        self._set(self.backend.text + text + self.delimiter)
        self.steps_seen += 1
        return len(written.tokens)

    def rewind_to_settled(self) -> None:
        """Nothing to undo: `write` never extends the text."""

    def count_unsettled(self, written: Written) -> None:
        """Count a step the server wrote but `text` does not hold (the trace ends on it): its characters."""
        self.context_len += len(written.text)

    def final_length(self, texts: Sequence[str]) -> None:
        return None

    def append_answer_marker(self, marker: str, room: int) -> tuple[int, int]:
        """End the text with a delimiter and `marker` (the server knows the context's limit): (0, room)."""
        text = self.backend.text
        self._set((text if text.endswith(self.delimiter) else text + self.delimiter) + marker)
        return 0, room

    def evaluated_tokens(self) -> None:
        return None

    @property
    def probe_form(self) -> str | None:
        return self.backend.probe_form

    def _set(self, text: str) -> None:
        self.backend.text = text
        self.context_len = len(text)


def _shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens `a` and `b` share from their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _char_boundary(data: bytes, n: int) -> bool:
    try:
        data[:n].decode()
        return True
    except UnicodeDecodeError:
        return False
