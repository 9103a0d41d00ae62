"""`glimp serve`: exact tests of the request checks and the stream on the fake pair, then a real server.

The real tests start `glimp serve` processes on the tiny pair (one thread per model) on 127.0.0.1 at
free ports and drive them with the official `openai` client, plain HTTP and headless Chromium.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
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

from conftest import FAKE_PROMPT, GSM8K_QUESTIONS, GatedFake, fake_router
from test_http_backend import FakeServer, event
from glimp_cli.backends.fake import FakeBackend
from glimp_cli.backends.fake import ScriptedStep as S
from glimp_cli.config import ModelSpec, PairSpec, Registry, load_registry, packaged_config
from glimp_cli.policies import always_small, step_entropy, threshold
from glimp_cli.serve import STOP_SECONDS
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
    assert req.stop == ("x",) and req.stream and req.include_usage
    # A mode field alone or agreeing with the model id's suffix; the pair's settings fill the rest.
    for model in ("tiny", "tiny:small"):
        req = parse_request("chat", {**CHAT, "model": model, "mode": "small"}, PAIRS)
        assert req.pair.mode == "small" and req.pair.tau == 3.5
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
    ("chat", {"top_p": 1.5}, 400, "top_p", "between 0 and 1"),
    ("chat", {"max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("chat", {"max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("chat", {"seed": -1}, 400, "seed", "between 0"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("chat", {"stop": [""]}, 400, "stop", "non-empty"),
    ("chat", {"mode": "fast"}, 400, "mode", "not one of"),
    ("chat", {"model": "glimp/tiny:large", "mode": "small"}, 400, "mode", "differs from the mode 'large'"),
    ("chat", {"large_share": 2}, 400, "large_share", "between 0 and 1"),
    ("chat", {"tau": float("nan")}, 400, "tau", "finite"),
    ("chat", {"stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed when stream"),
    ("chat", {"tua": 1}, 400, "tua", "Unrecognized request argument"),
    ("chat", {"logprobs": True}, 400, "logprobs", "not supported"),
    ("chat", {"tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("chat", {"messages": []}, 400, "messages", "non-empty list"),
    ("chat", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]},
     400, "messages", "no place for a system message"),
    ("chat", {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "and 3+3?"}]}, 400, "messages", "no earlier turns"),
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


def test_top_p_0_decodes_greedily_and_range_errors_read_alike():
    req = parse_request("chat", {**CHAT, "temperature": 0.8, "top_p": 0}, PAIRS)
    assert (req.pair.temperature, req.pair.top_p) == (0.0, 1.0)  # the nucleus holds the most likely token alone
    for key, value, bounds in [("temperature", 2.5, "0 and 2"), ("top_p", -0.1, "0 and 1"), ("top_p", 1.5, "0 and 1"),
                               ("large_share", 1.5, "0 and 1")]:
        with pytest.raises(ApiError) as caught:
            parse_request("chat", {**CHAT, key: value}, PAIRS)
        assert caught.value.message == f"{key} must be between {bounds} (got {value})"


def test_a_conversation_a_plain_format_cannot_hold_is_refused_naming_the_model_and_what_it_lacks():
    with pytest.raises(ApiError) as caught:
        parse_request("chat", {**CHAT, "messages": [{"role": "system", "content": "x"}, *CHAT["messages"]]}, PAIRS)
    assert "the large model 'l'" in caught.value.message and "has no system_turn" in caught.value.message


# --- the whole app on the fake pair, in process ----------------------------------------------

@contextlib.contextmanager
def fake_app(script, prompt=FAKE_PROMPT, queue=4, gate: threading.Event | None = None, cors_origins=(),
             api_key: str | None = None, workers: int = 1, prompt_cache: bool = False, **settings):
    """The real app with `workers` workers over the scripted fake pair, driven by Starlette's TestClient.

    With `gate`, the worker's models write only once the gate is open.
    """
    from starlette.testclient import TestClient

    from glimp_cli.engine import Engine
    from glimp_cli.serve.app import ServerState, build_app
    from glimp_cli.serve.workers import WorkerPool

    registry = Registry({name: ModelSpec(name, prompt=prompt) for name in ("s", "l")}, {}, "fake", [], {}, {})
    pair = PairSpec("fake", "s", "l", **settings)
    fake, extra = (GatedFake, {"gate": gate}) if gate else (FakeBackend, {})
    engines = [Engine(registry, pair, {"small": fake("s", "small", script, **extra),
                                       "large": fake("l", "large", script, **extra)}, prompt_cache)
               for _ in range(workers)]
    pool = WorkerPool("fake", engines, queue)
    served = {"fake": ServedPair(pair, {"s": prompt, "l": prompt})}
    state = ServerState(served, {"fake": pool}, api_key, 1_000_000, tuple(cors_origins))
    try:
        with TestClient(build_app(state)) as client:
            yield client
    finally:
        assert pool.stop(time.monotonic() + 30) == [], "a worker did not stop"


def fake_chat(client, stream: bool, **fields) -> dict:
    """One chat request to the fake app: content, usage, the `glimp` record and the streamed step ends."""
    body = {"model": "glimp/fake", "messages": [{"role": "user", "content": "q?"}], **fields}
    if not stream:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        data = response.json()
        return {"content": data["choices"][0]["message"]["content"], "usage": data["usage"], "glimp": data["glimp"],
                "step_ends": None}
    body.update(stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
    return {"content": "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]),
            "usage": chunks[-1]["usage"], "glimp": final["glimp"],
            "step_ends": [c["glimp"]["step_end"] for c in chunks if "step_end" in c.get("glimp", {})]}


@pytest.mark.parametrize("stop, shown", [
    ("TWO", [("small", "small one"), ("large", "LARGE ")]),  # in the step being written
    ("one", [("small", "small ")]),  # in the first step
    ("LARGE", [("small", "small one"), ("large", "")]),  # at the very start of a step
])
def test_a_stop_string_inside_a_step_counts_the_step_as_far_as_the_cut_in_usage_and_steps(stop, shown):
    with fake_app(SCRIPT, tau=1.0) as client:
        whole = fake_chat(client, False)["glimp"]["steps"]
        for stream in (False, True):
            reply = fake_chat(client, stream, stop=stop)
            steps = reply["glimp"]["steps"]
            assert [(s["model"], s["text"]) for s in steps] == shown
            assert "\n\n".join(s["text"] for s in steps) == reply["content"]
            # Finished steps keep their tokens; the cut one counts what its model generated up to the stop.
            assert [s["tokens"] for s in steps[:-1]] == [s["tokens"] for s in whole[:len(steps) - 1]]
            written = whole[len(steps) - 1]["text"]
            assert steps[-1]["tokens"] == len(written[:written.index(stop) + len(stop)].encode())  # one byte, one token
            assert steps[-1]["stop_reason"] == reply["glimp"]["stop_reason"] == "request_stop"
            assert reply["usage"]["completion_tokens"] == sum(s["tokens"] for s in steps)
            assert reply["glimp"]["summary"]["tokens"] == {
                m: sum(s["tokens"] for s in steps if s["model"] == m) for m in ("small", "large")}
            if stream:
                assert reply["step_ends"] == steps


def test_max_tokens_is_capped_at_what_the_context_leaves_after_the_prompt():
    with fake_app(SCRIPT, tau=1.0) as client:
        reply = fake_chat(client, False, max_tokens=10**12)
        prompts = reply["glimp"]["prompt_tokens"]
        assert set(prompts) == {"small", "large"}
        assert reply["glimp"]["max_tokens"] == 4096 - max(prompts.values())
        assert reply["glimp"]["stop_reason"] == "answer"
        assert fake_chat(client, False, max_tokens=7)["glimp"]["max_tokens"] == 7
        for bad in (0, -3, 2.5, True, "12"):
            response = client.post("/v1/chat/completions", json={
                "model": "glimp/fake", "messages": [{"role": "user", "content": "q?"}], "max_tokens": bad})
            assert response.status_code == 400
            assert response.json() == {"error": {"message": response.json()["error"]["message"],
                                                 "type": "invalid_request_error", "param": "max_tokens", "code": None}}


def test_a_blank_last_step_is_left_out_of_content_usage_and_steps_but_a_blank_inner_one_stays():
    no_marker = dataclasses.replace(FAKE_PROMPT, answer_marker=None)  # else a forced answer follows the blank step
    # The large model writes only the delimiter, then the end: a last step of two tokens and no text.
    with fake_app([S(0.5, "ab", "XY"), S(2.0, "", "")], prompt=no_marker, tau=1.0) as client:
        for stream in (False, True):
            reply = fake_chat(client, stream)
            assert reply["content"] == "ab"
            assert [(s["model"], s["text"], s["tokens"]) for s in reply["glimp"]["steps"]] == [("small", "ab", 4)]
            assert reply["usage"]["completion_tokens"] == 4
            assert reply["glimp"]["large_share"] == 0 and reply["glimp"]["summary"]["tokens"]["large"] == 0
            if stream:
                assert reply["step_ends"] == reply["glimp"]["steps"]
    # With an answer marker a forced answer follows: the blank step stays, streamed once that answer begins.
    with fake_app([S(0.5, "ab", "XY"), S(2.0, "", "")], tau=1.0) as client:
        whole = fake_chat(client, False)
        steps = whole["glimp"]["steps"]
        assert [(s["model"], s["text"], s["tokens"]) for s in steps][:2] == [("small", "ab", 4), ("large", "\n\n", 2)]
        assert steps[2]["forced"] and whole["content"] == "\n\n".join(s["text"] for s in steps)
        streamed = fake_chat(client, True)
        assert streamed["content"] == whole["content"]
        assert streamed["step_ends"] == streamed["glimp"]["steps"]


def test_a_lone_surrogate_is_a_400_that_names_where_it_is_and_a_surrogate_pair_is_text():
    with fake_app(SCRIPT, tau=1.0) as client:
        for raw, where in [(r'"messages": [{"role": "user", "content": "hi \ud800"}]', "messages[0].content"),
                           (r'"messages": [{"role": "user", "content": "hi"}], "\udfff": 1', "\\udfff")]:
            response = client.post("/v1/chat/completions", content=('{"model": "glimp/fake", ' + raw + "}").encode(),
                                   headers={"Content-Type": "application/json"})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == where and "lone UTF-16 surrogate" in error["message"]
        response = client.post("/v1/chat/completions", content=rb'{"model": "glimp/fake", "messages": '
                               rb'[{"role": "user", "content": "hi \ud83d\ude00"}]}',
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text


def test_an_unknown_path_is_a_404_that_lists_the_paths_this_server_offers():
    with fake_app(SCRIPT, tau=1.0) as client:
        response = client.post("/v1/embeddings", json={"model": "glimp/fake", "input": "x"})
        assert response.status_code == 404
        message = response.json()["error"]["message"]
        assert message.startswith("/v1/embeddings is not a path this server offers; it offers GET /, GET /health, ")
        assert "POST /v1/chat/completions" in message and "GET /v1/models/{model}" in message
        assert "under /v1" not in message


def test_a_prompt_too_long_for_the_context_is_refused_at_once_even_with_the_queue_full():
    gate = threading.Event()
    with fake_app(SCRIPT, queue=0, gate=gate, tau=1.0) as client:
        replies = []
        running = threading.Thread(target=lambda: replies.append(fake_chat(client, False)))
        running.start()
        try:
            deadline = time.monotonic() + 30
            while client.get("/health").json()["load"]["fake"]["busy"] < 1:  # the one worker waits at the gate
                assert time.monotonic() < deadline
                time.sleep(0.01)
            body = {"model": "glimp/fake", "messages": [{"role": "user", "content": "q?"}]}
            assert client.post("/v1/chat/completions", json=body).status_code == 503  # no place left
            long = {**body, "messages": [{"role": "user", "content": "x" * 5000}]}  # one token a byte, n_ctx 4096
            response = client.post("/v1/chat/completions", json=long)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "context_length_exceeded"
            assert not replies  # answered while the worker is still busy
        finally:
            gate.set()
            running.join(30)
        assert replies and replies[0]["content"]


def test_cors_preflight_succeeds_from_a_given_origin_only_and_is_off_by_default():
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang"}
    with fake_app(SCRIPT, cors_origins=("http://localhost:3000",), tau=1.0) as client:
        allowed = client.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000", **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "POST" in allowed.headers["access-control-allow-methods"]
        other = client.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        models = client.get("/v1/models", headers={"Origin": "http://localhost:3000"})
        assert models.headers["access-control-allow-origin"] == "http://localhost:3000"
    with fake_app(SCRIPT, tau=1.0) as client:
        off = client.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000", **preflight})
        assert off.status_code == 405 and "access-control-allow-origin" not in off.headers


def test_cors_origins_are_split_at_commas_and_checked():
    from glimp_cli.errors import UsageError
    from glimp_cli.serve.server import _cors_origins

    assert _cors_origins(("http://localhost:3000, https://app.example", "*")) == \
        ("http://localhost:3000", "https://app.example", "*")
    for bad in ("localhost:3000", "http://localhost:3000/", "http://a.example/chat"):
        with pytest.raises(UsageError, match="not an origin"):
            _cors_origins((bad,))


# --- the live page in Node over the app's own answers (no browser) ----------------------------

# The page's script on a stub DOM: fetch answers with what the in-process app answered (`answers`), the
# chat stream is held before its first byte to see what the page shows while the question is read.
PAGE_HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const { page, answers, key, model } = JSON.parse(fs.readFileSync(0, "utf8"));
class El {
  constructor(tag, id) { Object.assign(this, { tagName: tag, id: id || "", className: "", textContent: "", value: "",
    hidden: false, dataset: {}, children: [], parent: null, listeners: {}, options: [], innerHTML: "", disabled: false }); }
  addEventListener(type, fn) { this.listeners[type] = fn; }
  append(...els) { for (const el of els) { el.parent = this; this.children.push(el); } }
  appendChild(el) { this.append(el); return el; }
  replaceChildren(...els) {
    this.children = []; this.append(...els);
    if (this.tagName === "select") { this.options = els; this.value = els.length ? els[0].value : ""; }
  }
  remove() { if (this.parent) this.parent.children = this.parent.children.filter((c) => c !== this); this.parent = null; }
  querySelector(sel) {
    for (const c of this.children) {
      if (sel.startsWith(".") ? c.className.split(" ").includes(sel.slice(1)) : c.tagName === sel) return c;
      const found = c.querySelector(sel); if (found) return found;
    }
    return null;
  }
  find(id) { for (const c of this.children) { if (c.id === id) return c; const f = c.find(id); if (f) return f; } return null; }
}
const fixed = {};
for (const id of ["ask", "question", "model", "tau", "max_tokens", "keyrow", "key", "go", "stop", "status", "steps", "summary"])
  fixed[id] = new El(id === "model" ? "select" : "div", id);
globalThis.document = { getElementById: (id) => fixed[id] || fixed.steps.find(id), createElement: (tag) => new El(tag),
                        body: { dataset: {} } };
globalThis.location = { search: "" };
globalThis.sessionStorage = { items: {}, getItem(k) { return this.items[k] ?? null; }, setItem(k, v) { this.items[k] = v; } };
globalThis.Option = function (text, value) { return { text, value }; };
const cards = () => fixed.steps.children.map((c) => ({ cls: c.className, id: c.id,
  head: (c.querySelector("header") || {}).textContent, text: (c.querySelector(".text") || {}).textContent }));
const seen = {};
globalThis.fetch = async (url, options = {}) => {
  const auth = (options.headers || {}).Authorization;
  const answer = answers[url + (auth ? " " + auth : "")] || answers[url];
  if (url !== "/v1/chat/completions") return new Response(JSON.stringify(answer.body), { status: answer.status });
  seen.sent = { cards: cards(), status: fixed.status.textContent };
  let pulled = false;
  const stream = new ReadableStream({ pull(c) {
    if (!pulled) { seen.reading = { cards: cards(), status: fixed.status.textContent }; pulled = true;
                   c.enqueue(new TextEncoder().encode(answer.body)); } else c.close(); } }, { highWaterMark: 0 });
  return new Response(stream, { status: answer.status });
};
(async () => {
  vm.runInThisContext(page.split("<script>")[1].split("</script>")[0]);
  await new Promise((r) => setTimeout(r, 50));
  seen.models = fixed.model.options.map((o) => o.value);
  if (key) {
    fixed.key.value = key;
    if (fixed.key.listeners.change) await fixed.key.listeners.change();
    await new Promise((r) => setTimeout(r, 50));
    seen.keyed = fixed.model.options.map((o) => o.value);
  }
  fixed.question.value = "q?";
  fixed.model.value = model;
  await fixed.ask.listeners.submit({ preventDefault() {} });
  seen.done = { cards: cards(), status: fixed.status.textContent, state: document.body.dataset.state };
  console.log(JSON.stringify(seen));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def run_page(script, model="glimp/fake", key=None, **settings) -> dict:
    """The page asks `model` a question over the fake app's real answers; what it showed on the way."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script is not run")
    with fake_app(script, api_key=key, **settings) as client:
        page = client.get("/").text
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        answers = {"/health": client.get("/health"), "/v1/models": client.get("/v1/models")}
        if key:
            answers[f"/v1/models Bearer {key}"] = client.get("/v1/models", headers=auth)
        answers = {url: {"status": r.status_code, "body": r.json()} for url, r in answers.items()}
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "q?"}]}
        with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as response:
            answers["/v1/chat/completions"] = {"status": response.status_code, "body": response.read().decode()}
    result = subprocess.run([node, "-e", PAGE_HARNESS], input=json.dumps(
        {"page": page, "answers": answers, "key": key, "model": model}), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# The small model hands the answer over; the large one ends the trace without stating it: a forced answer.
HANDOVER = [S(0.5, "small one", "L1"), S(2.0, "x", "LARGE TWO"), S(0.3, "so: The answer is 4.", "x"),
            S(0.1, "", "It is four.<eos>"), S(0.1, "", " 4.")]


def test_the_page_says_why_a_step_has_no_h_init_instead_of_a_dash():
    shown = run_page(HANDOVER, tau=1.0)
    heads = [c["head"] for c in shown["done"]["cards"]]
    assert heads == ["step 1 · small · H_init 0.50 nats", "step 2 · large · H_init 2.00 nats",
                     "step 3 · small · H_init 0.30 nats", "step 4 · large · answer handed over to large, not probed",
                     "step 5 · large · forced answer (the trace ended: eos), not probed"], heads
    alone = run_page(HANDOVER, model="glimp/fake:large", tau=1.0)  # a mode that never probes
    heads = [c["head"] for c in alone["done"]["cards"]]
    assert heads[0] == "step 1 · large · not probed in this mode" and "forced answer" in heads[-1], heads
    assert not any("nats" in h for h in heads)


def test_the_page_shows_the_question_being_read_until_the_first_token():
    shown = run_page(HANDOVER, tau=1.0)
    assert shown["sent"]["cards"] == [{"cls": "step pending", "id": "pending", "head": "waiting for a worker", "text": ""}]
    assert shown["reading"]["cards"] == [{"cls": "step pending", "id": "pending", "head": "reading the question",
                                          "text": ""}]
    assert shown["reading"]["status"] == "reading the question…"
    done = shown["done"]
    assert done["state"] == "done" and done["cards"] and all(c["id"] != "pending" for c in done["cards"])
    failed = run_page(HANDOVER, model="glimp/nosuch")  # an error: the card goes, the error shows
    assert [c["cls"] for c in failed["done"]["cards"]] == ["error"] and failed["done"]["state"] == "error"


def test_with_an_api_key_the_page_lists_the_mode_variants_once_the_key_is_entered():
    shown = run_page(SCRIPT, key="s3cret", tau=1.0)
    assert shown["models"] == ["glimp/fake"]  # /health's list: /v1/models needs the key
    assert shown["keyed"] == ServedPair(PairSpec("fake", "s", "l"), {}).model_ids()
    assert "glimp/fake:large" in shown["keyed"] and shown["done"]["state"] == "done"


def test_the_page_keeps_ask_and_stop_together_on_one_line():
    from html.parser import HTMLParser

    with fake_app(SCRIPT) as client:
        page = client.get("/").text

    class Parents(HTMLParser):
        def __init__(self):
            super().__init__()
            self.open, self.parent = [], {}

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if "id" in attrs and self.open:
                self.parent[attrs["id"]] = self.open[-1]
            if tag not in ("meta", "input", "br"):  # no end tag
                self.open.append(attrs.get("class") or tag)

        def handle_endtag(self, tag):
            self.open.pop()

    parents = Parents()
    parents.feed(page.replace("<!doctype html>", ""))
    assert parents.parent["go"] == parents.parent["stop"] == "buttons"
    rule = page.split(".row .buttons {", 1)[1].split("}", 1)[0]
    assert "flex: none" in rule  # the pair moves to the next line as one, never Stop alone


# --- the command line's edge ------------------------------------------------------------------

def test_help_imports_no_web_framework_and_no_engine():
    code = ("import sys; from glimp_cli.cli import main\n"
            "for argv in (['glimp', '--help'], ['glimp', 'serve', '--help']):\n"
            "    sys.argv = argv\n"
            "    try:\n        main()\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('starlette', 'uvicorn', 'sse_starlette', 'llama_cpp', 'openai') if m in sys.modules]\n"
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--api-key-env" in result.stdout and "serve" in result.stdout


def test_serve_refuses_a_missing_key_variable_and_a_busy_port_in_one_line(monkeypatch):
    from typer.testing import CliRunner

    from glimp_cli.cli import app

    monkeypatch.delenv("GLIMP_SERVE_NO_SUCH_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--api-key-env", "GLIMP_SERVE_NO_SUCH_KEY"])
    assert result.exit_code == 2
    assert "glimp: error: --api-key-env GLIMP_SERVE_NO_SUCH_KEY: the environment variable" in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output


def test_serve_without_the_extra_says_what_to_install(monkeypatch):
    from glimp_cli.errors import MissingExtraError
    from glimp_cli.serve import ServeOptions, serve

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'glimp\[serve\]'"):
        serve(ServeOptions(load_registry(), []))


# --- a real server ----------------------------------------------------------------------------

# Budgets that keep each trace short but give both models a step on QUESTION.
MAX_TOKENS, MAX_STEP_TOKENS = 48, 32
QUESTION = GSM8K_QUESTIONS[0]
KEY_ENV, KEY = "GLIMP_SERVE_TEST_KEY", "test-key-123"
START_SECONDS = 180  # loading on a busy shared machine can be slow
REQUEST_SECONDS = 180


def tiny_pair() -> str:
    """The packaged pair of SmolLM2-135M and Gemma 3 270M: `tiny`, or `default` before it was renamed."""
    pairs = load_registry().pairs
    return "tiny" if "tiny" in pairs else "default"


@pytest.fixture(scope="module")
def one_thread(tmp_path_factory) -> Path:
    """The packaged models.yaml with the tiny pair's models on one thread each."""
    config = yaml.safe_load(packaged_config().read_text(encoding="utf-8"))
    pair = config["pairs"][tiny_pair()]
    for role in ("small", "large"):
        config["models"][pair[role]]["threads"] = 1
    path = tmp_path_factory.mktemp("config") / "models.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLIMP_")}
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `glimp serve` process on 127.0.0.1 at a free port (the tiny pair by default), ready when /health answers."""

    def __init__(self, log_path: Path, config: Path, *args: str, env: dict | None = None, pair: str | None = None):
        self.port = free_port()
        self.pair = pair or tiny_pair()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "glimp_cli", "serve", "--config", str(config), "--pair", self.pair,
             "--port", str(self.port), "--max-tokens", str(MAX_TOKENS), "--max-step-tokens", str(MAX_STEP_TOKENS),
             *args], stdout=self.log, stderr=subprocess.STDOUT, env=env or clean_env())
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert self.proc.poll() is None, f"glimp serve exited: {self.output()}"
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"glimp serve did not start: {self.output()}"
            time.sleep(0.2)

    def output(self) -> str:
        return self.log_path.read_text()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_SECONDS)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()

    def get(self, path: str):
        status, data, _ = self.request("GET", path)
        return status, json.loads(data)

    def load(self) -> dict:
        return self.get("/health")[1]["load"][self.pair]

    def wait_load(self, what, seconds: float = REQUEST_SECONDS) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            load = self.load()
            if what(load):
                return load
            assert time.monotonic() < deadline, f"load never reached the expected state: {load}"
            time.sleep(0.05)

    def client(self, key: str = "unused"):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=REQUEST_SECONDS)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    """One worker, a queue of one, a small body limit."""
    srv = Server(tmp_path_factory.mktemp("serve") / "serve.log", one_thread, "--workers", "1", "--queue", "1",
                 "--max-body-bytes", "20000")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, one_thread):
    """Two workers, a queue of two, an API key."""
    srv = Server(tmp_path_factory.mktemp("serve-auth") / "serve.log", one_thread, "--workers", "2", "--queue", "2",
                 "--api-key-env", KEY_ENV, env=clean_env(**{KEY_ENV: KEY}))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def asked(tmp_path_factory, one_thread) -> dict:
    """`glimp ask --json` on QUESTION with the server's settings."""
    result = subprocess.run(
        [sys.executable, "-m", "glimp_cli", "ask", QUESTION, "--json", "--config", str(one_thread), "--pair",
         tiny_pair(), "--max-tokens", str(MAX_TOKENS), "--max-step-tokens", str(MAX_STEP_TOKENS)],
        capture_output=True, text=True, env=clean_env(), timeout=REQUEST_SECONDS)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def model_id(mode: str | None = None) -> str:
    return f"glimp/{tiny_pair()}" + (f":{mode}" if mode else "")


