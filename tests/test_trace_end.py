"""When a trace ends: `trace_end` on its own table of facts, no model involved."""

from __future__ import annotations

import pytest

from glimp_cli.trace_end import TRACE_STOPS, EndFacts, trace_end

F = EndFacts

CASES = [
    # Before a step.
    ("nothing known yet", F(), None),
    ("budget used up", F(out_of_tokens=True), "max_tokens"),
    ("context refused the probe or the write", F(context_full=True), "context_full"),
    # A step that ends at its delimiter or its own limit goes on.
    ("delimiter", F(step_reason="delimiter"), None),
    ("step limit", F(step_reason="max_step_tokens"), None),
    # A step that stopped for good ends the trace with its reason.
    ("end of generation", F(step_reason="eos"), "eos"),
    ("stop string", F(step_reason="stop_string"), "stop_string"),
    ("budget cut the step", F(step_reason="max_tokens"), "max_tokens"),
    ("context cut the step", F(step_reason="context_full"), "context_full"),
    # A step that states the answer is the answer, unless the budget or the context cut it.
    ("answer at its delimiter", F(step_reason="delimiter", states_answer=True), "answer"),
    ("answer cut by the step limit", F(step_reason="max_step_tokens", states_answer=True), "answer"),
    ("answer then end of generation", F(step_reason="eos", states_answer=True), "answer"),
    ("answer then a stop string", F(step_reason="stop_string", states_answer=True), "answer"),
    ("answer cut by the budget", F(step_reason="max_tokens", states_answer=True), "max_tokens"),
    ("answer cut by the context", F(step_reason="context_full", states_answer=True), "context_full"),
    # The small model handing the answer over never ends the trace: the large model writes on.
    ("handover at the marker", F(step_reason="handover", handed_over=True), None),
    ("handover at end of generation", F(step_reason="eos", handed_over=True), None),
    ("handover at a stop string", F(step_reason="stop_string", handed_over=True), None),
    ("handover in a loop", F(step_reason="handover", handed_over=True, repeats=True), "repetition"),
    # A loop ends a trace that would go on, and nothing else.
    ("loop", F(step_reason="delimiter", repeats=True), "repetition"),
    ("loop at end of generation", F(step_reason="eos", repeats=True), "eos"),
    ("loop that states the answer", F(step_reason="delimiter", states_answer=True, repeats=True), "answer"),
    # A step that could not be settled into its writer's context ends a trace that would go on.
    ("unsettled", F(step_reason="delimiter", context_full=True), "context_full"),
    ("unsettled at end of generation", F(step_reason="eos", context_full=True), "eos"),
    ("unsettled answer", F(step_reason="delimiter", states_answer=True, context_full=True), "answer"),
    ("unsettled loop", F(step_reason="delimiter", repeats=True, context_full=True), "repetition"),
    ("unsettled handover", F(step_reason="handover", handed_over=True, context_full=True), "context_full"),
]


@pytest.mark.parametrize("facts, end", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_trace_end(facts: EndFacts, end: str | None) -> None:
    assert trace_end(facts) == end


def test_every_end_is_a_trace_stop() -> None:
    assert {trace_end(facts) for _, facts, _ in CASES} - {None} <= set(TRACE_STOPS)
