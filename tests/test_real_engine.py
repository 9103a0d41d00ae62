"""The loop on the real llama.cpp and the packaged tiny pair (SmolLM2-135M small, Gemma 3 270M large)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from conftest import GSM8K_QUESTIONS
from glimp_cli.policies import always_large, always_small, random_share, threshold
from glimp_cli.trace_end import TRACE_STOPS

pytestmark = pytest.mark.real


def small_pair(engine, **changes):
    return dataclasses.replace(engine.pair, **{"max_tokens": 160, "max_step_tokens": 64, **changes})


def run(engine, policy, question, **changes):
    trace = engine.router(policy, small_pair(engine, **changes)).run(question)
    return trace, list(trace)


def test_live_loop_runs_end_to_end_with_both_models(real_engine):
    # tau at the median H_init of the small model's own steps gives both models work.
    # (A forced answer is the large model's and has no H_init.)
    hs = [s.h_init for q in GSM8K_QUESTIONS for s in run(real_engine, always_small(), q)[1] if not s.forced]
    tau = float(np.median(hs))
    models = set()
    for q in GSM8K_QUESTIONS:
        trace, steps = run(real_engine, threshold(tau), q)
        assert steps and trace.stop_reason in TRACE_STOPS
        for s in steps:
            models.add(s.model)
            assert s.text.strip() or s.stop_reason in TRACE_STOPS
            if s.model == "small":
                assert s.h_init is not None and s.h_init <= tau
            elif s.h_init is not None and not s.discarded_tokens:
                assert s.h_init > tau  # (a large step after a dropped answer draft keeps the draft's probe)
    assert models == {"small", "large"}


def test_tau_infinite_gives_small_steps_and_minus_infinite_only_large(real_engine):
    for q in GSM8K_QUESTIONS:
        _, steps = run(real_engine, threshold(math.inf), q)
        # Only a handed-over or forced answer (or what follows it) may be the large model's.
        first_large = next((i for i, s in enumerate(steps) if s.model == "large"), len(steps))
        assert all(s.model == "large" for s in steps[first_large:])
        if first_large < len(steps):
            handed = steps[first_large]
            # The small model reached the marker or its end, or its whole draft was dropped, or it ran
            # out of tokens without an answer and the large model's was forced.
            assert (
                (first_large >= 1 and steps[first_large - 1].stop_reason in ("handover", "eos"))
                or handed.discarded_tokens
                or (handed.forced and first_large == len(steps) - 1)
            )
            assert all(s.h_init is None for s in steps[first_large + 1:])
        _, steps = run(real_engine, threshold(-math.inf), q)
        assert {s.model for s in steps} == {"large"}


def test_each_model_evaluates_about_its_final_context_once(real_engine):
    for q in GSM8K_QUESTIONS:
        trace, _ = run(real_engine, threshold(3.5), q)
        for role, evaluated in trace.evaluated.items():
            # Evaluated may be lower than the context (the prompt header is reused across questions),
            # never a re-prefill per step.
            assert evaluated <= 1.05 * trace.context_tokens[role], (role, trace.evaluated, trace.context_tokens)


def test_h_init_does_not_depend_on_who_wrote_the_previous_step(real_engine):
    """The small model's own steps vs the same text caught up as if the large model wrote it.

    The contexts must be token-for-token identical. The entropies then differ only by llama.cpp's
    batch-shape noise (one token per eval while writing, one batch while catching up). Measured on a
    shared 2-core machine: these 12 boundaries median 0.041 nats, mean 0.049, max 0.160; 23 more from
    8 calibration questions median 0.034, mean 0.035, max 0.104. The wrong delimiter form moves H_init far more.
    """
    estimate = real_engine.router(threshold(0.0)).settings.estimator.from_logits
    same, merged = [], []
    for q in GSM8K_QUESTIONS:
        router = real_engine.router(always_small(), small_pair(real_engine, max_tokens=240))
        steps = list(router.run(q))
        own = list(router._sides["small"].backend.tokens)
        for k in range(1, len(steps)):
            if steps[k].forced:
                continue  # the large model's forced answer: no H_init to compare
            replay = real_engine.router(threshold(0.0), small_pair(real_engine))._sides["small"]
            replay.start(q)
            replay.sync([s.text for s in steps[:k]])
            assert list(replay.backend.tokens) == own[: len(replay.backend.tokens)]
            same.append(abs(estimate(replay.backend.next_logits()) - steps[k].h_init))
            # What a naive loop would do: tokenize the text ending in the delimiter as a whole.
            replay.backend.rewind(replay.context_len - len(replay.delim_tokens))
            replay.backend.extend(replay.backend.tokenize(replay.delimiter))
            merged.append(abs(estimate(replay.backend.next_logits()) - steps[k].h_init))
    assert len(same) >= 3
    assert np.median(same) <= 0.05 and np.mean(same) <= 0.07 and max(same) <= 0.2, same
    assert np.mean(merged) > 3 * np.mean(same), (merged, same)


def test_rewind_leaves_logits_unchanged(real_engine):
    for role in ("small", "large"):
        backend = real_engine.backends[role]
        prefix = backend.tokenize("Question: what is two plus two?\nAnswer:", bos=True)
        delta = backend.tokenize(" Two plus two is")
        backend.rewind(0)
        backend.extend(prefix)
        backend.extend(delta)
        straight = backend.next_logits().copy()
        backend.rewind(0)
        backend.extend(prefix)
        backend.extend(backend.tokenize(" five, because that is a wrong branch of the story"))
        assert not np.allclose(backend.next_logits(), straight)
        backend.rewind(len(prefix))
        backend.extend(delta)
        assert np.array_equal(backend.next_logits(), straight)


def test_a_question_does_not_depend_on_the_one_before(real_engine):
    a, b = GSM8K_QUESTIONS[0], GSM8K_QUESTIONS[1]
    first = [s.text for s in run(real_engine, threshold(3.5), a)[1]]
    run(real_engine, threshold(3.5), b)
    again = [s.text for s in run(real_engine, threshold(3.5), a)[1]]
    assert first == again


def test_large_alone_loads_and_probes_nothing_small(real_engine):
    trace, steps = run(real_engine, always_large(), GSM8K_QUESTIONS[1])
    assert steps and all(s.h_init is None and s.model == "large" for s in steps)
    assert set(trace.evaluated) == {"large"}


LIST_QUESTION = "List the steps to make a cup of tea, as a numbered list."


@pytest.mark.parametrize("policy", [always_small(), random_share(0.4)], ids=["small", "random"])
def test_probe_skip_reads_h_init_past_a_list_number_and_leaves_the_contexts_canonical(real_engine, policy):
    """SmolLM2 answers LIST_QUESTION with "1. ...", "2. ..." lines: H_init is taken after each number.

    Replayed from the same tokens in one batch, the entropy after the marker matches the probe's (which
    read the marker token by token) up to llama.cpp's batch-shape noise. Routed at random, some marked
    steps go to the large model, and the small model's context must hold no trace of the marker it drew.
    """
    import regex

    pattern = r"\s*(\d+[.)]|[-*])"
    changes = dict(delimiter="\n", max_tokens=120, max_step_tokens=40)
    router = real_engine.router(policy, small_pair(real_engine, probe_skip=pattern, **changes))
    trace = router.run(LIST_QUESTION)
    steps = list(trace)
    own = list(router._sides["small"].backend.tokens)
    estimate = router.settings.estimator.from_logits
    replay = real_engine.router(threshold(0.0), small_pair(real_engine, **changes))._sides["small"]
    replay.start(LIST_QUESTION)
    marked, gaps = 0, []
    for k, step in enumerate(steps):
        if step.h_init is None:
            continue
        replay.sync([s.text for s in steps[:k]])
        assert list(replay.backend.tokens) == own[: len(replay.backend.tokens)]
        marker, text = [], ""
        for token in replay.continuation(step.text):
            text += replay.backend.token_bytes(token).decode("utf-8", errors="ignore")
            match = regex.compile(pattern).fullmatch(text, partial=True)
            if match is None:
                marker = []
                break
            marker.append(token)
            if not match.partial:
                break
        if marker:
            marked += 1
            replay.backend.extend(marker)
        gaps.append(abs(estimate(replay.backend.next_logits()) - step.h_init))
        replay.backend.rewind(replay.context_len)
    assert marked >= 3, [s.text for s in steps]
    assert np.median(gaps) <= 0.05 and max(gaps) <= 0.3, gaps
    if policy.name.startswith("random"):
        assert {s.model for s in steps[:-1]} == {"small", "large"}, [(s.model, s.h_init) for s in steps]
    assert trace.evaluated["small"] <= 1.05 * trace.context_tokens["small"] + sum(s.discarded_tokens for s in steps)


@pytest.mark.parametrize("pattern", [r"[A-Za-z]+ZZZZ", r"\s*\d+\."], ids=["never-matches", "number-not-marker"])
def test_a_marker_that_matched_only_partly_leaves_the_step_start_h_init(real_engine, pattern):
    """A pattern the step's first tokens begin to match and then leave: the probe draws them, rewinds,
    and H_init must be the step start's, exactly what a run without probe_skip records.

    Each drawn token rewrites llama.cpp's logits buffer: an H_init read from it after the rewind would
    be the entropy after the last drawn token (near zero inside a word or a number).
    """
    changes = dict(delimiter="\n", max_tokens=120, max_step_tokens=40)
    question = GSM8K_QUESTIONS[0]
    _, plain = run(real_engine, always_small(), question, **changes)
    _, skip = run(real_engine, always_small(), question, probe_skip=pattern, **changes)
    rewound = [s for s in skip if s.discarded_tokens]
    assert rewound, [s.text for s in skip]  # some step began like a match and was rewound
    assert [s.text for s in skip] == [s.text for s in plain]
    assert [s.h_init for s in skip] == pytest.approx([s.h_init for s in plain], abs=1e-4)


def test_probe_at_content_reads_h_init_at_the_first_token_of_content(real_engine):
    """SmolLM2's numbered list: H_init is read after each list number, and matches a one-batch replay."""
    from glimp_cli.router import MAX_SKIP_TOKENS
    from glimp_cli.signals import content_token

    changes = dict(delimiter="\n", max_tokens=120, max_step_tokens=40)
    router = real_engine.router(always_small(), small_pair(real_engine, probe_at="content", **changes))
    trace = router.run(LIST_QUESTION)
    steps = list(trace)
    estimate = router.settings.estimator.from_logits
    replay = real_engine.router(threshold(0.0), small_pair(real_engine, **changes))._sides["small"]
    replay.start(LIST_QUESTION)
    read_past, gaps = 0, []
    for k, step in enumerate(steps):
        if step.h_init is None:
            continue
        replay.sync([s.text for s in steps[:k]])
        ahead = [t for s in steps[k:] for t in replay.continuation(s.text) + list(replay.delim_tokens)]
        at = content_token(replay.backend.token_bytes, ahead, MAX_SKIP_TOKENS) or 0
        read_past += at > 0
        replay.backend.extend(ahead[:at])
        gaps.append(abs(estimate(replay.backend.next_logits()) - step.h_init))
        replay.backend.rewind(replay.context_len)
    assert read_past >= 3, [s.text for s in steps]
    assert np.median(gaps) <= 0.05 and max(gaps) <= 0.3, gaps
