"""The live trace as one content string that streams in deltas never taken back.

The content is every step's text joined by the pair's delimiter, cut before the first stop string the
request asked for. While a step is written its text may still change at the end: the router strips
the trailing whitespace of a small-model step that hands the answer over, and drops a draft that is
only whitespace before the answer marker or that a draft-then-verify policy rejects. So a piece is
sent once non-whitespace text follows it, drafts of rewriting policies wait for their step to settle,
and the tail that could still grow into a stop string is held back. The streamed deltas therefore add
up to exactly the content of the non-streaming answer.

A stop string may cut a step, even one still being written: `shown_steps` then gives the steps as the
content shows them, so that the record and usage agree with the text.

A blank step (whitespace at most, such as a model that wrote only the delimiter) waits for the step
after it: as the last step it would only end the content in a delimiter, so then it is left out of the
content and, through `held`, of the record and usage.
"""

from __future__ import annotations

from dataclasses import replace
from time import perf_counter
from typing import Callable

from glimp_cli.trace import Step

# An event for the HTTP side: ("delta", text, step_start or None) or ("step_end", step record).
Emit = Callable[[tuple], None]


class Aborted(Exception):
    """Raised from the listener to stop a trace between tokens; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TraceStream:
    """A StepListener for one request: turns pieces into content deltas, stops at stop strings.

    `cancelled()` returns a reason to stop (client gone, server shutting down) or None; it is asked
    before every piece, so generation stops at the next token that yields text.
    """

    def __init__(self, delimiter: str, stops: tuple[str, ...], hold_small_drafts: bool,
                 emit: Emit | None, cancelled: Callable[[], str | None]):
        self.delimiter = delimiter
        self.stops = stops
        self.hold_small_drafts = hold_small_drafts
        self.emit = emit
        self.cancelled = cancelled
        self.committed = ""  # content of the finished steps
        self.finished_steps = 0
        self.sent = 0  # characters of content already sent
        self.stopped = False  # a request stop string was reached: content ends at `cut`
        self.cut: int | None = None
        self._step: dict | None = None  # the step being written: index, model, h_init
        self._writing = False  # the router is writing `_step` (it has not settled it yet)
        self._started = 0.0
        self._announced = False
        self._live = ""
        self._pieces = 0  # text pieces of the step being written
        self.held: Step | None = None  # a finished blank step, not sent until a step follows it

    # StepListener
    def step_started(self, index: int, model: str, h_init: float | None) -> None:
        self._check()
        self._step = {"index": index, "model": model, "h_init": h_init}
        self._writing = True
        self._started = perf_counter()
        self._announced = False
        self._live = ""
        self._pieces = 0

    def text(self, piece: str) -> None:
        self._check()
        self._live += piece
        self._pieces += 1
        if self.hold_small_drafts and self._step and self._step["model"] == "small":
            return
        visible = self._live.rstrip()
        if visible:
            self._show_held()
            self._advance(self._content_with(visible), final=False)

    def draft_discarded(self, index: int, tokens: int) -> None:
        self._live = ""  # nothing of it was sent: only whitespace, or a held draft
        self._pieces = 0

    # driven by the worker
    def step_finished(self, step: Step) -> None:
        """The router settled a step: its text is final; send it (the step's start if not yet), or hold it if blank."""
        self._writing = False
        self._live = ""
        self._show_held()
        if step.text.strip():
            self._show(step)
        else:
            self.held = step
            self._step = None
        self._check()

    def finish(self) -> str:
        """The trace ended: send what was held back; returns the whole content (without a `held` blank step)."""
        if not self.stopped:
            self._advance(self.committed, final=True)
        return self.content

    def shown_steps(self, steps: list[Step], written_tokens: Callable[[str, int], int]) -> list[Step]:
        """After a stop string: `steps` and the step being written, each as far as the cut.

        `written_tokens(model, pieces)` counts the tokens of the step being written (`pieces` streamed).
        """
        if self._writing:
            step = self._step
            steps = [*steps, Step(step["index"], step["model"], step["h_init"], self._live,
                                  written_tokens(step["model"], self._pieces), probe_seconds=0.0,
                                  generate_seconds=perf_counter() - self._started, prefill_seconds=0.0,
                                  prefill_tokens=0, discarded_tokens=0, stop_reason="request_stop")]
        shown, start = [], 0
        # A step that starts past the cut shows nothing: the stop string began in the delimiter before it.
        for step in steps:
            if start > self.cut:
                break
            shown.append(replace(step, text=step.text[: self.cut - start]))
            start += len(step.text) + len(self.delimiter)
        shown[-1] = replace(shown[-1], stop_reason="request_stop")
        if self.emit and len(shown) > self.finished_steps:  # the step being written has had no step_end yet
            self.emit(("step_end", step_record(shown[-1])))
        return shown

    @property
    def content(self) -> str:
        return self.committed[: self.cut] if self.stopped else self.committed

    def _content_with(self, step_text: str) -> str:
        return self.committed + (self.delimiter if self.finished_steps else "") + step_text

    def _show(self, step: Step) -> None:
        """Send a finished step's text and its step_end; it becomes part of the committed content."""
        if self._step is None or self._step["index"] != step.index or self._step["model"] != step.model:
            self._step = {"index": step.index, "model": step.model, "h_init": step.h_init}
            self._announced = False
        self._advance(self._content_with(step.text), final=False, force_announce=True)
        self.committed = self._content_with(step.text)
        self.finished_steps += 1
        self._step = None
        if self.emit:
            self.emit(("step_end", step_record(step)))

    def _show_held(self) -> None:
        """A step follows the held blank one: send the blank one first, then go on with the step being written."""
        if self.held is None:
            return
        held, self.held = self.held, None
        writing, announced = self._step, self._announced
        self._step = None
        try:
            self._show(held)
        finally:
            self._step, self._announced = writing, announced

    def _check(self) -> None:
        reason = self.cancelled()
        if reason:
            raise Aborted(reason)

    def _advance(self, target: str, final: bool, force_announce: bool = False) -> None:
        """Send `target` (a prefix of the final content) up to what is surely content."""
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.sent - longest)
        hits = [i for i in (target.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.cut = min(hits)
            self.committed = target
            self.stopped = True
            self._send(target[: self.cut], force_announce)
            raise Aborted("stop")
        upto = len(target) if final else len(target) - self._held_tail(target)
        self._send(target[:upto], force_announce)

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that could still grow into a stop string."""
        tail = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), tail, -1):
                if text.endswith(s[:k]):
                    tail = k
                    break
        return tail

    def _send(self, upto: str, force_announce: bool) -> None:
        delta = upto[self.sent:]
        start = None
        if self._step is not None and not self._announced and (delta or force_announce):
            start, self._announced = dict(self._step), True
        if not delta and start is None:
            return
        self.sent = max(self.sent, len(upto))
        if self.emit:
            self.emit(("delta", delta, start))


def step_record(step: Step) -> dict:
    """What a streamed chunk says about a finished step: the trace's own step record."""
    return step.to_dict()
