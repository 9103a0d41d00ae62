"""`glimp serve`: exact tests of the request checks and the stream on the fake pair, then a real server.

The real tests start `glimp serve` processes on the tiny pair (one thread per model) on 127.0.0.1 at
free ports and drive them with the official `openai` client, plain HTTP and headless Chromium.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import FAKE_PROMPT, GSM8K_QUESTIONS, fake_router
from glimp_cli.backends.fake import ScriptedStep as S
from glimp_cli.config import PairSpec, load_registry, packaged_config
from glimp_cli.policies import always_small, step_entropy, threshold
from glimp_cli.serve.protocol import ApiError, ServedPair, parse_request
from glimp_cli.serve.stream import Aborted, TraceStream

SCRIPT = [
    S(0.5, "small one", "LARGE ONE"),
    S(2.0, "small two", "LARGE TWO"),
    S(0.3, "small three ", "LARGE THREE"),
    S(0.1, "The answer is 4.", "The answer is 42."),
]


def drive(router, question="q?", stops=(), cancel_after=None, hold=False):
    """Run a trace through a TraceStream as a worker does; returns (events, content, steps, aborted)."""
    events = []

    def cancelled():
        deltas = sum(1 for e in events if e[0] == "delta")
        return "disconnected" if cancel_after is not None and deltas >= cancel_after else None

    stream = TraceStream("\n\n", tuple(stops), hold, events.append, cancelled)
    trace = router.run(question, stream)
    steps, aborted = [], None
    try:
        for step in trace:
            steps.append(step)
            stream.step_finished(step)
    except Aborted as exc:
        aborted = exc.reason
    content = stream.finish() if aborted in (None, "stop") else None
    return events, content, steps, aborted


def streamed_text(events) -> str:
    return "".join(e[1] for e in events if e[0] == "delta")


def announced(events) -> list[tuple]:
    return [(e[2]["index"], e[2]["model"]) for e in events if e[0] == "delta" and e[2]]


@pytest.mark.parametrize("script, policy, hold", [
    (SCRIPT, threshold(1.0), False),
    # The small model reaches the marker after some reasoning: its step is stripped when handed over.
    ([S(0.1, "two and two make 4.   The answer is 4.", "X"), S(0.1, "zzz", "The answer is 4.")], threshold(1.0), False),
    # Drafts that a draft-then-verify policy throws away never reach the stream.
    ([S(2.0, "ab", "XY"), S(0.4, "cd", "ZW"), S(0.1, "The answer is 1.", "The answer is 1.")], step_entropy(0.3), True),
    (SCRIPT, always_small(), False),
])
def test_streamed_deltas_add_up_to_the_content_and_announce_each_step_once(script, policy, hold):
    events, content, steps, aborted = drive(fake_router(script, policy), hold=hold)
    assert aborted is None
    assert content == "\n\n".join(s.text for s in steps)
    assert streamed_text(events) == content
    assert announced(events) == [(s.index, s.model) for s in steps]
    starts = [e[2] for e in events if e[0] == "delta" and e[2]]
    assert [s["h_init"] for s in starts] == [s.h_init for s in steps]
    assert [e[1]["text"] for e in events if e[0] == "step_end"] == [s.text for s in steps]


def test_a_stop_string_cuts_the_content_and_nothing_past_it_is_streamed():
    # "one\n\nLARGE" spans a step boundary: the tail that could grow into it is held back.
    for stop, expected in [("one\n\nLARGE", "small "), ("three", "small one\n\nLARGE TWO\n\nsmall "),
                           ("TWO", "small one\n\nLARGE ")]:
        events, content, steps, aborted = drive(fake_router(SCRIPT, threshold(1.0)), stops=[stop])
        assert aborted == "stop"
        assert content == expected
        assert streamed_text(events) == expected


def test_a_cancelled_trace_stops_between_tokens_and_the_next_question_starts_clean():
    router = fake_router(SCRIPT, threshold(1.0))
    events, _, steps, aborted = drive(router, "first?", cancel_after=2)
    assert aborted == "disconnected" and not steps
    assert sum(1 for e in events if e[0] == "delta") == 2  # not one more piece after the cancel
    after = drive(router, "second?")
    fresh = drive(fake_router(SCRIPT, threshold(1.0)), "second?")
    assert after[1] == fresh[1] and [s.text for s in after[2]] == [s.text for s in fresh[2]]
    assert [s.h_init for s in after[2]] == pytest.approx([s.h_init for s in fresh[2]], abs=1e-9)


# --- request checks -------------------------------------------------------------------------

PAIRS = {"tiny": ServedPair(PairSpec("tiny", "s", "l", tau=3.5), {
    "s": FAKE_PROMPT.__class__(style="chat", system="Be careful."), "l": FAKE_PROMPT})}
CHAT = {"model": "glimp/tiny", "messages": [{"role": "user", "content": "What is 2+2?"}]}


def test_a_request_maps_onto_the_pair_with_its_overrides():
    req = parse_request("chat", {**CHAT, "model": "glimp/tiny:large", "temperature": 0.5, "seed": 3,
                                 "max_completion_tokens": 40, "tau": 1.5, "stop": "x", "stream": True,
                                 "stream_options": {"include_usage": True}}, PAIRS)
    assert (req.question, req.pair.mode, req.pair.tau, req.pair.temperature, req.pair.seed, req.pair.max_tokens) == \
        ("What is 2+2?", "large", 1.5, 0.5, 3, 40)
    assert req.stop == ("x",) and req.stream and req.include_usage and req.max_tokens_given
    # A mode field beats the model id's suffix; the pair's settings fill the rest.
    req = parse_request("chat", {**CHAT, "model": "tiny:large", "mode": "small"}, PAIRS)
    assert req.pair.mode == "small" and req.pair.tau == 3.5 and not req.max_tokens_given
    req = parse_request("text", {"model": "glimp/tiny", "prompt": ["What is 3+3?"]}, PAIRS)
    assert req.question == "What is 3+3?" and req.kind == "text"
    parts = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert parse_request("chat", parts, PAIRS).question == "a\nb"


@pytest.mark.parametrize("kind, change, status, param, words", [
    ("chat", {"model": "glimp/nope"}, 404, "model", "does not exist"),
    ("chat", {"model": "glimp/tiny:fast"}, 404, "model", "does not exist"),
    ("chat", {"model": None}, 400, "model", "must provide a model"),
    ("chat", {"n": 2}, 400, "n", "n must be 1"),
    ("chat", {"temperature": 3}, 400, "temperature", "between 0 and 2"),
    ("chat", {"temperature": "hot"}, 400, "temperature", "finite number"),
    ("chat", {"top_p": 0}, 400, "top_p", "top_p"),
    ("chat", {"max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("chat", {"max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("chat", {"seed": -1}, 400, "seed", "between 0"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("chat", {"stop": [""]}, 400, "stop", "non-empty"),
    ("chat", {"mode": "fast"}, 400, "mode", "not one of"),
    ("chat", {"large_share": 2}, 400, "large_share", "between 0 and 1"),
    ("chat", {"tau": float("nan")}, 400, "tau", "finite"),
    ("chat", {"stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed when stream"),
    ("chat", {"tua": 1}, 400, "tua", "Unrecognized request argument"),
    ("chat", {"logprobs": True}, 400, "logprobs", "not supported"),
    ("chat", {"tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("chat", {"messages": []}, 400, "messages", "non-empty list"),
    ("chat", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]},
     400, "messages", "system message cannot be expressed"),
    ("chat", {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "and 3+3?"}]}, 400, "messages", "3 messages"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content", "only text parts"),
    ("chat", {"messages": [{"role": "user", "content": "   "}]}, 400, "messages[0].content", "empty"),
    ("text", {"prompt": [1, 2, 3]}, 400, "prompt", "token ids are not accepted"),
    ("text", {"prompt": "2+2?", "echo": True}, 400, "echo", "not supported"),
    ("text", {"prompt": "2+2?", "messages": []}, 400, "messages", "Unrecognized"),
])
def test_a_bad_request_gets_its_status_and_names_the_field(kind, change, status, param, words):
    body = {**CHAT, **change} if kind == "chat" else {"model": "glimp/tiny", "prompt": "2+2?", **change}
    if kind == "text":
        body.pop("messages", None) if "messages" not in change else None
    with pytest.raises(ApiError) as caught:
        parse_request(kind, body, PAIRS)
    err = caught.value
    assert (err.status, err.param) == (status, param)
    assert words in err.message
    assert err.body()["error"]["message"] == err.message


def test_a_refused_conversation_says_what_the_pair_prompt_formats_are():
    with pytest.raises(ApiError) as caught:
        parse_request("chat", {**CHAT, "messages": [{"role": "system", "content": "x"}, *CHAT["messages"]]}, PAIRS)
    assert "s: its chat template with the prompt's own system turn" in caught.value.message
    assert "l: a plain template" in caught.value.message