def chat(client, question=QUESTION, **kwargs):
    return client.chat.completions.create(model=kwargs.pop("model", model_id()),
                                          messages=[{"role": "user", "content": question}], **kwargs)


def steps_view(steps) -> list[tuple]:
    return [(s["index"], s["model"], s["text"], s["tokens"], s["stop_reason"]) for s in steps]


def check_stream(chunks, glimp_steps, content_of) -> str:
    """The streamed text; each step announced once, in order, by the chunk whose text starts it."""
    text, starts, pieces = "", [], {}
    for chunk in chunks:
        extra = chunk.model_extra or {}
        start = (extra.get("glimp") or {}).get("step_start")
        if start:
            starts.append(start)
        piece = content_of(chunk) or ""
        if starts:
            pieces[starts[-1]["index"]] = pieces.get(starts[-1]["index"], "") + piece
        else:
            assert not piece, "text before any step was announced"
        text += piece
    assert [(s["index"], s["model"]) for s in starts] == [(s["index"], s["model"]) for s in glimp_steps]
    assert [s["h_init"] for s in starts] == pytest.approx([s["h_init"] for s in glimp_steps], abs=1e-9)
    assert [pieces.get(s["index"], "") for s in glimp_steps] == \
        [("\n\n" if s["index"] else "") + s["text"] for s in glimp_steps]
    return text


