"""When a trace ends: one pure rule over the facts the loop knows, before a step and once one is written,
and the detector of one of those facts (the trace has fallen into a loop)."""

from __future__ import annotations

from dataclasses import dataclass

from glimp_cli.backends.base import has_content

# Why a trace ended; a step's own stop_reason is one of these or delimiter / max_step_tokens.
TRACE_STOPS = ("answer", "eos", "stop_string", "max_tokens", "context_full", "repetition", "interrupted")
# How a step stopped that ends the trace by itself (unless the small model handed the answer over).
_ENDING_STEPS = ("eos", "stop_string", "context_full", "max_tokens")


@dataclass(frozen=True)
class EndFacts:
    """What the loop knows when it asks whether the trace ends.

    Before a step: whether max_tokens has room for it, whether a model's context took the probe and the
    write. Once a step is written: how it stopped and what it says.
    """

    out_of_tokens: bool = False  # max_tokens leaves no token for another step (the forced answer's reserve aside)
    context_full: bool = False  # a model's context could not take the step (probing, writing or settling it)
    step_reason: str | None = None  # how the step stopped; a `length` stop told apart as max_tokens / max_step_tokens
    handed_over: bool = False  # the small model reached the answer and hands it to the large one (answer phase)
    states_answer: bool = False  # the step states an answer marker and its writer was to answer
    repeats: bool = False  # the trace now ends in a loop (see LoopDetector)


def trace_end(facts: EndFacts) -> str | None:
    """Why the trace ends (one of TRACE_STOPS), or None: it goes on.

    A step that stopped at end of generation, a stop string, the token budget or a full context ends
    the trace, unless it is the small model handing the answer over: the large model then writes on
    until it states the answer. A step that states the answer ends it as `answer` (unless cut by the
    budget or the context); a trace that goes on ends as `repetition` when it loops, then as
    `context_full` when the step could not be settled, then as `max_tokens` when no token is left.
    """
    end = facts.step_reason if facts.step_reason in _ENDING_STEPS else None
    if facts.handed_over:
        end = None
    elif facts.states_answer and end in (None, "eos", "stop_string"):
        end = "answer"
    if end is None and facts.repeats:
        end = "repetition"
    if end is None and facts.context_full:
        end = "context_full"
    if end is None and facts.out_of_tokens:
        end = "max_tokens"
    return end


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
