"""One question's trace: the frozen `Step` record, the listener that watches steps arrive, and the `Trace`
that yields them and sums them up."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from time import perf_counter
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

from glimp_cli.policies import LARGE, SMALL, DraftScore, Role

if TYPE_CHECKING:
    from glimp_cli.router import Router


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