@pytest.mark.real
def test_chat_and_completions_streamed_or_not_give_the_trace_glimp_ask_writes(server, asked):
    client = server.client()
    expected = "\n\n".join(s["text"] for s in asked["steps"])
    assert {s["model"] for s in asked["steps"]} == {"small", "large"}, "QUESTION should use both models"

    whole = chat(client, temperature=0)
    glimp = whole.model_extra["glimp"]
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == ("length" if asked["stop_reason"] in ("max_tokens", "context_full") else "stop")
    assert steps_view(glimp["steps"]) == steps_view(asked["steps"])
    assert [s["h_init"] for s in glimp["steps"]] == pytest.approx([s["h_init"] for s in asked["steps"]], abs=1e-3)
    assert (glimp["pair"], glimp["tau"], glimp["mode"], glimp["stop_reason"], glimp["answer_text"]) == \
        (asked["pair"], asked["tau"], asked["mode"], asked["stop_reason"], asked["answer_text"])
    assert glimp["summary"]["large_share_steps"] == pytest.approx(asked["summary"]["large_share_steps"])
    assert whole.usage.completion_tokens == sum(s["tokens"] for s in asked["steps"])
    assert whole.usage.prompt_tokens > 0

    chunks = list(chat(client, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert check_stream(chunks, glimp["steps"], lambda c: c.choices[0].delta.content if c.choices else None) == expected
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert steps_view(final.model_extra["glimp"]["steps"]) == steps_view(asked["steps"])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices

    text = client.completions.create(model=model_id(), prompt=QUESTION, temperature=0)
    assert text.choices[0].text == expected
    assert steps_view(text.model_extra["glimp"]["steps"]) == steps_view(asked["steps"])
    chunks = list(client.completions.create(model=model_id(), prompt=QUESTION, temperature=0, stream=True))
    assert check_stream(chunks, glimp["steps"], lambda c: c.choices[0].text if c.choices else None) == expected


@pytest.mark.real
def test_models_lists_each_pair_and_its_modes_and_overrides_reach_the_router(server, asked):
    client = server.client()
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == model_id() and model_id("large") in ids and model_id("small") in ids
    assert client.models.retrieve(model_id("large")).model_extra["glimp"]["mode"] == "large"
    large = chat(client, model=model_id("large"), max_tokens=12)
    g = large.model_extra["glimp"]
    assert g["mode"] == "large" and {s["model"] for s in g["steps"]} == {"large"}
    assert all(s["h_init"] is None for s in g["steps"]) and sum(s["tokens"] for s in g["steps"]) <= 12
    small = chat(client, max_tokens=12, extra_body={"mode": "glimp", "tau": 100.0})
    g = small.model_extra["glimp"]
    assert g["tau"] == 100.0 and g["policy"] == "glimp(tau=100)"
    assert [s["model"] for s in g["steps"]][:-1] == ["small"] * (len(g["steps"]) - 1)
    cut = chat(client, stop=[" "], temperature=0)
    assert cut.choices[0].message.content == asked["steps"][0]["text"].split(" ")[0]
    assert cut.model_extra["glimp"]["stop_reason"] == "request_stop"


def long_question() -> str:
    """A question whose prompt keeps a worker in prefill for a moment (about 500 tokens)."""
    return " ".join(GSM8K_QUESTIONS) * 2


@pytest.mark.real
def test_a_full_queue_answers_503_and_clients_that_leave_free_their_worker(server, asked):
    client = server.client()
    before = server.load()
    body = json.dumps({"model": model_id(), "stream": True, "messages": [{"role": "user", "content": QUESTION}]})
    # One worker busy (in the prefill of a long prompt) and one request waiting fill this server.
    running = chat(client, long_question(), stream=True, max_tokens=8)
    queued = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_SECONDS)
    queued.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    server.wait_load(lambda load: load["busy"] == 1 and load["waiting"] == 1)
    status, data, headers = server.request("POST", "/v1/chat/completions", body.encode(),
                                           {"Content-Type": "application/json"})
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert json.loads(data)["error"]["code"] == "server_overloaded"
    queued.close()  # leaves while waiting: skipped
    running.close()  # leaves while the worker is still in the prefill: stopped at its first token
    load = server.wait_load(lambda load: load["busy"] == 0 and load["waiting"] == 0)
    assert load["disconnected"] - before["disconnected"] == 2 and load["done"] == before["done"]
    # A client that leaves after its first piece of text, mid-trace, stops its trace there.
    stream = chat(client, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    load = server.wait_load(lambda load: load["busy"] == 0)
    assert load["disconnected"] - before["disconnected"] == 3, "the abandoned trace must be stopped, not finished"
    assert load["done"] == before["done"]
    # The worker is free and its models start clean: the next answer is the one a fresh process gives.
    again = chat(client, temperature=0)
    assert again.choices[0].message.content == "\n\n".join(s["text"] for s in asked["steps"])


@pytest.mark.real
def test_several_clients_at_once_are_all_answered_none_mixed(auth_server):
    client = auth_server.client(KEY)
    questions = GSM8K_QUESTIONS[1:5]  # four requests: two workers busy, two waiting
    results: dict[int, list] = {}

    def ask(i: int) -> None:
        results[i] = list(chat(client, questions[i], stream=True, max_tokens=12, temperature=0))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_SECONDS * 2)
    assert sorted(results) == list(range(len(questions)))
    for i, question in enumerate(questions):
        chunks = results[i]
        assert len({c.id for c in chunks}) == 1, "one request's chunks carry one id"
        final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1].model_extra["glimp"]
        streamed = check_stream(chunks, final["steps"], lambda c: c.choices[0].delta.content if c.choices else None)
        alone = chat(client, question, max_tokens=12, temperature=0)
        assert streamed == alone.choices[0].message.content
        assert steps_view(final["steps"]) == steps_view(alone.model_extra["glimp"]["steps"])


