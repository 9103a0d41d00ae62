"""The probe-then-dispatch loop: `Router.run()` gives a `Trace` that yields one frozen `Step` per reasoning step.

The records are in trace.py, each model's context in sides.py, when a trace ends in trace_end.py; here are
the router and the loop of one question (`_TraceRun`: probe, choose the model, write the step, finish it).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Callable, Iterator, Sequence

import numpy as np

from glimp_cli.backends.base import Backend, ContextFull, StepStop, Written, answer_complete, has_content
from glimp_cli.config import PROBE_AT, compile_probe_skip
from glimp_cli.entropy import EstimatorSpec
from glimp_cli.errors import ConfigError, UsageError
from glimp_cli.policies import LARGE, SMALL, DraftScore, Policy, Role
from glimp_cli.sampling import Sampling, sample_token
from glimp_cli.sides import ModelSlot, TextSide, TokenSide
from glimp_cli.signals import content_start, perplexity, token_at
from glimp_cli.trace import Step, StepListener, Trace
from glimp_cli.trace_end import EndFacts, LoopDetector, trace_end

# Top log-probabilities a text-level (HTTP) small model is asked for when the estimator is exact but
# nothing is probed (small mode): its first token of a step is drawn from these.
DEFAULT_TEXT_TOP_K = 20
# Most tokens the probe reads past a `probe_skip` match: a pattern such as \d+\. keeps matching a
# long number, and the probe must stay a few tokens of work.
MAX_SKIP_TOKENS = 8


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
    # Keep the cached part of a conversation's earlier turns at the start of its next turn (glimp serve;
    # see TokenSide.start).
    prompt_cache: bool = False


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
        if self.lead_end is not None and isinstance(self._sides[SMALL], TextSide):
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

    def catch_up(self, side: TokenSide | TextSide, costs: _StepCosts) -> None:
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


def _side(slot: ModelSlot, settings: RouteSettings, policy: Policy) -> TokenSide | TextSide:
    """The side for a slot's backend: token-level (in process) or text-level (a server)."""
    if slot.backend is None or slot.backend.context != "text":
        return TokenSide(slot, settings.delimiter, settings.prompt_cache)
    k = settings.estimator.k
    if k is None:
        if slot.role == SMALL and policy.needs_probe:
            raise ConfigError(
                f"model {slot.backend.name!r} is served over HTTP and returns only top log-probabilities: "
                "H_init cannot be exact; use estimator topk:K (e.g. --estimator topk:20)"
            )
        k = DEFAULT_TEXT_TOP_K  # only to draw the small model's first token when nothing is probed
    return TextSide(slot, settings.delimiter, k)


def _draft_score(written: Written) -> DraftScore | None:
    """Mean token entropy and perplexity of a scored draft."""
    if not written.entropies:
        return None
    return DraftScore(float(np.mean(written.entropies)), perplexity(written.logprobs))


def _stable_hash(text: str) -> int:
    """A seed component that is the same for a question in every run and process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
