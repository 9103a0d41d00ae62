"""The probe-then-dispatch loop: a generator of frozen `Step` records, one per reasoning step."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass, fields, replace
from time import perf_counter
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from glimp_cli.backends.base import Backend, ContextFull, StepStop, Written, answer_complete, has_content
from glimp_cli.config import PROBE_AT, PromptFormat, compile_probe_skip
from glimp_cli.entropy import EstimatorSpec
from glimp_cli.errors import ConfigError, ContextLimitError, UsageError
from glimp_cli.policies import LARGE, SMALL, DraftScore, Policy, Role
from glimp_cli.prompts import render_prompt
from glimp_cli.sampling import Sampling, sample_token
from glimp_cli.signals import content_start, perplexity, token_at
from glimp_cli.trace_end import EndFacts, trace_end

# Top log-probabilities a text-level (HTTP) small model is asked for when the estimator is exact but
# nothing is probed (small mode): its first token of a step is drawn from these.
DEFAULT_TEXT_TOP_K = 20
# Most tokens the probe reads past a `probe_skip` match: a pattern such as \d+\. keeps matching a
# long number, and the probe must stay a few tokens of work.
MAX_SKIP_TOKENS = 8


@dataclass(frozen=True)
class Step:
    """One reasoning step: who wrote it, how hard it looked (H_init, nats) and what it cost."""

    index: int
    model: Role
    h_init: float | None
    text: str
    tokens: int  # tokens the writer generated for this step
    probe_seconds: float
    generate_seconds: float
    prefill_seconds: float  # prompt and catch-up prefill of either model before this step
    prefill_tokens: int
    discarded_tokens: int  # small-model draft tokens thrown away (answer handover, rejected draft)
    stop_reason: str
    draft_signal: "DraftScore | None" = None  # step-level signals of the small draft (draft policies)
    forced: str | None = None  # a forced answer: why the trace had ended without one (see force_answer)

    @property
    def seconds(self) -> float:
        return self.probe_seconds + self.generate_seconds + self.prefill_seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict) -> "Step":
        """The Step a results file recorded with `to_dict` (keys it did not have take their defaults)."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if values.get("draft_signal") is not None:
            values["draft_signal"] = DraftScore(**values["draft_signal"])
        return cls(**values)


class StepListener(Protocol):
    """Live consumer of a trace as it is written (the terminal view)."""

    def step_started(self, index: int, model: Role, h_init: float | None) -> None: ...

    def text(self, piece: str) -> None: ...

    def draft_discarded(self, index: int, tokens: int) -> None: ...


@dataclass(frozen=True)
class RouteSettings:
    """Everything the loop needs besides the two models and the policy."""

    delimiter: str = "\n\n"
    estimator: EstimatorSpec = EstimatorSpec("exact")
    sampling: Sampling = Sampling()
    seed: int = 0
    max_tokens: int = 1024
    max_step_tokens: int = 256
    probe_skip: str | None = None  # regex of leading step text H_init is read past (see probe_past)
    # "content": H_init at the step's first token of content, past markup and a list number (see
    # signals.content_start); "first": at its first token, as the paper.
    probe_at: str = "first"
    # A trace that ends without an answer gets the answer marker and up to this many tokens to state
    # one (0: never), kept out of max_tokens for it (at most half of it).
    forced_answer_tokens: int = 32


@dataclass
class ModelSlot:
    """A backend with its prompt format and stop strings, as one side of the pair."""

    role: Role
    backend: Backend | None  # None when the policy never needs this model (a baseline)
    prompt: PromptFormat
    stop: tuple[str, ...] = ()


