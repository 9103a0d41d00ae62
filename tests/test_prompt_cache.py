"""The prompt cache across a conversation's turns: what a side keeps, which worker takes the next turn, and
the real engine's H_init with the cache against a fresh start."""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import pytest

from conftest import FIVE_STEPS, GSM8K_QUESTIONS, fake_router
from test_serve import fake_app, fake_chat
from glimp_cli.config import ModelSpec, PairSpec, PromptFormat, Registry
from glimp_cli.engine import Engine
from glimp_cli.entropy import exact_entropy
from glimp_cli.policies import LARGE, SMALL, threshold
from glimp_cli.prompts import Conversation, Turn
from glimp_cli.serve.protocol import ServedPair, parse_request
from glimp_cli.serve.workers import Job, WorkerPool

# A plain format that holds a conversation the way the running trace reads: the earlier answer follows "A:".
TURNS = PromptFormat(style="plain", template="Q: {question}\nA:\n", turn="{question}\nA:\n{answer}\n\nQ: ",
                     system_turn="{system}\n\n", answer_marker="The answer is")


def next_turn(first, answer: str, system: str = "") -> Conversation:
    return Conversation(system, [Turn("user", first), Turn("assistant", answer), Turn("user", "And 3+3?")])


@pytest.mark.parametrize("system", ["", "Be brief."])
def test_the_next_turn_keeps_the_cached_earlier_turns_and_evaluates_only_what_is_new(system):
    first = Conversation(system, [Turn("user", "What is 2+2?")]) if system else "What is 2+2?"
    runs = {}
    for cache in (False, True):
        router = fake_router(FIVE_STEPS, threshold(1.0), prompt=TURNS, prompt_cache=cache)
        side = router._sides[SMALL]
        answer = "\n\n".join(step.text for step in router.run(first))
        held = list(side.backend.tokens)
        question = next_turn("What is 2+2?", answer, system)
        side.backend.extend_calls.clear()
        steps = list(router.run(question))
        prompt = side.prompt_tokens(question)
        assert list(side.backend.tokens[:len(prompt)]) == prompt  # whatever was kept, the context is the prompt
        h = len(side.header()) if not system else 0
        q = len(side.before_question(question))
        if cache:
            shared = next((i for i, (a, b) in enumerate(zip(held, prompt)) if a != b), min(len(held), len(prompt)))
            assert shared > len(side.prompt_tokens(first)) + len(answer) // 2  # the earlier answer, not just its prompt
            kept = min(shared, q)
        else:
            kept = h
        # The start's batches: what the cache lacks of the earlier turns, then the question.
        assert side.backend.extend_calls[:2] == [tuple(prompt[kept:q]), tuple(prompt[q:])]
        assert steps[0].prefill_tokens == len(prompt) - kept
        runs[cache] = [(s.model, s.text, s.h_init) for s in steps]
    assert runs[True] == runs[False]


def test_single_questions_are_evaluated_in_the_same_batches_with_or_without_the_cache():
    calls = {}
    for cache in (False, True):
        router = fake_router(FIVE_STEPS, threshold(1.0), prompt=TURNS, prompt_cache=cache)
        for question in ("What is 2+2?", "What is 2+3?", "What is 2+2?"):
            list(router.run(question))
        calls[cache] = router._sides[SMALL].backend.extend_calls
    assert calls[True] == calls[False]


# --- which worker takes a conversation's next turn ---------------------------------------------

REGISTRY = Registry({name: ModelSpec(name, prompt=TURNS) for name in ("s", "l")}, {}, "fake", [], {}, {})
PAIR = PairSpec("fake", "s", "l", tau=1.0)
SERVED = {"fake": ServedPair(PAIR, {"s": TURNS, "l": TURNS})}


def chat_job(messages, loop) -> Job:
    return Job(parse_request("chat", {"model": "glimp/fake", "messages": messages}, SERVED), loop)


def history(i: int) -> list[dict]:
    return [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"a{i}"}]