@pytest.mark.real
def test_with_an_api_key_every_v1_route_needs_it_but_the_page_and_health(auth_server):
    import openai

    with pytest.raises(openai.AuthenticationError) as caught:
        auth_server.client("wrong").models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    for path, method in [("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/v1/completions", "POST")]:
        status, data, headers = auth_server.request(method, path, b"{}")
        assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
        assert headers["www-authenticate"] == "Bearer"
    assert [m.id for m in auth_server.client(KEY).models.list().data][0] == model_id()
    assert auth_server.request("GET", "/")[0] == 200
    status, health = auth_server.get("/health")
    assert status == 200 and health["auth"] is True


@pytest.mark.real
def test_bad_input_gets_openai_error_json_with_its_status(server):
    import openai

    client = server.client()
    json_headers = {"Content-Type": "application/json"}
    assert server.get("/health")[1]["auth"] is False
    cases = [
        ("POST", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b"", 400, None),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400, None),
        ("POST", "/v1/chat/completions", json.dumps({"model": model_id(), "pad": "x" * 30000}).encode(), 413,
         "request_too_large"),
        ("GET", "/v1/nothing-here", None, 404, "not_found"),
        ("GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
    ]
    for method, path, body, status, code in cases:
        got, data, _ = server.request(method, path, body, json_headers)
        error = json.loads(data)["error"]
        assert (got, error["code"]) == (status, code) if code else got == status, (path, body[:40] if body else None, data)
        assert error["message"] and "Traceback" not in error["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, model="glimp/no-such-pair")
    assert caught.value.body["code"] == "model_not_found"
    for kwargs, param in [({"n": 2}, "n"), ({"temperature": 5}, "temperature"), ({"max_tokens": -3}, "max_tokens"),
                          ({"extra_body": {"tau": "high"}}, "tau"), ({"extra_body": {"mode": "fast"}}, "mode")]:
        with pytest.raises(openai.BadRequestError) as caught:
            chat(client, **kwargs)
        assert caught.value.body["param"] == param
    # Prompts that cannot fit the 2048-token contexts: a 400 before any generation, streamed or not.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            chat(client, "eleven " * 2500, stream=stream)
        assert caught.value.body["code"] == "context_length_exceeded" and "context of 2048" in caught.value.message
    # A budget past what the contexts leave after the prompt is capped there (the stop string ends the trace early).
    capped = chat(client, max_tokens=4000, stop=[" "]).model_extra["glimp"]
    assert capped["max_tokens"] == 2048 - max(capped["prompt_tokens"].values())
    assert "Traceback" not in server.output()


# --- a server in front of an upstream the test controls ----------------------------------------

UPSTREAM_CTX = 512
HANG = "Never answered:"  # a question the upstream gets and never answers while the test runs


@pytest.fixture(scope="module")
def upstream():
    """A scripted OpenAI-compatible server with one model: it answers "The answer is 4." (or, to HANG, nothing)."""
    release = threading.Event()
    fake = FakeServer()
    fake.on("/v1/models", (200, {"object": "list", "data": [{"id": "m"}]}))

    def answer(body):
        if HANG in body["prompt"]:
            release.wait(REQUEST_SECONDS)  # as a server stuck in a long prefill
        return 200, [event("The answer is 4."), event("", "stop")]

    fake.on("/v1/completions", answer)
    yield fake
    release.set()
    fake.close()


@pytest.fixture(scope="module")
def upstream_config(upstream, tmp_path_factory) -> Path:
    """A pair `up` of two models behind the upstream (backend openai), in mode large: no probe."""
    prompt = {"style": "plain", "template": "Q: {question}\nA:\n", "answer_marker": "The answer is"}
    model = {"backend": "openai", "base_url": upstream.url, "model": "m", "n_ctx": UPSTREAM_CTX, "prompt": prompt}
    config = {"models": {"up-small": dict(model), "up-large": dict(model)},
              "pairs": {"up": {"small": "up-small", "large": "up-large", "estimator": "topk:20", "mode": "large"}}}
    path = tmp_path_factory.mktemp("upstream") / "models.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def upstream_server(upstream_config, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve-up") / "serve.log", upstream_config, pair="up")
    yield srv
    srv.stop()