class _Side:
    """Keeps one model's context equal to prompt + steps, each step in canonical tokens."""

    def __init__(self, slot: ModelSlot, delimiter: str):
        self.slot = slot
        self.backend = slot.backend
        self.delimiter = delimiter
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
        text = render_prompt(self.slot.prompt, question, self.backend.chat_template,
                             self.backend.bos_token, self.backend.eos_token, self.backend.name)
        # A chat template may already write the BOS token as text.
        bos = not (self.backend.bos_token and text.startswith(self.backend.bos_token))
        return self.backend.tokenize(text, special=True, bos=bos)

    def header(self) -> tuple[int, ...]:
        """The prompt tokens that do not depend on the question (reused across questions)."""
        if self._header is None:
            a, b = self.prompt_tokens("A"), self.prompt_tokens("B")
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            self._header = tuple(a[: max(0, n - 1)])  # the last shared token may merge with the question
        return self._header

    def start(self, question: str) -> int:
        """Put the prompt in the context; returns the tokens evaluated.

        The header and the question are always evaluated as two separate batches, so the cache
        after `start` is the same whether or not the header was reused from an earlier question.
        """
        tokens = self.prompt_tokens(question)
        if len(tokens) >= self.backend.n_ctx:
            raise ContextLimitError(
                f"the prompt is {len(tokens)} tokens but model {self.backend.name!r} has a context of "
                f"{self.backend.n_ctx} (raise n_ctx in models.yaml or shorten the question)"
            )
        header = self.header()
        anchor = len(header) if tuple(tokens[: len(header)]) == header else 0
        before = self.evaluated_at_start = self.backend.evaluated
        if anchor and tuple(self.backend.tokens[:anchor]) == header:
            self.backend.rewind(anchor)
        else:
            self.backend.rewind(0)
            if anchor:
                self.backend.extend(tokens[:anchor])
        self.backend.extend(tokens[anchor:])
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