@pytest.fixture
def recorded_pool(monkeypatch):
    """A pool of three workers whose jobs only note which worker ran them (and wait while told to)."""
    import asyncio

    ran: list[tuple[str, str]] = []
    hold: dict[str, threading.Event] = {}

    def record(engine, job, cancelled):
        first = job.request.question.turns[0].content
        if first in hold:
            hold[first].wait(30)
        ran.append((first, threading.current_thread().name))
        return "done"

    monkeypatch.setattr("glimp_cli.serve.workers.run_job", record)
    pool = WorkerPool("fake", [Engine(REGISTRY, PAIR, {}) for _ in range(3)], queue_size=64)
    loop = asyncio.new_event_loop()
    try:
        yield pool, lambda messages: pool.submit(chat_job(messages, loop)), ran, hold
    finally:
        for event in hold.values():
            event.set()
        assert pool.stop(time.monotonic() + 10) == []
        loop.close()


def served_by(pool: WorkerPool, worker: int, i: int) -> None:
    """Make `worker`'s cache hold conversation `i` (as if it had answered a{i})."""
    with pool._lock:
        pool._served[worker] = ("", tuple(Turn(m["role"], m["content"]) for m in history(i)))


def wait_for(ran: list, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(ran) < n and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(ran) >= n, "a job did not run"


def test_a_next_turn_goes_to_the_idle_worker_that_served_its_conversation(recorded_pool):
    pool, submit, ran, _ = recorded_pool
    homes = {}
    for i in range(24):
        served_by(pool, i % 3, i)
        homes[f"q{i}?"] = f"glimp-serve-fake-{i % 3}"
        submit(history(i) + [{"role": "user", "content": "next?"}])
        wait_for(ran, i + 1)
    assert ran == [(q, homes[q]) for q, _ in ran]


def test_a_next_turn_whose_worker_is_busy_goes_to_another_at_once(recorded_pool):
    pool, submit, ran, hold = recorded_pool
    served_by(pool, 0, 7)
    hold["q7?"] = threading.Event()
    submit(history(7) + [{"role": "user", "content": "next?"}])  # worker 0 takes it and stays busy
    deadline = time.monotonic() + 10
    while pool._running[0] is None and time.monotonic() < deadline:
        time.sleep(0.001)
    served_by(pool, 0, 1)  # ... while its cache is said to hold conversation 1
    submit(history(1) + [{"role": "user", "content": "next?"}])
    wait_for(ran, 1)
    assert ran == [("q1?", ran[0][1])] and ran[0][1] != "glimp-serve-fake-0"
    hold["q7?"].set()
    wait_for(ran, 2)
    assert ran[1] == ("q7?", "glimp-serve-fake-0")


def test_through_the_app_each_next_turn_reuses_the_cache_of_the_worker_that_served_the_last():
    for cache in (True, False):
        with fake_app(FIVE_STEPS, prompt=TURNS, workers=2, prompt_cache=cache, tau=1.0) as client:
            for i in range(6):  # by chance alone, all six would land on their worker once in 64 runs
                question = {"role": "user", "content": f"What is 2+{i}?"}
                first = fake_chat(client, False, messages=[question])
                messages = [question, {"role": "assistant", "content": first["content"]},
                            {"role": "user", "content": "And 3+3?"}]
                second = fake_chat(client, False, messages=messages)
                prompt = second["glimp"]["prompt_tokens"]["small"]
                read = second["glimp"]["steps"][0]["prefill_tokens"]
                if cache:
                    assert read < prompt // 3, f"conversation {i}: the second turn read {read} of {prompt} tokens"
                else:
                    assert read == prompt - 3  # all but the header: BOS, "Q", ":" (the last shared token may merge)


@pytest.mark.real
def test_on_the_real_pair_the_next_turn_reads_only_what_is_new_and_probes_as_a_fresh_start_does(real_engine):
    """Both models of the tiny pair (SmolLM2's chat template, Gemma's plain turns): after a first turn, the second
    turn's start keeps what the first left in each cache, and the next token's entropy is within what batching
    changes (NOTES.md) of a fresh start's."""
    pair = dataclasses.replace(real_engine.pair, max_tokens=48, max_step_tokens=24)
    first = GSM8K_QUESTIONS[1]
    try:
        real_engine.prompt_cache = True
        router = real_engine.router(threshold(-math.inf), pair)  # the large model writes, the small one probes
        answer = "\n\n".join(step.text for step in router.run(first))
        question = next_turn(first, answer)
        for role in (SMALL, LARGE):
            side = router._sides[role]
            held, prompt = list(side.backend.tokens), side.prompt_tokens(question)
            shared = next((i for i, (a, b) in enumerate(zip(held, prompt)) if a != b), len(held))
            # The whole first turn as the model holds it is kept (the small one read all but the last step).
            assert shared == len(held), f"{role}: the first turn is not all kept"
            assert len(held) > len(side.prompt_tokens(first)) or role == SMALL  # the large model wrote the answer
            assert side.start(question) == len(prompt) - shared
            assert list(side.backend.tokens) == prompt
            warm = exact_entropy(side.backend.next_logits())
            side.prompt_cache = False
            assert side.start(question) == len(prompt) - len(side.header())
            assert list(side.backend.tokens) == prompt
            # Measured over ten such conversations: up to 0.055 nats for SmolLM2, 0.2 for Gemma (whose
            # entropy here is 3-4 nats).
            assert exact_entropy(side.backend.next_logits()) == pytest.approx(warm, abs=0.1 if role == SMALL else 0.3)
    finally:
        real_engine.prompt_cache = False


@pytest.mark.real
def test_an_earlier_answer_is_tokenized_as_the_contexts_held_it_not_as_text_tokenized_whole():
    """Qwen merges ".\\n" into one token in running text; the router's contexts end each step with "." and
    then the delimiter's "\\n". The next turn's prompt must hold the answer in the contexts' tokens, or its
    cache would be kept only up to the first line that ends in punctuation."""
    from glimp_cli.backends import load_backend
    from glimp_cli.config import load_registry
    from glimp_cli.sides import ModelSlot, TokenSide

    spec = dataclasses.replace(load_registry().model("qwen2.5-coder-0.5b"), n_ctx=512)
    backend = load_backend(spec, None)
    try:
        side = TokenSide(ModelSlot(SMALL, backend, spec.prompt), "\n")
        answer = "She has 16 - 3 = 13 eggs left.\nShe sells 13 * 2 = 26.\nThe answer is 26."
        question = next_turn("How much does she make?", answer)
        prompt = side.prompt_tokens(question)
        held = side.trace_tokens(answer)
        at = next(i for i in range(len(prompt)) if prompt[i:i + len(held)] == held)
        text = b"".join(backend.token_bytes(t) for t in prompt).decode()
        whole = backend.tokenize(text, special=True, bos=False)
        assert b"".join(backend.token_bytes(t) for t in whole).decode() == text  # the same text ...
        assert whole != prompt and held not in [whole[i:i + len(held)] for i in range(len(whole))]  # ... in other tokens
        assert side.before_question(question) == tuple(prompt[:len(side.before_question(question))])
        assert at > 0
    finally:
        backend.close()


def test_no_prompt_cache_passes_from_the_command_line_to_every_worker_engine(serve_options, served_state):
    import glimp_cli.serve

    for args, cache in ([], True), (["--no-prompt-cache"], False), (["--prompt-cache"], True):
        assert serve_options(args).prompt_cache is cache
    for cache in (True, False):
        said: list[str] = []
        state = served_state(glimp_cli.serve.ServeOptions(REGISTRY, [PAIR], port=0, workers=2, prompt_cache=cache,
                                                          log=said.append))
        engines = state.pools["fake"].engines
        assert [e.prompt_cache for e in engines] == [cache, cache]
        assert [router._sides[SMALL].prompt_cache for router in (e.router(threshold(1.0)) for e in engines)] == [cache] * 2
        assert ("no prompt cache" in said[0]) is (not cache)
