"""Every trace ends with an answer: a trace that stopped without one gets the marker and a few tokens to state it."""

from __future__ import annotations

import pytest

from conftest import fake_router
from glimp_cli.backends.fake import ScriptedStep as S
from glimp_cli.policies import always_large, always_small, threshold

# The step after the loop's second round is where the fake continues "The answer is" from.
LOOP = [S(0.1, "a = 1", "A = 1"), S(0.1, "a = 1", "A = 1"),
        S(0.1, "The answer is 1.", "The answer is 42.")]


def run(router, listener=None):
    trace = router.run("q?", listener)
    return trace, list(trace)


def context_text(router, role: str) -> str:
    backend = router._sides[role].backend
    return b"".join(backend.token_bytes(t) for t in backend.tokens).decode()


def test_a_loop_gets_its_answer_from_the_large_model_and_says_it_was_forced():
    router = fake_router(LOOP, threshold(1.0))
    trace, steps = run(router)
    assert trace.stop_reason == "repetition" and trace.forced_answer == "repetition"
    forced = steps[-1]
    assert [s.model for s in steps[:-1]] == ["small", "small"]
    assert forced.model == "large" and forced.forced == "repetition" and forced.h_init is None
    assert forced.text == "The answer is 42." and forced.stop_reason == "answer"
    assert trace.answer_text == "The answer is 42."
    # The large model caught up on the loop, then read the marker as a step of its own.
    assert context_text(router, "large").endswith("a = 1\n\na = 1\n\nThe answer is 42.\n\n")
    assert trace.to_dict()["forced_answer"] == "repetition"


def test_small_alone_states_its_own_forced_answer():
    router = fake_router(LOOP, always_small())
    trace, steps = run(router)
    assert steps[-1].model == "small" and steps[-1].text == "The answer is 1."
    assert "large" not in trace.evaluated


def test_a_budget_cut_mid_step_gets_a_delimiter_before_the_marker():
    script = [S(2.0, "abcdefgh", "ABCDEFGH"), S(0.1, "The answer is 1.", "The answer is 42.")]
    router = fake_router(script, always_large(), max_tokens=8, forced_answer_tokens=4)
    trace, steps = run(router)
    assert trace.stop_reason == "max_tokens" and steps[0].text == "ABCD"
    assert steps[-1].text == "The answer is 42." and steps[-1].forced == "max_tokens"
    assert context_text(router, "large").endswith("ABCD\n\nThe answer is 42.")


def test_the_forced_answer_has_its_own_few_tokens_kept_out_of_max_tokens():
    script = [S(2.0, "abcdefghijklmnop", "ABCDEFGHIJKLMNOP"), S(0.1, "x", "The answer is 1234567890.")]
    _, steps = run(fake_router(script, always_large(), max_tokens=14, forced_answer_tokens=5))
    assert steps[0].text == "ABCDEFGHI" and steps[0].tokens == 9  # the reasoning stops 5 tokens early
    assert steps[-1].tokens == 5 and steps[-1].text == "The answer is 1234"
    # A trace that loops early still gets only forced_answer_tokens to answer in.
    _, steps = run(fake_router(LOOP, threshold(1.0), forced_answer_tokens=2))
    assert steps[-1].tokens == 2 and steps[-1].text == "The answer is 4"


def test_a_model_that_says_nothing_after_the_marker_is_recorded_as_no_answer():
    script = [S(2.0, "abcdefgh", "ABCDEFGH")]  # nothing scripted after it: the fake ends generation
    trace, steps = run(fake_router(script, always_large(), max_tokens=8))
    assert steps[-1].text == "The answer is" and steps[-1].stop_reason == "no_answer"
    assert trace.forced_answer == "max_tokens"


def test_a_full_context_drops_the_end_of_the_trace_to_make_room():
    script = [S(2.0, f"L{i:03d} long line", f"L{i:03d} LONG LINE") for i in range(20)]
    router = fake_router(script, always_large(), n_ctx=80, forced_answer_tokens=8)
    trace, steps = run(router)
    assert trace.stop_reason == "context_full" and trace.forced_answer == "context_full"
    assert steps[-1].text.startswith("The answer is")
    large = router._sides["large"].backend
    assert len(large.tokens) <= large.n_ctx and context_text(router, "large").startswith("Q: q?\nA:\n")


@pytest.mark.parametrize("changes", [{"forced_answer_tokens": 0}, {}])
def test_nothing_is_forced_when_turned_off_or_when_the_trace_answered(changes):
    script = LOOP if changes else [S(0.1, "a = 1", "A = 1"), S(2.0, "x", "The answer is 42.")]
    trace, steps = run(fake_router(script, threshold(1.0), **changes))
    assert trace.forced_answer is None and all(s.forced is None for s in steps)


def test_the_live_view_sees_the_forced_answer_as_a_step_with_its_marker():
    seen: list[tuple] = []

    class Listener:
        def step_started(self, index, model, h_init):
            seen.append((index, model, h_init, []))

        def text(self, piece):
            seen[-1][3].append(piece)

        def draft_discarded(self, index, tokens):
            pass

    _, steps = run(fake_router(LOOP, threshold(1.0)), Listener())
    index, model, h_init, pieces = seen[-1]
    assert (index, model, h_init) == (steps[-1].index, "large", None)
    assert "".join(pieces) == steps[-1].text == "The answer is 42."


def test_an_answer_cut_by_the_budget_may_use_the_tokens_kept_for_a_forced_one():
    script = [S(0.1, "a" * 20, "A" * 20), S(0.1, "The answer is 42.", "The answer is 42.")]
    trace, steps = run(fake_router(script, always_small(), max_tokens=41, forced_answer_tokens=16))
    assert trace.answer_text == "The answer is 42." and trace.forced_answer is None


def test_a_marker_with_nothing_after_it_is_no_answer_and_one_is_forced():
    script = [S(0.1, "a = 1", "A = 1"), S(0.1, "The answer is<eos>", "The answer is<eos>"),
              S(0.1, "The answer is 7.", "The answer is 7.")]
    trace, steps = run(fake_router(script, always_small()))
    assert trace.forced_answer == "answer" and steps[-1].forced == "answer"


def test_the_forced_answer_never_cuts_into_the_prompt_and_the_context_count_is_exact():
    question = "q" * 40
    script = [S(2.0, f"L{i:03d} long line", f"L{i:03d} LONG LINE") for i in range(20)]
    router = fake_router(script, always_large(), n_ctx=80, forced_answer_tokens=30)
    trace = router.run(question)
    steps = list(trace)
    large = router._sides["large"].backend
    text = b"".join(large.token_bytes(t) for t in large.tokens).decode()
    assert text.startswith(f"Q: {question}\nA:\n") and steps[-1].forced == "context_full"
    assert trace.context_tokens["large"] == len(large.tokens)


def test_a_server_that_refuses_the_forced_answer_ends_the_trace_without_one():
    from glimp_cli.backends.base import ContextFull
    from glimp_cli.backends.fake import FakeBackend

    class Refusing(FakeBackend):
        def write(self, first_token, stop, *args, **kwargs):
            if stop.answering:
                raise ContextFull("the server says the context is full")
            return super().write(first_token, stop, *args, **kwargs)

    router = fake_router(LOOP, threshold(1.0))
    router._sides["large"].backend.__class__ = Refusing
    trace, steps = run(router)
    assert trace.stop_reason == "repetition" and trace.forced_answer is None and steps[-1].forced is None