def post_chat(srv: Server, question: str, **fields):
    body = {"model": "glimp/up", "messages": [{"role": "user", "content": question}], **fields}
    status, data, _ = srv.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                                  {"Content-Type": "application/json"})
    return status, json.loads(data)


def test_max_tokens_is_capped_at_the_context_before_it_reaches_an_upstream(upstream, upstream_server):
    status, reply = post_chat(upstream_server, "What is 2+2?", max_tokens=10**12, max_step_tokens=10**12)
    assert status == 200, reply
    asked = [b["max_tokens"] for b in upstream.posted("/v1/completions") if "2+2" in b["prompt"]]
    assert asked and max(asked) <= UPSTREAM_CTX
    assert reply["glimp"]["max_tokens"] == UPSTREAM_CTX  # the server's prompt tokens are not visible here
    assert reply["choices"][0]["message"]["content"] == "The answer is 4."


def test_a_deeply_nested_body_is_a_400_in_openai_shape_and_no_traceback(upstream_server):
    status, data, _ = upstream_server.request("POST", "/v1/chat/completions", b"[" * 200_000,
                                              {"Content-Type": "application/json"})
    error = json.loads(data)["error"]
    assert status == 400, error
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json" and "nested" in error["message"]
    assert "Traceback" not in upstream_server.output()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_worker_stuck_in_an_upstream_call_is_abandoned_within_the_bound_and_the_server_exits(
        sig, upstream, upstream_config, tmp_path):
    srv = Server(tmp_path / "serve.log", upstream_config, "--workers", "1", "--queue", "1", pair="up")
    replies: dict[str, tuple] = {}

    def ask(name: str) -> None:
        try:
            replies[name] = post_chat(srv, f"{HANG} {name} {sig}?")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            replies[name] = (None, repr(exc))

    try:
        running = threading.Thread(target=ask, args=("running",))
        running.start()
        deadline = time.monotonic() + REQUEST_SECONDS
        while not any(f"running {sig}?" in b["prompt"] for b in upstream.posted("/v1/completions")):
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.05)
        queued = threading.Thread(target=ask, args=("queued",))
        queued.start()
        srv.wait_load(lambda load: load["waiting"] == 1)
        signalled = time.monotonic()
        srv.proc.send_signal(sig)
        assert srv.proc.wait(STOP_SECONDS + 30) == 0, srv.output()
        assert time.monotonic() - signalled < STOP_SECONDS + 10  # on a busy machine; without the bound, minutes
        for thread in (running, queued):
            thread.join(30)
        # Both requests are answered 503 when the bound is reached, before the process exits.
        for name in ("running", "queued"):
            status, reply = replies[name]
            assert status == 503 and reply["error"]["code"] == "server_shutting_down", (name, reply)
        lines = [line for line in srv.output().splitlines() if "abandoned" in line]
        assert len(lines) == 1 and "glimp-serve-up-0" in lines[0] and f"{STOP_SECONDS:g} s" in lines[0], srv.output()
        assert f"stopped ({signal.Signals(sig).name})" in srv.output() and "Traceback" not in srv.output()
    finally:
        srv.stop()