class _TextSide:
    """Keeps a text-level model's context (a server's) equal to prompt + steps, each + the delimiter.

    The same small interface as `_Side`, on text: the server tokenizes and reuses its KV cache by
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


def _match_end(pattern, delimiter: str) -> Callable[[str], int | None]:
    """A `probe_skip` pattern as a lead: the whole text once it matches; none if it cannot, or the step ended."""
    def lead_end(text: str) -> int | None:
        if delimiter in text:
            return 0  # the step ended inside what looked like a match
        match = pattern.fullmatch(text, partial=True)
        if match is None:
            return 0
        return None if match.partial else len(text)

    return lead_end


def _text_of(backend: Backend, tokens: Sequence[int]) -> str:
    """The text a run of tokens stands for."""
    return b"".join(backend.token_bytes(t) for t in tokens).decode("utf-8", errors="ignore")


def _char_boundary(data: bytes, n: int) -> bool:
    try:
        data[:n].decode()
        return True
    except UnicodeDecodeError:
        return False


class LoopDetector:
    """Says when a trace has fallen into a loop: a step twice in a row, or a run of steps again.

    A step made only of markup or whitespace (`\\[`, `---`, a blank) recurs legitimately and never
    counts as a loop on its own; a repeated run of several steps counts if any of them has content.
    """

    def __init__(self, max_run: int = 8):
        self.keys: list[str] = []
        self.max_run = max_run

    def add(self, text: str) -> bool:
        """Record a step's text; True if the trace now ends in a loop."""
        self.keys.append(" ".join(text.split()))
        keys = self.keys
        for run in range(1, min(self.max_run, len(keys) // 2) + 1):
            if keys[-run:] == keys[-2 * run:-run] and any(has_content(k) for k in keys[-run:]):
                return True
        return False


class Trace:
    """One question's run: iterate it for `Step`s; afterwards it holds the trace-level results."""

    def __init__(self, router: "Router", question: str, listener: StepListener | None,
                 given: Sequence[Step] = ()):
        self.router = router
        self.question = question
        self.listener = listener
        self.given = tuple(given)  # steps taken as written, before the loop routes the rest (a replay)
        self.steps: list[Step] = []
        self.stop_reason: str | None = None
        self.forced_answer: str | None = None  # why the answer was forced (the stop reason before it), if it was
        self.evaluated: dict[str, int] = {}
        self.context_tokens: dict[str, int] = {}
        self.wall_seconds = 0.0
        self._started = False

    def __iter__(self) -> Iterator[Step]:
        if self._started:
            raise RuntimeError("a Trace can be iterated once")
        self._started = True
        start = perf_counter()
        try:
            yield from self.router._run(self)
        except KeyboardInterrupt:
            self.stop_reason = "interrupted"
            raise
        finally:
            self.wall_seconds = perf_counter() - start
            texts = [step.text for step in self.steps]
            for role, side in self.router._sides.items():
                if side.started:
                    evaluated, length = side.evaluated_tokens(), side.final_length(texts)
                    if evaluated is not None:  # a remote model's server evaluation is not visible
                        self.evaluated[role] = evaluated
                    if length is not None:
                        self.context_tokens[role] = length

    def run(self) -> "Trace":
        """Drain the steps; returns self."""
        for _ in self:
            pass
        return self

    def summary(self) -> dict:
        """Per-model steps and tokens, large share, probe and wall time, evaluated tokens."""
        steps = {SMALL: 0, LARGE: 0}
        tokens = {SMALL: 0, LARGE: 0}
        for step in self.steps:
            steps[step.model] += 1
            tokens[step.model] += step.tokens
        n_steps, n_tokens = sum(steps.values()), sum(tokens.values())
        return {
            "steps": steps,
            "tokens": tokens,
            "large_share_steps": steps[LARGE] / n_steps if n_steps else 0.0,
            "large_share_tokens": tokens[LARGE] / n_tokens if n_tokens else 0.0,
            "discarded_tokens": sum(step.discarded_tokens for step in self.steps),
            "probe_seconds": sum(step.probe_seconds for step in self.steps),
            "prefill_seconds": sum(step.prefill_seconds for step in self.steps),
            "wall_seconds": self.wall_seconds,
            "tokens_per_second": n_tokens / self.wall_seconds if self.wall_seconds else 0.0,
            "evaluated_tokens": dict(self.evaluated),
            "context_tokens": dict(self.context_tokens),
        }

    def to_dict(self) -> dict:
        """The whole trace as plain data (the `--json` output)."""
        return {
            "question": self.question,
            "policy": self.router.policy.name,
            "estimator": str(self.router.settings.estimator),
            "delimiter": self.router.delimiter,
            "probe": self.router._sides[SMALL].probe_form if self.router.policy.needs_probe else None,
            "probe_skip": self.router.probe_skip.pattern if self.router.probe_skip is not None else None,
            "probe_at": self.router.settings.probe_at if self.router.policy.needs_probe else None,
            "stop_reason": self.stop_reason,
            "forced_answer": self.forced_answer,
            "answer_text": self.answer_text,
            "steps": [step.to_dict() for step in self.steps],
            "summary": self.summary(),
        }

    @property
    def answer_text(self) -> str:
        """The final answer: from the first step stating an answer marker to the end, else the last step."""
        markers = self.router.answer_markers
        for i, step in enumerate(self.steps):
            if any(m in step.text for m in markers):
                return self.router.delimiter.join(s.text for s in self.steps[i:])
        written = [s.text for s in self.steps if s.text.strip()]
        return written[-1] if written else ""


class Router:
    """Routes each step of a trace between a small and a large model."""

    def __init__(self, small: ModelSlot, large: ModelSlot, policy: Policy, settings: RouteSettings):
        self.policy = policy
        self.settings = settings
        self.delimiter = settings.delimiter
        self._sides = {SMALL: _side(small, settings, policy), LARGE: _side(large, settings, policy)}
        self.probe_skip = None
        # Where the step's lead ends in the text the probe drew (None: not yet known), or None: no lead.
        self.lead_end: Callable[[str], int | None] | None = None
        if settings.probe_at not in PROBE_AT:
            raise ConfigError(f"probe_at {settings.probe_at!r} is not one of {', '.join(PROBE_AT)}")
        if settings.probe_skip is not None and settings.probe_at != "first":
            raise ConfigError("probe_skip and probe_at: content both choose what the probe reads past: set one")
        if settings.probe_skip is not None and policy.needs_probe:
            self.probe_skip = compile_probe_skip(settings.probe_skip, "probe_skip")
            self.lead_end = _match_end(self.probe_skip, self.delimiter)
        elif settings.probe_at == "content" and policy.needs_probe:
            self.lead_end = content_start
        if self.lead_end is not None and isinstance(self._sides[SMALL], _TextSide):
            what = "probe_skip" if self.probe_skip is not None else "probe_at: content"
            raise ConfigError(
                f"{what} needs the small model in process: model {small.backend.name!r} is served "
                "over HTTP, where the probe cannot read past tokens it has not written"
            )
        self.answer_markers = tuple(
            m for m in {small.prompt.answer_marker, large.prompt.answer_marker} if m
        )

    def run(self, question: str, listener: StepListener | None = None, given: Sequence[Step] = ()) -> Trace:
        """A trace for `question`; nothing runs until it is iterated.

        `given` steps (e.g. the start of a recorded trace) are taken as written: both models read them,
        then the loop routes the steps after them.
        """
        if not question.strip():
            raise UsageError("the question is empty")
        if any(any(m in step.text for m in self.answer_markers) for step in given):
            raise UsageError("a given step states the answer: nothing would be left to route")
        return Trace(self, question, listener, given)

    def _stop(self, role: Role, limit: int, budget: int, preempt: bool) -> StepStop:
        """How a step of `role` ends; `preempt` ends a draft at the answer marker (the large model answers).

        Otherwise the step that states the answer marker is the answer and runs until the answer is
        complete, within what is left of the trace's budget.
        """
        side = self._sides[role]
        if preempt:
            return StepStop(self.delimiter, side.slot.stop, self.answer_markers, limit)
        return StepStop(self.delimiter, side.slot.stop, (), limit, final_markers=self.answer_markers,
                        answer_tokens=budget, answer_until_eos=side.slot.prompt.answer_until_eos)

    def _run(self, trace: Trace) -> Iterator[Step]:
        return _TraceRun(self, trace).steps()


@dataclass
class _StepCosts:
    """What the step being written has measured so far, before it becomes a `Step`."""

    index: int
    h_init: float | None = None
    logits: np.ndarray | None = None
    probe_seconds: float = 0.0
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    discarded: int = 0
    draft_seconds: float = 0.0
    score: DraftScore | None = None
    skipped: tuple[int, ...] = ()  # tokens of a `probe_skip` match, in the small model's context
    skipped_text: str = ""
    first: int | None = None  # the step's first token, when the probe has drawn it already


class _TraceRun:
    """The loop state of one question: probe, choose the model, write the step, decide the end."""

    def __init__(self, router: Router, trace: Trace):
        self.router = router
        self.trace = trace
        self.settings = router.settings
        self.policy = router.policy.for_trace() if router.policy.for_trace else router.policy
        self.rng = np.random.default_rng([router.settings.seed, _stable_hash(trace.question)])
        self.listener = trace.listener
        self.on_text = self.listener.text if self.listener else None
        self.small, self.large = router._sides[SMALL], router._sides[LARGE]
        for side in (self.small, self.large):
            side.started = False
        self.texts: list[str] = []
        self.loop = LoopDetector()
        self.generated = 0
        self.answer_phase = False  # the small model handed the answer over: the large model writes on

    def steps(self) -> Iterator[Step]:
        end = None
        for step in self.trace.given:
            # Both contexts catch up on given steps like on the other model's (canonical tokens).
            self.texts.append(step.text)
            self.loop.add(step.text)
            self.generated += step.tokens
            self.trace.steps.append(step)
            yield step
        while end is None:
            costs = _StepCosts(len(self.trace.steps))
            budget = self.settings.max_tokens - self.answer_reserve - self.generated
            end = trace_end(EndFacts(out_of_tokens=budget <= 0))
            if end is not None:
                # The last step ended at its delimiter with the budget used up: no empty step after it.
                break
            limit = min(self.settings.max_step_tokens, budget)
            try:
                if not self.answer_phase and self.policy.needs_probe:
                    self.probe(costs, limit)
                role = LARGE if self.answer_phase else self.policy(costs.h_init, self.rng)
                if self.listener:
                    self.listener.step_started(costs.index, role, costs.h_init)
                written = None
                if role == SMALL:
                    role, written = self.write_small(costs, limit, budget)
                if role == LARGE:
                    written = self.write_large(costs, limit, budget)
            except ContextFull:
                end = trace_end(EndFacts(context_full=True))
                break
            step, end = self.finish(costs, role, written, len(written.tokens) >= budget)
            self.trace.steps.append(step)
            yield step
        self.trace.stop_reason = end
        if self.needs_forced_answer(end):
            step = self.force_answer(end)
            if step is not None:
                self.trace.forced_answer = end
                self.trace.steps.append(step)
                yield step

    def answering_role(self) -> Role:
        """Who states the answer: the large model, unless the policy lets the small one (small alone)."""
        return LARGE if self.policy.large_answers else SMALL

    @functools.cached_property
    def answer_reserve(self) -> int:
        """Tokens of max_tokens kept for a forced answer (at most half), so that a trace never exceeds max_tokens."""
        if not self.router._sides[self.answering_role()].slot.prompt.answer_marker:
            return 0
        return min(self.settings.forced_answer_tokens, self.settings.max_tokens // 2)

    def needs_forced_answer(self, end: str | None) -> bool:
        """A trace that states no complete answer (a marker with a letter or digit after it) gets one forced."""
        stated = any(answer_complete(text.split(m, 1)[1]) for text in self.texts
                     for m in self.router.answer_markers if m in text)
        return not stated and self.answer_reserve > 0

    def force_answer(self, why: str) -> Step | None:
        """Append the answer marker and let the answering model state its answer in a few tokens.

        What evaluation harnesses and budget forcing do with a trace that looped or ran out of tokens.
        Returns None when the marker cannot be put in the context (it is full even after making room).
        """
        role = self.answering_role()
        side = self.router._sides[role]
        costs = _StepCosts(len(self.trace.steps))
        marker = side.slot.prompt.answer_marker
        n = min(self.settings.forced_answer_tokens, self.settings.max_tokens - self.generated)
        try:
            try:
                self.catch_up(side, costs)
            except ContextFull:
                pass  # the other model's last steps do not fit: the answer follows what does
            t0 = perf_counter()
            evaluated, n = side.append_answer_marker(marker, n)
            costs.prefill_tokens += evaluated
            costs.prefill_seconds += perf_counter() - t0
            stop = StepStop(self.router.delimiter, side.slot.stop, (), n, answering=True,
                            answer_until_eos=side.slot.prompt.answer_until_eos)
            if self.listener:
                self.listener.step_started(costs.index, role, None)
                self.listener.text(marker)
            # A server that refuses the context says so only now (ContextFull from the request).
            written = side.backend.write(None, stop, self.settings.sampling, self.rng, self.on_text)
        except ContextFull:
            return None
        self.generated += len(written.tokens)
        side.count_unsettled(written)  # the context now ends with the forced answer
        side.steps_seen = len(self.texts) + 1
        reason = "answer" if has_content(written.text) else "no_answer"
        return Step(index=costs.index, model=role, h_init=None, text=marker + written.text,
                    tokens=len(written.tokens), probe_seconds=0.0, generate_seconds=written.seconds,
                    prefill_seconds=costs.prefill_seconds, prefill_tokens=costs.prefill_tokens,
                    discarded_tokens=0, stop_reason=reason, forced=why)

    def catch_up(self, side: _Side, costs: _StepCosts) -> None:
        """Bring a model's context up to date (its prompt first), as one batch."""
        t0 = perf_counter()
        n = 0 if side.started else side.start(self.trace.question)
        n += side.sync(self.texts)
        costs.prefill_seconds += perf_counter() - t0
        costs.prefill_tokens += n

    def probe(self, costs: _StepCosts, limit: int) -> None:
        """H_init: the entropy of the small model's next-token distribution (`limit`: the step's token limit)."""
        self.catch_up(self.small, costs)
        t0 = perf_counter()
        costs.logits = self.small.backend.next_logits()
        if self.router.lead_end is not None:
            # The step needs one token of its own after its lead, within its limit.
            self.probe_past(costs, min(MAX_SKIP_TOKENS, limit - 1))
        costs.h_init = self.settings.estimator.from_logits(costs.logits)
        costs.probe_seconds = perf_counter() - t0

    def probe_past(self, costs: _StepCosts, max_tokens: int) -> None:
        """Read past the step's lead (a `probe_skip` match such as "2.", or text without content such as `\\[`).

        H_init is then the entropy of the distribution the step's first token after the lead is drawn from.
        The small model draws tokens until the router's `lead_end` can tell where the lead ends; the lead's
        tokens stay in its context as the start of the step (kept if it writes the step, rewound otherwise),
        and the first token after them is kept as the step's first token. A lead cut by the end of
        generation or `max_tokens` leaves the paper's H_init of the first token, whose draw is kept.
        """
        backend, lead_end = self.small.backend, self.router.lead_end
        # Each position's logits outlive the extends below (their buffer is rewritten by each one).
        seen = [np.array(costs.logits)]
        drawn: list[int] = []
        data = b""
        while len(drawn) < max_tokens:
            token = sample_token(seen[-1], self.settings.sampling, self.rng)
            drawn.append(token)
            data += backend.token_bytes(token)
            text = data.decode("utf-8", errors="ignore")  # a character cut between tokens is not judged yet
            if backend.is_eog(token):
                break
            end = lead_end(text)
            if end is None or end == len(text):
                backend.extend([token])
                if end is None:
                    seen.append(np.array(backend.next_logits()))
                    continue
                # The lead is every drawn token: the step's own first token is not drawn yet.
                costs.skipped, costs.skipped_text = tuple(drawn), text
                costs.logits, costs.first = backend.next_logits(), None
                return
            kept = token_at([backend.token_bytes(t) for t in drawn], text, end)  # where the step proper begins
            self.small.backend.rewind(self.small.context_len + kept)
            costs.discarded += len(drawn) - 1 - kept  # drawn past the lead and evaluated: drawn again by the write
            costs.skipped, costs.skipped_text = tuple(drawn[:kept]), _text_of(backend, drawn[:kept])
            costs.logits, costs.first = seen[kept], drawn[kept]
            return
        extended = len(seen) - 1  # every drawn token but an end of generation was evaluated
        if extended:
            self.small.rewind_to_settled()  # the write evaluates them again, from the first token drawn here
            costs.discarded += extended
        costs.logits, costs.first = seen[0], (drawn[0] if drawn else None)

    def write_small(self, costs: _StepCosts, limit: int, budget: int) -> tuple[Role, Written | None]:
        """The small model writes from the probed token; returns LARGE when the step is handed over."""
        s, policy = self.settings, self.policy
        if costs.logits is None:
            self.catch_up(self.small, costs)
            costs.logits = self.small.backend.next_logits()
        first = costs.first if costs.first is not None else sample_token(costs.logits, s.sampling, self.rng)
        skipped = len(costs.skipped)  # tokens of the step the probe drew already count against its limits
        # A step that states the answer may use the tokens kept for a forced one: it is the answer.
        stop = self.router._stop(SMALL, limit - skipped, budget - skipped + self.answer_reserve, policy.large_answers)
        if costs.skipped_text and self.on_text:
            self.on_text(costs.skipped_text)
        written = self.small.backend.write(first, stop, s.sampling, self.rng, self.on_text,
                                           costs.logits if policy.rewrite else None)
        if costs.skipped:
            # The probe's match is the start of the step (a draft's score covers the text after it).
            written = replace(written, text=costs.skipped_text + written.text, tokens=costs.skipped + written.tokens)
            costs.skipped = ()
        costs.score = _draft_score(written) if policy.rewrite else None
        if costs.score is not None and written.reason in ("delimiter", "length") and policy.rewrite(costs.score):
            # A draft-then-verify policy rejected the draft: the large model rewrites the step.
            return self.drop_draft(costs, written), None
        if policy.large_answers and written.reason in ("marker", "stop_string", "eos"):
            # The small model reached the answer (or the end): the large model writes it.
            self.answer_phase = True
            if content_start(written.text + self.router.delimiter) is None:  # nothing but markup before the marker
                return self.drop_draft(costs, written), None
            if written.reason != "eos":
                # Keep the reasoning it wrote before the marker as its step.
                written = replace(written, text=written.text.rstrip(), reason="handover")
        return SMALL, written

    def drop_draft(self, costs: _StepCosts, written: Written) -> Role:
        """Throw the small model's draft away; the large model writes this step instead."""
        self.small.rewind_to_settled()
        costs.discarded += len(written.tokens)  # after any the probe drew past the lead
        costs.draft_seconds = written.seconds
        if self.listener:
            self.listener.draft_discarded(costs.index, costs.discarded)
            self.listener.step_started(costs.index, LARGE, costs.h_init)
        return LARGE

    def write_large(self, costs: _StepCosts, limit: int, budget: int) -> Written:
        """The large model writes the whole step."""
        if costs.skipped:
            # The probe read past a match the small model drew: the large model writes its own step.
            self.small.rewind_to_settled()
            costs.discarded += len(costs.skipped)
            costs.skipped = ()
        self.catch_up(self.large, costs)
        stop = self.router._stop(LARGE, limit, budget + self.answer_reserve, False)
        return self.large.backend.write(None, stop, self.settings.sampling, self.rng, self.on_text)

    def states_answer(self, role: Role, written: Written) -> bool:
        """Whether a step is the answer: it states a marker and its writer was not to hand the answer over."""
        final = role == LARGE or not self.policy.large_answers
        return final and any(m in written.text for m in self.router.answer_markers)

    def finish(self, costs: _StepCosts, role: Role, written: Written, budget_bound: bool) -> tuple[Step, str | None]:
        """Decide whether the trace ends here (and why), settle the writer's context, record the step."""
        router = self.router
        self.generated += len(written.tokens)
        step_reason = written.reason
        if step_reason == "length":
            step_reason = "max_tokens" if budget_bound else "max_step_tokens"
        facts = EndFacts(step_reason=step_reason, handed_over=role == SMALL and self.answer_phase,
                         states_answer=self.states_answer(role, written), repeats=self.loop.add(written.text))
        end = trace_end(facts)
        self.texts.append(written.text)
        writer = router._sides[role]
        kept = len(written.tokens)
        settled = None
        # A trace that goes on, or gets its answer forced next, needs the writer's context canonical.
        if end is None or self.needs_forced_answer(end):
            try:
                settled = writer.settle(written, written.text)
            except ContextFull:
                end = trace_end(replace(facts, context_full=True))
            if written.reason == "handover" and settled is not None:
                kept = settled  # the marker's tokens are dropped from the small model's cache
                costs.discarded += len(written.tokens) - kept
        if settled is None:
            writer.count_unsettled(written)
            writer.steps_seen += 1
        step = Step(
            index=costs.index, model=role, h_init=costs.h_init, text=written.text, tokens=kept,
            probe_seconds=costs.probe_seconds, generate_seconds=written.seconds + costs.draft_seconds,
            prefill_seconds=costs.prefill_seconds, prefill_tokens=costs.prefill_tokens,
            discarded_tokens=costs.discarded, stop_reason=end or step_reason, draft_signal=costs.score,
        )
        return step, end


def _side(slot: ModelSlot, settings: RouteSettings, policy: Policy) -> "_Side | _TextSide":
    """The side for a slot's backend: token-level (in process) or text-level (a server)."""
    if slot.backend is None or slot.backend.context != "text":
        return _Side(slot, settings.delimiter)
    k = settings.estimator.k
    if k is None:
        if slot.role == SMALL and policy.needs_probe:
            raise ConfigError(
                f"model {slot.backend.name!r} is served over HTTP and returns only top log-probabilities: "
                "H_init cannot be exact; use estimator topk:K (e.g. --estimator topk:20)"
            )
        k = DEFAULT_TEXT_TOP_K  # only to draw the small model's first token when nothing is probed
    return _TextSide(slot, settings.delimiter, k)


def _draft_score(written: Written) -> DraftScore | None:
    """Mean token entropy and perplexity of a scored draft."""
    if not written.entropies:
        return None
    return DraftScore(float(np.mean(written.entropies)), perplexity(written.logprobs))


def _stable_hash(text: str) -> int:
    """A seed component that is the same for a question in every run and process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
