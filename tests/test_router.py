"""Exact tests of the routing loop on the scripted fake pair (fast, no model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import FAKE_PROMPT, FIVE_STEPS as SCRIPT, fake_router
from glimp_cli.backends.fake import (MERGED_BLANK_LINE, WRONG_FORM_PENALTY, FakeBackend, ScriptedStep as S,
                                     tokenize_bytes)
from glimp_cli.config import PromptFormat
from glimp_cli.entropy import exact_entropy
from glimp_cli.errors import ContextLimitError, UsageError
from glimp_cli.policies import always_large, always_small, random_share, threshold
from glimp_cli.router import RouteSettings, Router, _stable_hash
from glimp_cli.sampling import Sampling, sample_token
from glimp_cli.sides import ModelSlot
from glimp_cli.trace import Step

MARKER_TOKENS = len(tokenize_bytes(b"The answer is"))  # as the fake writes it: "The", " answer", " is"



def reasoning(steps):
    """The steps the trace wrote before any forced answer."""
    return [s for s in steps if s.forced is None]

def run(router, question="q?"):
    trace = router.run(question)
    return trace, list(trace)


def test_threshold_routes_each_step_and_large_writes_the_answer():
    trace, steps = run(fake_router(SCRIPT, threshold(1.0)))
    assert [s.model for s in steps] == ["small", "large", "small", "large", "large"]
    assert [s.text for s in steps] == ["small one", "LARGE TWO", "small three", "LARGE FOUR", "The answer is 42."]
    assert [s.h_init for s in steps] == pytest.approx([0.5, 2.0, 0.3, 1.5, 0.1], abs=1e-5)
    assert trace.stop_reason == "answer"
    assert trace.answer_text == "The answer is 42."
    # The small model's draft of the answer was thrown away as soon as the marker appeared.
    assert steps[-1].discarded_tokens == MARKER_TOKENS
    assert all(s.discarded_tokens == 0 for s in steps[:-1])


def test_h_init_does_not_depend_on_who_wrote_the_previous_step():
    # The fake shows H_init + penalty after the merged blank-line token: any step appended in
    # the tokenizer's end-of-text form instead of the running form would shift these values.
    for policy in (threshold(1.0), always_small(), threshold(-math.inf)):
        _, steps = run(fake_router(SCRIPT, policy))
        probed = [s for s in steps if s.h_init is not None]
        assert probed
        for s in probed:
            assert s.h_init == pytest.approx(SCRIPT[s.index].h_init, abs=1e-6)


def test_a_writer_that_emits_the_merged_form_is_settled_to_the_running_form():
    small = FakeBackend("s", "small", SCRIPT, writes_merged=True)
    large = FakeBackend("l", "large", SCRIPT, writes_merged=True)
    router = Router(ModelSlot("small", small, FAKE_PROMPT), ModelSlot("large", large, FAKE_PROMPT),
                    threshold(1.0), RouteSettings())
    _, steps = run(router)
    assert [s.h_init for s in steps] == pytest.approx([0.5, 2.0, 0.3, 1.5, 0.1], abs=1e-5)


def test_the_fake_shows_the_delimiter_trap():
    # The fake itself must punish the merged form, or the two tests above could not fail.
    small = FakeBackend("s", "small", SCRIPT)
    small.extend(small.tokenize("Q: q\nA:\nsmall one\n\n"))
    assert small.tokens[-1] == MERGED_BLANK_LINE
    assert exact_entropy(small.next_logits()) == pytest.approx(SCRIPT[1].h_init + WRONG_FORM_PENALTY, abs=1e-4)


def test_probe_token_is_kept_and_each_model_evaluates_its_context_once():
    router = fake_router(SCRIPT, threshold(1.0))
    trace, steps = run(router)
    small = router._sides["small"].backend
    # The first token the small model evaluates for its step is the probe's argmax, alone.
    first_step_calls = small.extend_calls[2:]  # header and question batches come first
    assert first_step_calls[0] == tuple(small.tokenize("s"))
    large = router._sides["large"].backend
    # No token is ever evaluated twice: only the small model's discarded answer draft is extra.
    assert trace.evaluated["small"] == len(small.tokens) + steps[-1].discarded_tokens
    assert trace.evaluated["large"] == len(large.tokens) == trace.context_tokens["large"]


def test_large_step_leaves_nothing_of_the_probe_in_the_small_cache():
    router = fake_router(SCRIPT[:2] + [S(0.1, "The answer is 1.", "The answer is 2.")], threshold(1.0))
    trace, steps = run(router)
    small = router._sides["small"].backend
    text = b"".join(small.token_bytes(t) for t in small.tokens).decode()
    assert text.endswith("A:\nsmall one\n\nLARGE TWO\n\n")


def test_tau_infinite_is_all_small_but_the_answer_and_minus_infinite_all_large():
    _, steps = run(fake_router(SCRIPT, threshold(math.inf)))
    assert [s.model for s in steps] == ["small"] * 4 + ["large"]
    _, steps = run(fake_router(SCRIPT, threshold(-math.inf)))
    assert [s.model for s in steps] == ["large"] * 5


def test_small_alone_writes_its_own_answer_and_large_alone_does_no_small_work():
    trace, steps = run(fake_router(SCRIPT, always_small()))
    assert [s.model for s in steps] == ["small"] * 5 and steps[-1].text == "The answer is 4."
    assert "large" not in trace.evaluated
    router = fake_router(SCRIPT, always_large())
    trace, steps = run(router)
    assert all(s.h_init is None and s.probe_seconds == 0 for s in steps)
    assert router._sides["small"].backend.evaluated == 0 and "small" not in trace.evaluated


def test_large_alone_with_probe_records_h_init():
    _, steps = run(fake_router(SCRIPT, always_large(probe=True)))
    assert [s.h_init for s in steps] == pytest.approx([0.5, 2.0, 0.3, 1.5, 0.1], abs=1e-5)


def test_random_policy_is_seeded_and_hits_its_share():
    script = [S(0.0, f"s{i}", f"L{i}") for i in range(400)]
    a = [s.model for s in fake_router(script, random_share(0.3), seed=7, max_tokens=10**6).run("q")]
    b = [s.model for s in fake_router(script, random_share(0.3), seed=7, max_tokens=10**6).run("q")]
    c = [s.model for s in fake_router(script, random_share(0.3), seed=8, max_tokens=10**6).run("q")]
    assert a == b and a != c
    assert 0.22 < a.count("large") / len(a) < 0.38


@pytest.mark.parametrize("case, expected", [
    ("max_tokens", "max_tokens"), ("repetition", "repetition"), ("eos", "eos"),
    ("stop_string", "stop_string"), ("context_full", "context_full"),
])
def test_trace_stop_reasons(case, expected):
    kwargs = {}
    script = [S(0.1, "aaaa", "AAAA"), S(0.1, "bbbb", "BBBB"), S(2.0, "cccc", "CCCC")] * 3
    if case == "max_tokens":
        kwargs["max_tokens"] = 10
    elif case == "eos":
        script = [S(0.1, "aaaa", "AAAA"), S(2.0, "x", "done<eos>")]
    elif case == "stop_string":
        script = [S(0.1, "aaaa", "AAAA"), S(2.0, "x", "ok STOP here")]
        kwargs["stop"] = ("STOP",)
    elif case == "context_full":
        script = [S(0.1 + 2 * (i % 2), f"s{i:03d}", f"L{i:03d}") for i in range(20)]
        kwargs["n_ctx"] = 40
    trace, steps = run(fake_router(script, threshold(1.0), **kwargs))
    assert trace.stop_reason == expected
    # None of these traces stated an answer: one is forced after the marker, and says why.
    assert trace.forced_answer == expected and steps[-1].forced == expected and steps[-1].model == "large"
    steps = reasoning(steps)
    if case == "max_tokens":
        # Half the budget is kept for the forced answer (forced_answer_tokens, at most half): never more than 10.
        assert sum(s.tokens for s in steps) == 5 and sum(s.tokens for s in trace.steps) <= 10
    if case == "repetition":
        # A run of three steps came round again: that is a loop, caught when it completes.
        assert [s.text for s in steps] == ["aaaa", "bbbb", "CCCC"] * 2
    if case == "stop_string":
        assert steps[-1].text == "ok " and steps[-1].model == "large"


def test_max_step_tokens_ends_the_step_not_the_trace():
    script = [S(0.1, "a" * 30, "A" * 30), S(2.0, "x", "The answer is 3.")]
    trace, steps = run(fake_router(script, threshold(1.0), max_step_tokens=20))
    assert steps[0].stop_reason == "max_step_tokens" and steps[0].text == "a" * 20
    assert trace.stop_reason == "answer"


def test_small_model_ending_early_hands_the_answer_to_the_large_model():
    script = [S(0.1, "aaaa<eos>", "AAAA"), S(0.1, "zzz", "The answer is 1.")]
    trace, steps = run(fake_router(script, threshold(1.0)))
    assert [s.model for s in steps] == ["small", "large"]
    assert trace.stop_reason == "answer"


def test_prompt_longer_than_the_context_and_empty_question_are_refused():
    with pytest.raises(ContextLimitError, match="context of 20"):
        list(fake_router(SCRIPT, threshold(1.0), n_ctx=20).run("x" * 50))
    with pytest.raises(UsageError):
        fake_router(SCRIPT, threshold(1.0)).run("  ")


def test_a_question_starts_from_a_clean_cache():
    router = fake_router(SCRIPT, threshold(1.0))
    first = [s.text for s in router.run("first question")]
    again = [s.text for s in router.run("first question")]
    other = fake_router(SCRIPT, threshold(1.0))
    list(other.run("an unrelated question"))
    after_other = [s.text for s in other.run("first question")]
    assert first == again == after_other
    small = router._sides["small"].backend
    assert b"".join(small.token_bytes(t) for t in small.tokens).decode().count("Q:") == 1


def test_streamed_text_is_exactly_the_step_text():
    class Listener:
        def __init__(self):
            self.events = []

        def step_started(self, index, model, h_init):
            self.events.append(("start", index, model))

        def text(self, piece):
            self.events.append(("text", piece))

        def draft_discarded(self, index, tokens):
            self.events.append(("discard", index, tokens))

    listener = Listener()
    trace = fake_router(SCRIPT, threshold(1.0)).run("q", listener)
    steps = list(trace)
    streamed, current = {}, None
    for event in listener.events:
        if event[0] == "start":
            current = event[1]
            streamed[current] = ""
        elif event[0] == "text":
            streamed[current] += event[1]
    assert streamed == {s.index: s.text for s in steps}
    assert ("discard", 4, MARKER_TOKENS) in listener.events


def test_small_reasoning_before_the_answer_marker_is_kept_and_the_large_model_answers():
    script = [S(0.1, "two and two make 4. The answer is 4.", "X"), S(0.1, "zzz", "The answer is 4.")]
    router = fake_router(script, threshold(1.0))
    trace, steps = run(router)
    assert [(s.model, s.text) for s in steps] == [("small", "two and two make 4."), ("large", "The answer is 4.")]
    assert steps[0].stop_reason == "handover" and steps[1].h_init is None
    assert steps[0].discarded_tokens == len(tokenize_bytes(b" The answer is"))
    small = router._sides["small"].backend
    text = b"".join(small.token_bytes(t) for t in small.tokens).decode()
    assert text.endswith("A:\ntwo and two make 4.\n\n")
    assert trace.answer_text == "The answer is 4."


def test_after_a_handover_the_large_model_writes_until_it_states_the_answer():
    # Large alone would go on to the marker; a handover must not take its first step as the answer.
    script = [S(0.1, "so 2+2=4. The answer is 4.", "X"), S(0.1, "zzz", "Let me double check."),
              S(0.1, "zzz", "The answer is 4.")]
    trace, steps = run(fake_router(script, threshold(1.0)))
    assert [(s.model, s.text) for s in steps] == [
        ("small", "so 2+2=4."), ("large", "Let me double check."), ("large", "The answer is 4.")]
    assert [s.h_init is None for s in steps] == [False, True, True]  # the answer phase probes nothing
    assert trace.stop_reason == "answer" and trace.answer_text == "The answer is 4."


def test_step_entropy_policy_drafts_and_rewrites_uncertain_steps():
    from glimp_cli.policies import step_entropy, step_perplexity

    # The fake's later tokens are near-certain, so a draft "ab" + blank line (4 tokens) has a mean
    # token entropy of about H_init / 4: 0.5 for the first step, 0.1 for the second.
    script = [S(2.0, "ab", "XY"), S(0.4, "cd", "ZW"), S(0.1, "The answer is 1.", "The answer is 1.")]
    trace, steps = run(fake_router(script, step_entropy(0.3)))
    assert [(s.model, s.text) for s in steps] == [("large", "XY"), ("small", "cd"), ("large", "The answer is 1.")]
    assert steps[0].draft_signal.mean_entropy == pytest.approx(0.5, abs=1e-3)
    assert steps[0].discarded_tokens == 4 and steps[1].discarded_tokens == 0
    assert steps[1].draft_signal.mean_entropy == pytest.approx(0.1, abs=1e-3)
    # Perplexity of the same drafts: the first token carries all the uncertainty.
    _, steps = run(fake_router(script, step_perplexity(1.05)))
    assert [s.model for s in steps] == ["large", "small", "large"]
    assert steps[0].draft_signal.perplexity > steps[1].draft_signal.perplexity > 1.0


THINK = PromptFormat(style="plain", template="Q: {question}\nA:\n", answer_marker="</think>", answer_until_eos=True)


def test_small_mode_on_a_reasoning_prompt_writes_its_own_answer_to_the_end():
    # Small alone never loads the large model: `</think>` must not route anything to it.
    script = [S(0.1, "think a", "X"), S(0.1, "think b</think>", "X"), S(0.1, "so \\boxed{4}<eos>", "X")]
    small = FakeBackend("fake-small", "small", script)
    router = Router(ModelSlot("small", small, THINK), ModelSlot("large", None, THINK), always_small(), RouteSettings())
    trace, steps = run(router)
    assert [s.model for s in steps] == ["small", "small"]
    # The answer after </think> runs past the delimiter to the end of generation.
    assert steps[-1].text == "think b</think>\n\nso \\boxed{4}"
    assert trace.stop_reason == "answer" and trace.answer_text.endswith("so \\boxed{4}")


def test_glimp_mode_on_a_reasoning_prompt_hands_the_answer_to_the_large_model():
    script = [S(0.1, "think a", "X"), S(0.1, "think b</think>", "X"), S(0.1, "zzz", "</think>"),
              S(0.1, "zzz", "the answer \\boxed{4}<eos>")]
    trace, steps = run(fake_router(script, threshold(1.0), prompt=THINK))
    assert [(s.model, s.text) for s in steps] == [
        ("small", "think a"), ("small", "think b"), ("large", "</think>\n\nthe answer \\boxed{4}")]
    assert trace.stop_reason == "answer"


@pytest.mark.parametrize("policy", [threshold(1.0), always_small(), always_large()], ids=["glimp", "small", "large"])
def test_the_answer_step_runs_past_the_delimiter_to_the_answer(policy):
    # A one-line delimiter: `The answer is:` and the number on the next line are one answer step.
    script = [S(0.1, "x = 40 + 2", "x = 40 + 2"), S(2.0, "The answer is:", "The answer is:"),
              S(0.1, "42", "42"), S(0.1, "then more", "then more")]
    trace, steps = run(fake_router(script, policy, delimiter="\n"))
    assert steps[-1].text == "The answer is:\n42"
    assert trace.stop_reason == "answer" and trace.answer_text == "The answer is:\n42"
    assert steps[-1].model == ("small" if policy.name == "small" else "large")


def test_a_step_that_uses_up_max_tokens_at_its_delimiter_is_the_last():
    # "aaaa" + blank line is 6 tokens: two steps use the budget of 12 exactly.
    script = [S(0.1, "aaaa", "AAAA"), S(2.0, "bbbb", "BBBB"), S(0.1, "cccc", "CCCC")]
    trace, steps = run(fake_router(script, threshold(1.0), max_tokens=12, forced_answer_tokens=0))
    assert [s.text for s in steps] == ["aaaa", "BBBB"]
    assert trace.stop_reason == "max_tokens"


def test_a_recurring_line_is_not_a_loop():
    script = [S(0.1, "Step:", "Step:"), S(0.1, "x = 2", "x = 2"), S(0.1, "Step:", "Step:"),
              S(0.1, "\\[", "\\["), S(0.1, "\\[", "\\["), S(0.1, "y = 3", "y = 3"), S(0.1, "\\]", "\\]"),
              S(0.1, "\\[", "\\["), S(0.1, "The answer is 5.", "The answer is 5.")]
    trace, steps = run(fake_router(script, always_small()))
    assert trace.stop_reason == "answer"
    # A line of markup alone is no step of its own: it opens the step of the next line with content.
    assert [s.text for s in steps] == ["Step:", "x = 2", "Step:", "\\[\n\n\\[\n\ny = 3",
                                       "\\]\n\n\\[\n\nThe answer is 5."]


def test_a_list_number_or_bracket_line_opens_the_next_step_instead_of_being_one():
    script = [S(0.1, "2.", "2."), S(0.1, "add them", "ADD THEM"), S(0.1, "  ---  ", "  ---  "),
              S(2.0, "x = 1", "X = 1"), S(0.1, "The answer is 5.", "The answer is 5.")]
    _, steps = run(fake_router(script, threshold(1.0)))
    assert [(s.model, s.text) for s in steps] == [("small", "2.\n\nadd them"), ("small", "  ---  \n\nx = 1"),
                                                  ("large", "The answer is 5.")]


@pytest.mark.parametrize("texts, n_steps", [
    (["x = 2", "x = 2", "x = 2"], 2),        # the same step twice in a row
    (["a = 1", "b = 2", "a = 1", "b = 2"], 4),  # a run of two steps again
])
def test_a_real_loop_ends_the_trace(texts, n_steps):
    script = [S(0.1, t, t) for t in texts] + [S(0.1, "The answer is 1.", "The answer is 1.")]
    trace, steps = run(fake_router(script, always_small()))
    assert trace.stop_reason == "repetition" and len(reasoning(steps)) == n_steps


def test_a_character_cut_by_max_step_tokens_is_held_back():
    # "€" is three one-byte tokens in the fake: a limit of 8 cuts it after its first byte.
    script = [S(0.1, "price 5€ each", "X"), S(0.1, "The answer is 5.", "The answer is 5.")]
    router = fake_router(script, threshold(1.0), max_step_tokens=8)
    trace, steps = run(router)
    assert steps[0].text == "price 5" and steps[0].stop_reason == "max_step_tokens"
    for role in ("small", "large"):
        backend = router._sides[role].backend
        context = b"".join(backend.token_bytes(t) for t in backend.tokens)
        assert b"price 5\n\n" in context and "\ufffd".encode() not in context


def test_multi_byte_tokens_are_kept_whole_in_the_writer_context():
    # "é" is one two-byte token: the small model's own tokens stay in its cache, nothing is re-tokenized.
    script = [S(0.1, "café au lait", "X"), S(0.1, "The answer is 1.", "The answer is 1.")]
    router = fake_router(script, always_small())
    trace, steps = run(router)
    small = router._sides["small"].backend
    assert steps[0].text == "café au lait"
    context, own = list(small.tokens), tokenize_bytes("café au lait\n\n".encode())
    assert any(context[i:i + len(own)] == own for i in range(len(context)))
    assert trace.evaluated["small"] == len(small.tokens)


def test_the_probe_token_is_the_first_token_of_the_small_step():
    # Every next-token distribution is computed once: a small step starts from the probed one.
    router = fake_router(SCRIPT, threshold(1.0))
    run(router)
    small = router._sides["small"].backend
    assert len(small.logits_positions) == len(set(small.logits_positions))


def test_at_temperature_the_first_token_is_drawn_from_the_probed_distribution():
    # A near-uniform probe: the small step's first token is exactly the router's first draw from it
    # (a second look at the distribution would draw another token).
    script = [S(6.5, "abc", "ABC"), S(0.1, "The answer is 1.", "The answer is 1.")]
    sampling = Sampling(temperature=1.0)
    router = fake_router(script, threshold(math.inf), sampling=sampling, seed=3)
    run(router)
    replay = FakeBackend("replay", "small", script)
    replay.extend(replay.tokenize("Q: q?\nA:\n", bos=True))
    expected = sample_token(replay.next_logits(), sampling, np.random.default_rng([3, _stable_hash("q?")]))
    small = router._sides["small"].backend
    assert sum(len(c) for c in small.extend_calls[:2]) == len(replay.tokens)  # header and question batches
    assert small.extend_calls[2] == (expected,)


def test_given_steps_are_read_by_both_models_and_the_loop_routes_the_rest():
    # The replay of a recorded trace's start: the same steps follow, and a recorded step round-trips.
    _, steps = run(fake_router(SCRIPT, threshold(1.0)))
    given = [Step.from_dict(json.loads(json.dumps(s.to_dict()))) for s in steps[:2]]
    assert given == steps[:2]
    router = fake_router(SCRIPT, threshold(1.0))
    trace, again = run_given(router, given)
    assert again[:2] == given and [(s.model, s.text) for s in again[2:]] == [(s.model, s.text) for s in steps[2:]]
    # Both models caught up on the given steps, whoever wrote them.
    for role in ("small", "large"):
        backend = router._sides[role].backend
        text = b"".join(backend.token_bytes(t) for t in backend.tokens).decode()
        assert text.startswith("Q: q?\nA:\nsmall one\n\nLARGE TWO\n\n")
    with pytest.raises(UsageError, match="states the answer"):
        fake_router(SCRIPT, threshold(1.0)).run("q?", given=steps)


def run_given(router, given):
    trace = router.run("q?", given=given)
    return trace, list(trace)