class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe: CDP messages on fds 3 and 4, NUL-separated."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")

    def __init__(self, executable: str, profile: Path, width: int = 1000, height: int = 1300):
        import fcntl

        to_chrome, self._to = os.pipe()
        self._from, from_chrome = os.pipe()
        # Above fd 4, so that putting them on 3 and 4 cannot overwrite one with the other.
        low = (to_chrome, from_chrome)
        to_chrome, from_chrome = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in low)
        for fd in low:
            os.close(fd)
        args = [executable, *self.FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                "--remote-debugging-pipe", "about:blank"]
        # bash (dash takes one-digit fds only) puts the pipes where Chromium expects them, then becomes it.
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome} 4>&{from_chrome}', *args],
                                     pass_fds=(to_chrome, from_chrome), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id, self.session = b"", 0, None

    def send(self, method: str, params: dict | None = None, browser: bool = False, timeout: float = 60):
        import select

        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not browser:
            message["sessionId"] = self.session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    assert "error" not in reply, f"{method}: {reply['error']}"
                    return reply["result"]
            left = deadline - time.monotonic()
            assert left > 0, f"Chromium did not answer {method}"
            if select.select([self._from], [], [], left)[0]:
                data = os.read(self._from, 1 << 20)
                assert data, "Chromium exited"
                self._buffer += data

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, browser=True)["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float):
        deadline = time.monotonic() + seconds
        while not self.eval(expression):
            assert time.monotonic() < deadline, f"the page never got to: {expression}"
            time.sleep(0.1)

    def click(self, selector: str) -> None:
        box = self.eval(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                        " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        try:
            self.send("Browser.close", browser=True, timeout=10)
            self.proc.wait(20)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to)
            os.close(self._from)


def colour_pixels(png: bytes, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many pixels of the screenshot are close to `rgb`."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(count for count, pixel in image.getcolors(image.width * image.height)
               if all(abs(a - b) <= tolerance for a, b in zip(pixel, rgb)))


@pytest.mark.real
def test_the_page_streams_coloured_steps_with_h_init_and_a_summary(server, asked, tmp_path):
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    browser = Chromium(executable, tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        browser.wait_for("document.getElementById('model') && document.getElementById('model').options.length > 0", 60)
        assert browser.eval("document.getElementById('model').value") == model_id()
        blank = browser.screenshot()
        browser.eval("document.getElementById('question').focus()")
        browser.send("Input.insertText", {"text": QUESTION})
        browser.click("#go")
        browser.wait_for("['done', 'error'].includes(document.body.dataset.state)", REQUEST_SECONDS)
        errors = browser.eval("[...document.querySelectorAll('.error')].map(e => e.textContent)")
        assert not errors, errors
        steps = browser.eval("""[...document.querySelectorAll('.step')].map(e => ({
            model: e.dataset.model, h: e.dataset.hInit, head: e.querySelector('header').textContent,
            text: e.querySelector('.text').textContent, colour: getComputedStyle(e.querySelector('.text')).color,
            foot: (e.querySelector('footer') || {}).textContent}))""")
        summary = browser.eval("document.getElementById('summary').innerText")
        shot = browser.screenshot()
    finally:
        browser.close()
    (tmp_path / "page.png").write_bytes(shot)
    assert [s["model"] for s in steps] == [s["model"] for s in asked["steps"]]
    assert [s["text"] for s in steps] == [s["text"].lstrip() for s in asked["steps"]]
    for shown, step in zip(steps, asked["steps"]):
        if step["h_init"] is None:  # the page says why: handed over, a forced answer, a mode without a probe
            assert "not probed" in shown["head"] and "nats" not in shown["head"], shown["head"]
        else:
            assert shown["head"] == f"step {step['index'] + 1} · {step['model']} · H_init {step['h_init']:.2f} nats"
        assert shown["foot"].startswith(f"{step['tokens']} tokens")
    colours = {s["model"]: s["colour"] for s in steps}
    assert colours == {"small": "rgb(14, 143, 168)", "large": "rgb(180, 39, 158)"}
    assert "large share" in summary and "wall time" in summary and asked["stop_reason"] in summary
    # The screenshot shows much more of both models' colours than the page before the question (its title).
    for rgb in ((14, 143, 168), (180, 39, 158)):
        assert colour_pixels(shot, rgb) - colour_pixels(blank, rgb) > 1000, f"no step in {rgb} rendered"


def stop_mid_stream(srv: Server, sig: int, key: str = "unused") -> None:
    """Stop a server by `sig` while one stream runs and one request waits: both end with an error, nothing hangs."""
    import openai

    client = srv.client(key)
    stream = chat(client, stream=True, max_tokens=200, extra_body={"max_step_tokens": 128})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    outcome: dict = {}

    def wait_in_queue():
        try:
            outcome["answer"] = chat(client, max_tokens=200)
        except openai.APIError as exc:  # with workers to spare it may connect only once the server stopped listening
            outcome["error"] = exc

    thread = threading.Thread(target=wait_in_queue)
    thread.start()
    workers = srv.load()["workers"]
    if workers == 1:
        srv.wait_load(lambda load: load["waiting"] == 1)
    srv.proc.send_signal(sig)
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert "shutting down" in caught.value.message
    thread.join(REQUEST_SECONDS)
    if workers == 1:
        assert outcome["error"].status_code == 503 and "shutting down" in outcome["error"].message
    assert srv.proc.wait(60) == 0
    assert f"stopped ({signal.Signals(sig).name})" in srv.output()
    assert "Traceback" not in srv.output()


# Last in the file: it stops both module servers (pytest runs a module's tests in file order).
@pytest.mark.real
def test_sigterm_and_ctrl_c_stop_the_server_cleanly_and_in_flight_streams_end_with_an_error(server, auth_server):
    stop_mid_stream(server, signal.SIGTERM)
    stop_mid_stream(auth_server, signal.SIGINT, KEY)
