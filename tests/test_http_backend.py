"""The HTTP backend (`backend: openai`): exact error paths on a small fake server, the text-level side of
the router on an in-process text fake, and (marked `real`) the real llama.cpp server on the packaged pair.

All traffic stays on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import FAKE_PROMPT, GSM8K_QUESTIONS, fake_router
from glimp_cli.backends.base import ContextFull, StepStop, StepScanner, Written
from glimp_cli.backends.fake import ScriptedStep as S
from glimp_cli.backends.http_transport import Endpoint
from glimp_cli.backends.openai_http import RUNNING_FORM, TEXT_END_FORM, OpenAIBackend, connect, reachability
from glimp_cli.batch import run_batch
from glimp_cli.cli import app
from glimp_cli.config import ModelSpec, PromptFormat
from glimp_cli.entropy import parse_estimator, topk_entropy, topk_entropy_from_logprobs
from glimp_cli.errors import BackendError, ConfigError, ContextLimitError
from glimp_cli.policies import always_large, always_small, threshold
from glimp_cli.questions import Question
from glimp_cli.results_file import ResultsFile
from glimp_cli.router import RouteSettings, Router
from glimp_cli.sampling import Sampling
from glimp_cli.sides import ModelSlot

runner = CliRunner()
PLAIN = PromptFormat(style="plain", template="Q: {question}\nA:\n", answer_marker="The answer is")


# ---------------------------------------------------------------------------------------------
# A scripted fake OpenAI-compatible server, for exact error paths.
# ---------------------------------------------------------------------------------------------

CUT = None  # in a scripted stream: close the connection without [DONE]


class FakeServer:
    """An http.server on 127.0.0.1 that answers each path from a queue of scripted replies.

    A reply is (status, body) with body a dict (JSON), a str (sent as is), or a list of events
    (sent as a server-sent-event stream ending in [DONE]: a dict is one `data:` line, a str is raw
    stream text, CUT closes the connection there); ("sleep", seconds) to stall; or a
    callable of the request body giving one of those. A path's last reply repeats. Every request
    is recorded as (path, body, headers).
    """

    def __init__(self):
        self.replies: dict[str, list] = {}
        self.requests: list[tuple[str, dict | None]] = []
        self.arrived = threading.Condition()  # notified as each request is recorded
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._reply(None)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._reply(json.loads(raw) if raw else None)

            def _reply(self, body):
                with server.arrived:
                    server.requests.append((self.path, body, dict(self.headers)))
                    server.arrived.notify_all()
                queue = server.replies.get(self.path) or [(404, {"error": {"message": f"no route {self.path}"}})]
                reply = queue.pop(0) if len(queue) > 1 else queue[0]
                if callable(reply):
                    reply = reply(body)
                if reply[0] == "sleep":
                    time.sleep(reply[1])
                    reply = (200, {"data": []})
                status, payload = reply
                if isinstance(payload, list):
                    self.send_response(status)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    try:
                        for event in payload:
                            if event is CUT:
                                return  # the connection closes here, no [DONE]
                            raw = event if isinstance(event, str) else f"data: {json.dumps(event)}\n\n"
                            self.wfile.write(raw.encode())
                            self.wfile.flush()
                        self.wfile.write(b"data: [DONE]\n\n")
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client closed the stream early (the end of a step)
                    return
                data = payload if isinstance(payload, str) else json.dumps(payload)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data.encode())))
                    self.end_headers()
                    self.wfile.write(data.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (a timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def on(self, path: str, *replies) -> None:
        self.replies[path] = list(replies)

    def wait_for_requests(self, n: int, within: float = 30.0) -> int:
        """How many requests were recorded, once at least `n` are (or `within` seconds passed).

        A client that gave up on a timeout may have sent a request the server's thread has not
        picked up yet (on a loaded machine it can be descheduled for longer than the timeout).
        """
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.requests) >= n, timeout=within)
            return len(self.requests)

    def posted(self, path: str) -> list[dict]:
        return [body for p, body, _ in self.requests if p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    server = FakeServer()
    server.on("/v1/models", (200, {"object": "list", "data": [{"id": "m"}]}))
    yield server
    server.close()


def spec_for(url: str, **changes) -> ModelSpec:
    values = dict(name="remote", backend="openai", base_url=url, model="m", prompt=PLAIN, timeout=10.0,
                  max_retries=1)
    values.update(changes)
    return ModelSpec(**values)


def fast(backend: OpenAIBackend) -> OpenAIBackend:
    backend.endpoint.backoff = 0.01  # retries without waiting in tests
    return backend


def event(text: str = "", finish: str | None = None, logprobs: dict | None = None) -> dict:
    return {"choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}


def top_event(token: str, top: dict[str, float]) -> dict:
    return event(token, None, {"tokens": [token], "text_offset": [0], "token_logprobs": [top.get(token, -9.0)],
                               "top_logprobs": [top]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(exc: BaseException, *needles: str) -> str:
    text = str(exc)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


# -- transport: retries, timeouts, HTTP errors ---------------------------------------------------

def test_a_server_that_is_down_is_one_line_naming_model_and_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.perf_counter()
    with pytest.raises(BackendError) as info:
        endpoint = Endpoint("model 'remote'", url, max_retries=2, backoff=0.01, timeout=1.0)
        endpoint.get_json("/models")
    one_line(info.value, "model 'remote'", f"{url}/models", "connection refused", "3 attempts")
    assert time.perf_counter() - t0 < 5


def test_a_timeout_is_retried_then_one_line(fake_server):
    fake_server.on("/v1/models", ("sleep", 1.0))
    endpoint = Endpoint("model 'remote'", fake_server.url, timeout=0.3, max_retries=1, backoff=0.01)
    t0 = time.perf_counter()
    with pytest.raises(BackendError) as info:
        endpoint.get_json("/models")
    elapsed = time.perf_counter() - t0
    one_line(info.value, "timeout", fake_server.url, "2 attempts")
    assert fake_server.wait_for_requests(2) == 2
    assert elapsed < 3


def test_a_500_is_retried_and_the_second_answer_is_used(fake_server):
    fake_server.on("/v1/completions",
                   (500, {"error": {"message": "busy"}}),
                   (200, [event("hello"), event("", "stop")]))
    backend = fast(connect(spec_for(fake_server.url)))
    backend.text = "Q: x\nA:\n"
    written = backend.write(None, StepStop("\n\n"), Sampling(), np.random.default_rng(0))
    assert written.text == "hello" and written.reason == "eos"
    assert len(fake_server.posted("/v1/completions")) == 2


def scripted_tokens(prompt_start: str, tokens: list[str]):
    """A completions reply that continues the prompt along `tokens`, honouring max_tokens like a server."""
    def reply(body):
        done = body["prompt"][len(prompt_start):]
        k, text = 0, ""
        while k < len(tokens) and text != done:
            text += tokens[k]
            k += 1
        assert text == done, (text, done)
        sent = tokens[k:k + body["max_tokens"]]
        finish = "length" if k + len(sent) < len(tokens) else "stop"
        return 200, [event(t) for t in sent] + [event("", finish)]
    return reply


def test_an_answer_step_over_http_runs_past_its_delimiter_and_step_limit(fake_server):
    # `The answer is:` then the number on the next line, then more text; the step limit is 4 tokens.
    tokens = ["The", " answer", " is", ":", "\n", "4", "2", "\n", "more", "\n"]
    fake_server.on("/v1/completions", scripted_tokens("Q: x\nA:\n", tokens))
    backend = fast(connect(spec_for(fake_server.url)))
    backend.text = "Q: x\nA:\n"
    stop = StepStop("\n", max_new_tokens=4, final_markers=("The answer is",), answer_tokens=50)
    written = backend.write(None, stop, Sampling(), np.random.default_rng(0))
    assert written.text == "The answer is:\n42" and written.reason == "delimiter"
    # Each request asks for the step's limit (a server refuses more than its context); the answer goes on.
    assert [b["max_tokens"] for b in fake_server.posted("/v1/completions")] == [4, 46]
    # A step that is not the answer ends at its own limit.
    fake_server.on("/v1/completions", scripted_tokens("Q: x\nA:\n", ["a", "b", "c", "d", "e", "\n"]))
    written = backend.write(None, stop, Sampling(), np.random.default_rng(0))
    assert written.text == "abcd" and written.reason == "length"
    assert fake_server.posted("/v1/completions")[-1]["max_tokens"] == 4


def test_5xx_every_time_gives_up_after_max_retries(fake_server):
    fake_server.on("/v1/completions", (503, {"detail": "overloaded"}))
    backend = fast(connect(spec_for(fake_server.url, max_retries=2)))
    with pytest.raises(BackendError) as info:
        backend.write(None, StepStop("\n\n"), Sampling(), np.random.default_rng(0))
    one_line(info.value, "HTTP 503", "overloaded", "3 attempts", f"{fake_server.url}/completions")


def test_a_4xx_is_not_retried(fake_server):
    # vLLM answers a model name it does not serve with a 404.
    fake_server.on("/v1/completions", (404, {"error": {"message": "The model `m` does not exist."}}))
    backend = fast(connect(spec_for(fake_server.url, max_retries=3)))
    with pytest.raises(BackendError) as info:
        backend.write(None, StepStop("\n\n"), Sampling(), np.random.default_rng(0))
    one_line(info.value, "HTTP 404", "does not exist", "model 'remote'")
    assert len(fake_server.posted("/v1/completions")) == 1


def test_a_model_the_server_does_not_list_is_refused_at_load(fake_server):
    # llama.cpp's server would silently answer with its own model: glimp checks the list first.
    with pytest.raises(BackendError) as info:
        connect(spec_for(fake_server.url, model="other"))
    one_line(info.value, "does not serve 'other'", "it serves m", f"{fake_server.url}/models")


def test_malformed_json_is_one_line(fake_server):
    fake_server.on("/v1/models", (200, "{not json"))
    with pytest.raises(BackendError) as info:
        connect(spec_for(fake_server.url))
    one_line(info.value, "malformed JSON", "{not json")
    fake_server.on("/v1/models", (200, {"data": [{"id": "m"}]}))
    fake_server.on("/v1/completions", (200, "data: {oops\n\n"))
    backend = fast(connect(spec_for(fake_server.url)))
    with pytest.raises(BackendError) as info:
        backend.write(None, StepStop("\n\n"), Sampling(), np.random.default_rng(0))
    one_line(info.value, "malformed JSON", "/completions")


def test_a_context_overflow_is_context_full_not_an_error(fake_server):
    fake_server.on("/v1/completions", (400, {"error": {
        "message": "This model's maximum context length is 2048 tokens, however you requested 3005 tokens",
        "code": "context_length_exceeded"}}))
    backend = fast(connect(spec_for(fake_server.url)))
    with pytest.raises(ContextFull):
        backend.write(None, StepStop("\n\n"), Sampling(), np.random.default_rng(0))


def test_the_api_key_comes_from_the_named_environment_variable(fake_server, monkeypatch):
    monkeypatch.delenv("GLIMP_TEST_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        connect(spec_for(fake_server.url, api_key_env="GLIMP_TEST_KEY"))
    one_line(info.value, "$GLIMP_TEST_KEY", "not set")
    monkeypatch.setenv("GLIMP_TEST_KEY", "sk-test")
    connect(spec_for(fake_server.url, api_key_env="GLIMP_TEST_KEY"))
    assert fake_server.requests[-1][2].get("Authorization") == "Bearer sk-test"


def test_reachability_is_one_quick_request(fake_server):
    up, what = reachability(spec_for(fake_server.url))
    assert up and "serves m" in what
    up, what = reachability(spec_for(fake_server.url, model="other"))
    assert not up and "does not serve 'other'" in what
    t0 = time.perf_counter()
    up, what = reachability(spec_for(f"http://127.0.0.1:{free_port()}/v1"))
    assert not up and "connection refused" in what and time.perf_counter() - t0 < 3


# -- probe and write ---------------------------------------------------------------------------

TOP = {"The": -0.2, "So": -2.0, "We": -3.0}


def held_back_server(server: FakeServer, honour_bias: bool = True) -> None:
    """llama.cpp server's tokenizer endpoints for a SmolLM2-like tokenizer: "\\n\\nA" -> 198, 198, 32."""
    server.on("/extras/tokenize", (200, {"tokens": [198, 198, 32]}))
    pieces = {198: "\n", 32: "A"}
    server.on("/extras/detokenize", lambda body: (200, {"text": "".join(pieces[i] for i in body["tokens"])}))
    forced = top_event("\n", {"\n": 0.0}) if honour_bias else top_event(".", {".": -0.1})
    server.on("/v1/completions", (200, [forced, top_event("\n", TOP), event("", "length")]))


def test_the_probe_holds_the_delimiter_back_and_reads_after_the_forced_tokens(fake_server):
    held_back_server(fake_server)
    backend = connect(spec_for(fake_server.url))
    backend.top_k = 2
    backend.text = "Q: x\nA:\nstep one\n\n"
    logprobs = backend.next_logits()
    body = fake_server.posted("/v1/completions")[-1]
    # The context without the delimiter's last newline, that newline forced, the top-K read after it.
    assert body["prompt"] == "Q: x\nA:\nstep one\n"
    assert body["logit_bias"] == {"198": 100.0} and body["max_tokens"] == 2 and body["logprobs"] == 2
    assert body["temperature"] == 0.0 and body["stream"] is True
    assert logprobs.tolist() == [-0.2, -2.0]  # best first, cut to K
    assert backend.probe_form == RUNNING_FORM
    # H_init is the entropy of those two renormalised, written out by hand.
    p = [math.exp(-0.2) / (math.exp(-0.2) + math.exp(-2.0)), math.exp(-2.0) / (math.exp(-0.2) + math.exp(-2.0))]
    assert topk_entropy_from_logprobs(logprobs) == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-12)


def list_event(token: str, top: list[tuple[str, float]], finish: str | None = None) -> dict:
    """An event in llama-server's logprobs format: `content`, a list of {token, logprob, top_logprobs: [...]}."""
    chosen = next((lp for text, lp in top if text == token), -9.0)
    return event(token, finish, {"content": [{"id": 1, "token": token, "bytes": [], "logprob": chosen,
                                              "top_logprobs": [{"id": i, "token": text, "bytes": [], "logprob": lp}
                                                               for i, (text, lp) in enumerate(top)]}]})


def test_llama_server_tokenize_and_list_logprobs_hold_the_delimiter_back(fake_server):
    # llama-server: no /extras/tokenize; /tokenize takes `content`, /detokenize answers `content`.
    pieces = {198: "\n", 32: "A"}
    fake_server.on("/extras/tokenize", (404, {"error": {"message": "File Not Found"}}))
    fake_server.on("/tokenize", lambda body: (200, {"tokens": [198, 198, 32]}) if "content" in body
                   else (500, {"error": {"message": "missing content"}}))
    fake_server.on("/detokenize", lambda body: (200, {"content": "".join(pieces[i] for i in body["tokens"])}))
    # Two candidates with the same text (e.g. two byte-level spellings) stay two entries.
    top = [("The", -0.5), ("The", -1.5), ("So", -2.0)]
    fake_server.on("/v1/completions", (200, [list_event("\n", [("\n", 0.0)]), list_event("\n", top),
                                             event("", "length")]))
    backend = connect(spec_for(fake_server.url))
    backend.top_k = 3
    backend.text = "Q: x\nA:\nstep one\n\n"
    logprobs = backend.next_logits()
    body = fake_server.posted("/v1/completions")[-1]
    assert body["prompt"] == "Q: x\nA:\nstep one\n" and body["logit_bias"] == {"198": 100.0}
    assert fake_server.posted("/tokenize")[-1] == {"content": "\n\nA", "add_special": False, "parse_special": False}
    assert logprobs.tolist() == [-0.5, -1.5, -2.0]
    assert backend.probe_form == RUNNING_FORM


def test_a_scored_write_reads_llama_server_list_logprobs(fake_server):
    top = [("The", -0.1), ("So", -2.5)]
    fake_server.on("/v1/completions", (200, [list_event("The", top), event("", "length")]),
                   (200, [list_event(" cat", [(" cat", -0.3), (" dog", -1.4)]),
                          list_event("\n", [("\n", -0.05), (".", -3.0)]), list_event("\n", [("\n", -0.01)]),
                          event("", "stop")]))
    backend = connect(spec_for(fake_server.url))
    backend.top_k = 2
    backend.text = "Q: x\nA:\n"
    first = backend.next_logits()
    written = backend.write(0, StepStop("\n\n", max_new_tokens=50), Sampling(), np.random.default_rng(0),
                            first_logits=first)
    assert written.text == "The cat" and written.reason == "delimiter"
    assert written.logprobs == pytest.approx((-0.1, -0.3, -0.05, -0.01))
    two = lambda a, b: topk_entropy_from_logprobs(np.array([a, b]))  # noqa: E731
    assert written.entropies[:3] == pytest.approx((two(-0.1, -2.5), two(-0.3, -1.4), two(-0.05, -3.0)))


def test_a_server_that_ignores_logit_bias_falls_back_to_the_text_end_form(fake_server):
    held_back_server(fake_server, honour_bias=False)
    backend = connect(spec_for(fake_server.url))
    backend.text = "Q: x\nA:\nstep one\n\n"
    fake_server.on("/v1/completions", (200, [top_event(".", {".": -0.1}), event("", "length")]),
                   (200, [top_event("The", TOP), event("", "length")]))
    backend.next_logits()
    assert fake_server.posted("/v1/completions")[-1]["prompt"] == backend.text
    assert backend.probe_form == TEXT_END_FORM


def test_without_a_tokenizer_endpoint_the_probe_uses_the_text_end_form(fake_server):
    fake_server.on("/v1/completions", (200, [top_event("The", TOP), event("", "length")]))
    backend = connect(spec_for(fake_server.url))
    backend.text = "Q: x\nA:\nstep one\n\n"
    assert backend.next_logits().tolist() == [-0.2, -2.0, -3.0]
    body = fake_server.posted("/v1/completions")[-1]
    assert body["prompt"] == backend.text and "logit_bias" not in body and body["max_tokens"] == 1
    assert backend.probe_form == TEXT_END_FORM


def test_no_logprobs_names_the_server_flag(fake_server):
    fake_server.on("/v1/completions", (200, [event("The"), event("", "length")]))
    backend = connect(spec_for(fake_server.url))
    with pytest.raises(BackendError) as info:
        backend.next_logits()
    one_line(info.value, "--logits_all true")


def test_write_continues_from_the_chosen_candidate_and_stops_at_the_delimiter(fake_server):
    fake_server.on("/v1/completions", (200, [top_event("The", TOP), event("", "length")]),
                   (200, [event(" cat"), event(" sat."), event("\n"), event("\nNext"), event(" more")]))
    backend = connect(spec_for(fake_server.url))
    backend.text = "Q: x\nA:\n"
    backend.next_logits()
    seen = []
    written = backend.write(1, StepStop("\n\n", max_new_tokens=50), Sampling(0.7, 0.9),
                            np.random.default_rng(0), seen.append)
    body = fake_server.posted("/v1/completions")[-1]
    assert body["prompt"] == "Q: x\nA:\nSo" and body["max_tokens"] == 49
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and "stop" not in body
    assert (body["top_k"], body["min_p"], body["repeat_penalty"]) == (0, 0.0, 1.0)
    assert written.text == "So cat sat." and written.reason == "delimiter"
    assert len(written.tokens) == 5  # the chosen candidate and four streamed tokens up to the delimiter
    assert "".join(seen) == "So cat sat."
    assert backend.text == "Q: x\nA:\n"  # write never changes the context: the router settles it


def test_a_stream_cut_without_a_finish_reason_is_an_error_not_a_short_step(fake_server):
    # llama.cpp's server does this to a running stream when another request arrives.
    fake_server.on("/v1/completions", (200, [event("a"), event("b")]))
    backend = connect(spec_for(fake_server.url))
    with pytest.raises(BackendError) as info:
        backend.write(None, StepStop("\n\n"), Sampling(), np.random.default_rng(0))
    one_line(info.value, "without a finish reason", "--interrupt_requests false")
    with pytest.raises(BackendError):
        backend.next_logits()


def test_an_event_whose_data_spans_several_lines_is_one_event(fake_server):
    # SSE joins the `data:` lines of one event with newlines; a server may split its JSON that way.
    multi_line = "".join(f"data: {line}\n" for line in json.dumps(event(" cat"), indent=1).splitlines()) + "\n"
    assert multi_line.count("data:") > 3
    fake_server.on("/v1/completions", (200, [event("The"), multi_line, ": keep-alive\n\n", event(" sat."),
                                             event("", "stop")]))
    backend = connect(spec_for(fake_server.url))
    written = backend.write(None, StepStop("\n\n"), Sampling(), np.random.default_rng(0))
    assert written.text == "The cat sat." and written.reason == "eos" and len(written.tokens) == 3


def test_a_stream_whose_connection_closes_before_done_is_one_error(fake_server):
    fake_server.on("/v1/completions", (200, [event("a"), event("b"), CUT]))
    backend = connect(spec_for(fake_server.url))
    with pytest.raises(BackendError) as info:
        backend.write(None, StepStop("\n\n"), Sampling(), np.random.default_rng(0))
    one_line(info.value, "ended without [DONE]", f"{fake_server.url}/completions")


def test_a_json_error_in_answer_to_a_stream_is_one_line(fake_server):
    fake_server.on("/v1/completions", (200, {"error": {"message": "model is loading"}}))
    backend = connect(spec_for(fake_server.url))
    with pytest.raises(BackendError) as info:
        backend.write(None, StepStop("\n\n"), Sampling(), np.random.default_rng(0))
    one_line(info.value, "server error: model is loading", "model 'remote'")


def test_a_prompt_the_server_refuses_as_too_long_is_the_questions_context_limit(fake_server):
    fake_server.on("/v1/completions", (400, {"error": {"message": "maximum context length is 160 tokens"}}))
    backend = connect(spec_for(fake_server.url))
    backend.prompt = backend.text = "Q: a very long question\nA:\n"
    with pytest.raises(ContextLimitError) as info:
        backend.next_logits()
    one_line(info.value, "the prompt does not fit model 'remote'", fake_server.url)
    backend.text += "a step\n\n"  # later in a trace it ends the trace instead
    with pytest.raises(ContextFull):
        backend.next_logits()


def test_a_silent_empty_stream_is_diagnosed_as_a_full_context(fake_server):
    # llama.cpp's server answers a streamed prompt that does not fit with an empty 200; glimp asks once more
    # without streaming to get its error.
    fake_server.on("/v1/completions", (200, ""), (400, {"error": {
        "message": "This model's maximum context length is 2048 tokens, however you requested 3005 tokens"}}))
    backend = connect(spec_for(fake_server.url))
    with pytest.raises(ContextFull):
        backend.write(None, StepStop("\n\n"), Sampling(), np.random.default_rng(0))
    assert fake_server.posted("/v1/completions")[-1]["stream"] is False


def test_a_scored_write_records_each_tokens_top_k_entropy(fake_server):
    fake_server.on("/v1/completions", (200, [top_event("The", TOP), event("", "length")]),
                   (200, [top_event(" cat", {" cat": -0.1, " dog": -2.5}), top_event(".", {".": 0.0}),
                          top_event("\n\n", {"\n\n": -0.01})]))
    backend = connect(spec_for(fake_server.url))
    first = backend.next_logits()
    written = backend.write(0, StepStop("\n\n"), Sampling(), np.random.default_rng(0), None, first)
    assert fake_server.posted("/v1/completions")[-1]["logprobs"] == backend.top_k
    assert written.text == "The cat." and len(written.entropies) == len(written.logprobs) == 4
    assert written.logprobs[:2] == pytest.approx([-0.2, -0.1])
    assert written.entropies[1] == pytest.approx(topk_entropy_from_logprobs(np.array([-0.1, -2.5])))
    assert written.entropies[2] == pytest.approx(0.0)


def test_models_yaml_checks_an_http_model(tmp_path):
    from glimp_cli.config import load_registry

    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {
        "no-url": {"backend": "openai", "prompt": {"style": "plain", "template": "{question}"}},
        "chat": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "prompt": "chat-steps"},
        "ok": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m",
               "prompt": {"style": "plain", "template": "{question}"}, "timeout": 5, "max_retries": 0},
    }}))
    registry = load_registry(path)
    one_line(registry.broken["models.no-url"], "models.no-url.base_url", str(path))
    one_line(registry.broken["models.chat"], "prompts.chat-steps.style", "style: plain")
    assert registry.model("ok").timeout == 5.0


@pytest.mark.parametrize("events, max_tokens, reason", [
    ([event("a"), event("b"), event("", "stop")], 10, "eos"),
    ([event("a"), event("b"), event("", "length")], 2, "length"),
    ([event("a"), event("", "length")], 10, "context_full"),  # the server cut max_tokens to its context
    ([event("x Question: y")], 10, "stop_string"),
    ([event("so The answer is 4")], 10, "marker"),
])
def test_write_reasons(fake_server, events, max_tokens, reason):
    fake_server.on("/v1/completions", (200, events))
    backend = connect(spec_for(fake_server.url))
    written = backend.write(None, StepStop("\n\n", ("Question:",), ("The answer is",), max_tokens), Sampling(),
                            np.random.default_rng(0))
    assert written.reason == reason


# ---------------------------------------------------------------------------------------------
# The text-level side of the router, on an in-process text fake through the real seam.
# ---------------------------------------------------------------------------------------------

class TextFake:
    """A text-level backend scripted like FakeBackend: each step's H_init and each model's text."""

    context = "text"

    def __init__(self, name: str, role: str, script: list[S]):
        self.name, self.role, self.script = name, role, script
        self.n_ctx, self.chat_template, self.bos_token, self.eos_token = 4096, None, "", ""
        self.evaluated = 0
        self.text, self.delimiter, self.top_k, self.probe_form = "", "\n\n", 20, RUNNING_FORM
        self.probes: list[str] = []
        self.writes: list[str] = []

    def _index(self) -> int:
        return self.text.split("A:\n", 1)[1].count(self.delimiter)

    def next_logits(self) -> np.ndarray:
        self.probes.append(self.text)
        h = self.script[self._index()].h_init
        # Two candidates whose renormalised entropy is h (h <= ln 2).
        p = 0.5
        lo, hi = 0.5, 1.0
        for _ in range(60):
            p = (lo + hi) / 2
            e = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if p < 1 else 0.0
            lo, hi = (p, hi) if e > h else (lo, p)
        return np.log(np.array([p, 1 - p]))

    def write(self, first_token, stop, sampling, rng, on_text=None, first_logits=None):
        self.writes.append(self.text)
        i = self._index()
        target = getattr(self.script[i], self.role) if i < len(self.script) else "<eos>"
        scanner = StepScanner(stop, on_text)
        ended = scanner.feed((target + self.delimiter).encode())
        if ended is None:
            scanner.close()
        return Written(scanner.text, (-1,) * len(target.split()), ended or "eos", 0.0)

    def close(self):
        pass


SCRIPT = [
    S(0.5, "small one", "LARGE ONE"),
    S(0.69, "small two", "LARGE TWO"),
    S(0.2, "small three", "LARGE THREE"),
    S(0.1, "The answer is 4.", "The answer is 42."),
]


def text_router(policy, estimator="topk:2", small_text=True):
    from glimp_cli.backends.fake import FakeBackend

    small = TextFake("s", "small", SCRIPT) if small_text else FakeBackend("s", "small", SCRIPT)
    large = TextFake("l", "large", SCRIPT)
    return Router(ModelSlot("small", small, FAKE_PROMPT), ModelSlot("large", large, FAKE_PROMPT), policy,
                  RouteSettings(estimator=parse_estimator(estimator))), small, large


def test_text_sides_keep_prompt_plus_steps_plus_delimiters():
    router, small, large = text_router(threshold(0.6))
    trace = router.run("q?")
    steps = list(trace)
    assert [s.model for s in steps] == ["small", "large", "small", "large"]
    assert [s.text for s in steps] == ["small one", "LARGE TWO", "small three", "The answer is 42."]
    assert [s.h_init for s in steps] == pytest.approx([0.5, 0.69, 0.2, 0.1], abs=1e-6)
    prompt = "Q: q?\nA:\n"
    # Every probe and write saw exactly the prompt and the steps so far, each + the delimiter.
    for k, text in enumerate(small.probes):
        assert text == prompt + "".join(s.text + "\n\n" for s in steps[:k])
    assert large.writes == [prompt + "small one\n\n", prompt + "small one\n\nLARGE TWO\n\nsmall three\n\n"]
    # The small model's answer draft was dropped: nothing of it is in any later context.
    assert steps[-1].discarded_tokens > 0
    data = trace.to_dict()
    assert data["estimator"] == "topk:2" and data["probe"] == RUNNING_FORM
    # What a server evaluated is not visible: no counts rather than made-up ones.
    assert trace.evaluated == {} and trace.context_tokens == {}


def test_a_text_side_counts_the_step_a_trace_ends_on_in_characters():
    # The answer ends the trace unsettled: `text` stays without it, and the side's count, in characters as
    # everywhere on the text side, adds the step's characters (never its tokens) for what the server holds.
    router, small, large = text_router(threshold(0.6))
    steps = list(router.run("q?"))
    answer = steps[-1]
    assert answer.stop_reason == "answer" and answer.tokens != len(answer.text)
    assert large.text == "Q: q?\nA:\nsmall one\n\nLARGE TWO\n\nsmall three\n\n"
    assert router._sides["large"].context_len == len(large.text) + len(answer.text)


def test_an_http_small_model_refuses_the_exact_estimator():
    with pytest.raises(ConfigError) as info:
        text_router(threshold(0.6), estimator="exact")
    one_line(info.value, "'s'", "topk:K")
    with pytest.raises(ConfigError):
        text_router(always_small(), estimator="exact")  # small mode records H_init too
    text_router(always_large(), estimator="exact")  # nothing probed: fine


def test_mixed_pair_token_small_and_text_large():
    router, small, large = text_router(threshold(0.6), estimator="exact", small_text=False)
    steps = list(router.run("q?"))
    assert [s.model for s in steps] == ["small", "large", "small", "large"]
    assert large.writes[-1] == "Q: q?\nA:\nsmall one\n\nLARGE TWO\n\nsmall three\n\n"


# ---------------------------------------------------------------------------------------------
# Concurrency in run_batch.
# ---------------------------------------------------------------------------------------------

def questions(n: int) -> list[Question]:
    return [Question(id=str(i), question=f"question {i}?", reference=None, line=i + 1) for i in range(n)]


def settings(mode: str) -> dict:
    return {"pair": "fake", "mode": mode, "large_share": None}


def test_concurrent_batch_writes_every_question_once_with_its_steps_in_order(tmp_path):
    script = [S(0.1, f"small {i}", f"large {i}") for i in range(4)] + [S(0.1, "The answer is 1.", "The answer is 1.")]
    out, done = ResultsFile.open(tmp_path / "r.jsonl", False, settings("glimp"))
    routers = []

    def router_for(mode, s, i=0):
        router = fake_router(script, threshold(1.0), max_step_tokens=64)
        routers.append(router)
        return router

    with out:
        outcome = run_batch(router_for, questions(7), ["glimp"], out, done, settings,
                            concurrency=3, worker_router=router_for)
    assert outcome.written == 7 and not outcome.failed and len(routers) == 3
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == [str(i) for i in range(7)]
    for r in records:
        assert [s["index"] for s in r["steps"]] == list(range(len(r["steps"])))
        assert [s["text"] for s in r["steps"]][:4] == [f"small {i}" for i in range(4)]


def test_a_failing_worker_keeps_finished_results_and_raises_once(tmp_path):
    script = [S(0.1, "a", "b"), S(0.1, "The answer is 1.", "The answer is 1.")]
    out, done = ResultsFile.open(tmp_path / "r.jsonl", False, settings("glimp"))
    calls = {"n": 0}
    lock = threading.Lock()

    class Flaky:
        def __init__(self, router):
            self.router = router
            self.policy = router.policy

        def run(self, question):
            with lock:
                calls["n"] += 1
                n = calls["n"]
            if n == 3:
                raise BackendError("model 'remote' at http://127.0.0.1:9/v1/completions: connection refused")
            return self.router.run(question)

    with out, pytest.raises(BackendError):
        run_batch(lambda m, s: Flaky(fake_router(script, threshold(1.0))), questions(6), ["glimp"], out, done,
                  settings, concurrency=2, worker_router=lambda m, s, i: Flaky(fake_router(script, threshold(1.0))))
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert 1 <= len(lines) <= 3 and len({json.loads(line)["id"] for line in lines}) == len(lines)


def test_concurrency_above_one_with_a_local_model_is_a_usage_error(tmp_path):
    questions_file = tmp_path / "q.jsonl"
    questions_file.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    result = runner.invoke(app, ["batch", str(questions_file), "-o", str(tmp_path / "r.jsonl"),
                                 "--concurrency", "2", "--mode", "large"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "runs in process" in lines[0] and "--concurrency 1" in lines[0], result.output


# ---------------------------------------------------------------------------------------------
# The real llama.cpp server (`python -m llama_cpp.server`) on the packaged pair.
# ---------------------------------------------------------------------------------------------

READY_SECONDS = 90  # a server answering GET /v1/models
RUN_SECONDS = 240  # one CLI run in a subprocess


def batch_killed_after_first_result(args: list[str], out: Path, kill) -> tuple[int, str, str]:
    """Run `glimp batch args` in a subprocess, call `kill()` once `out` holds a result line, and wait for it to end."""
    proc = subprocess.Popen([sys.executable, "-m", "glimp_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + RUN_SECONDS
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no result line in time"
            time.sleep(0.05)
        kill()
        stdout, stderr = proc.communicate(timeout=RUN_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, stderr
K = 20
QUESTIONS = [
    {"id": f"q{i}", "question": q, "answer": a}
    for i, (q, a) in enumerate(zip(GSM8K_QUESTIONS, ["18", "3", "540", "14", "7"]))
]


class LlamaServer:
    """A real `python -m llama_cpp.server` on 127.0.0.1, one thread (the machine is shared), started and
    killed by the test session."""

    def __init__(self, gguf: Path, alias: str, log: Path, logits_all: bool):
        self.gguf, self.alias, self.log, self.logits_all = gguf, alias, log, logits_all
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LlamaServer":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", self.alias,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
               "--logits_all", "true" if self.logits_all else "false",
               "--n_threads", "1", "--n_threads_batch", "1", "--interrupt_requests", "false", "--verbose", "false"]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_SECONDS
        endpoint = Endpoint(self.alias, self.url, timeout=1.0, max_retries=0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server for {self.alias} exited: {self.log.read_text()[-2000:]}")
            try:
                endpoint.get_json("/models")
                return self
            except BackendError:
                time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"llama_cpp.server for {self.alias} not ready in {READY_SECONDS} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="session")
def ggufs():
    from glimp_cli.config import load_registry
    from glimp_cli.sources import resolve

    registry = load_registry()
    return {name: resolve(registry.model(name)) for name in ("smollm2-135m", "gemma3-270m")}


@pytest.fixture(scope="session")
def servers(ggufs, tmp_path_factory):
    """SmolLM2 (small: probed, so --logits_all true) and Gemma (large: never probed, so --logits_all false,
    which spares 2 GB of logits for its 262k vocabulary) behind two real servers."""
    logs = tmp_path_factory.mktemp("servers")
    started = []
    try:
        small = LlamaServer(ggufs["smollm2-135m"], "smollm2", logs / "small.log", True).start()
        started.append(small)
        large = LlamaServer(ggufs["gemma3-270m"], "gemma", logs / "large.log", False).start()
        started.append(large)
        yield {"small": small, "large": large}
    finally:
        for server in started:
            server.kill()


@pytest.fixture(scope="session")
def smollm2_chat_steps() -> str:
    """The packaged chat-steps prompt rendered through SmolLM2's chat template, {question} left in:
    the plain prompt a server needs (glimp cannot read a served model's template)."""
    from glimp_cli.backends import load_backend
    from glimp_cli.config import load_registry
    from glimp_cli.prompts import render_prompt

    spec = replace(load_registry().model("smollm2-135m"), threads=1)
    backend = load_backend(spec)
    try:
        return render_prompt(spec.prompt, "{question}", backend.chat_template, backend.bos_token,
                             backend.eos_token)
    finally:
        backend.close()


def write_config(path: Path, small_url: str, large_url: str, template: str) -> Path:
    """models.yaml: both models remote (pair `remote`), and small in process + large remote (`mixed`)."""
    from glimp_cli.config import packaged_config

    packaged = yaml.safe_load(packaged_config().read_text(encoding="utf-8"))
    local_small = {**packaged["models"]["smollm2-135m"], "threads": 1}
    budget = {"max_tokens": 160, "max_step_tokens": 64}
    config = {
        "models": {
            "smollm2-135m": local_small,
            "gemma3-270m": {**packaged["models"]["gemma3-270m"], "threads": 1},
            "smollm2-remote": {"backend": "openai", "base_url": small_url, "model": "smollm2",
                               "prompt": {"style": "plain", "template": template,
                                          "answer_marker": "The answer is"},
                               "n_ctx": 2048, "timeout": 30, "max_retries": 1},
            "gemma-remote": {"backend": "openai", "base_url": large_url, "model": "gemma", "prompt": "fewshot-qa",
                             "stop": ["Question:"], "n_ctx": 2048, "timeout": 30, "max_retries": 1},
        },
        "pairs": {
            "remote": {"small": "smollm2-remote", "large": "gemma-remote", "tau": 1.0, "estimator": f"topk:{K}",
                       **budget},
            "mixed": {"small": "smollm2-135m", "large": "gemma-remote", "tau": 1.0, "estimator": f"topk:{K}",
                      **budget},
            "local": {"small": "smollm2-135m", "large": "gemma3-270m", "tau": 1.0, "estimator": f"topk:{K}",
                      **budget},
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def real_config(servers, smollm2_chat_steps, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "models.yaml"
    return write_config(path, servers["small"].url, servers["large"].url, smollm2_chat_steps)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No GLIMP_* setting or user models.yaml of the machine leaks in (subprocesses inherit this)."""
    for key in list(os.environ):
        if key.startswith("GLIMP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("COLUMNS", "400")  # rich tables unwrapped, so cells can be matched


def ask_json(config: Path, *args: str, question: str = GSM8K_QUESTIONS[1]) -> dict:
    result = runner.invoke(app, ["ask", question, "--config", str(config), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_questions(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS[:n]))
    return path


def results(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "the results file must end with a complete line"
    return [json.loads(line) for line in data.decode().splitlines()]


@pytest.mark.real
def test_ask_through_two_servers(real_config, clean_env):
    trace = ask_json(real_config, "--pair", "remote", "--tau", "2.0")
    assert trace["steps"] and trace["stop_reason"] in ("answer", "eos", "stop_string", "max_tokens", "repetition")
    assert trace["estimator"] == f"topk:{K}" and trace["probe"] == RUNNING_FORM
    assert all(s["h_init"] is not None and 0 <= s["h_init"] <= math.log(K) + 1e-9
               for s in trace["steps"] if s["model"] == "small")
    assert trace["summary"]["evaluated_tokens"] == {}  # a server's evaluation is not visible, not made up


@pytest.mark.real
def test_remote_traces_equal_in_process_traces_under_greedy(real_config, clean_env):
    # One model alone, greedy: the text-level path through the servers writes the same steps as the
    # token-level path in process (same prompts, same first-token choice, server sampling neutralised).
    for mode in ("small", "large"):
        remote = ask_json(real_config, "--pair", "remote", "--mode", mode)
        local = ask_json(real_config, "--pair", "local", "--mode", mode)
        assert [s["text"] for s in remote["steps"]] == [s["text"] for s in local["steps"]], mode
        assert [s["tokens"] for s in remote["steps"]] == [s["tokens"] for s in local["steps"]], mode


@pytest.mark.real
def test_mixed_pair_small_in_process_large_remote(real_config, clean_env):
    trace = ask_json(real_config, "--pair", "mixed", "--tau", "2.0", "--estimator", "exact")
    assert trace["steps"] and trace["estimator"] == "exact" and trace["probe"] == "in-process logits"
    assert set(trace["summary"]["evaluated_tokens"]) <= {"small"}
    assert any(s["model"] == "large" for s in trace["steps"])  # the answer is always the large model's


def smollm2_boundaries(url: str, template: str):
    """(in-process next logits, the remote backend with `text` set to the same context) at each step
    boundary of SmolLM2's own greedy traces of GSM8K_QUESTIONS: the contexts both probes are compared on."""
    from glimp_cli.backends import load_backend
    from glimp_cli.config import load_registry

    spec = replace(load_registry().model("smollm2-135m"), threads=1)
    local = load_backend(spec)
    remote = connect(ModelSpec(name="smollm2-remote", backend="openai", base_url=url, model="smollm2",
                               prompt=replace(PLAIN, template=template)))
    remote.top_k = K
    slot = ModelSlot("small", local, spec.prompt)
    settings = RouteSettings(estimator=parse_estimator(f"topk:{K}"), max_tokens=200, max_step_tokens=64)
    try:
        for question in GSM8K_QUESTIONS:
            steps = [s.text for s in Router(slot, ModelSlot("large", None, PLAIN), always_small(), settings).run(question)]
            for k in range(1, len(steps)):
                side = Router(slot, ModelSlot("large", None, PLAIN), always_small(), settings)._sides["small"]
                side.start(question)
                side.sync(steps[:k])
                logits = np.array(local.next_logits(), dtype=np.float64)
                remote.text = template.replace("{question}", question) + "".join(t + "\n\n" for t in steps[:k])
                yield logits, remote
    finally:
        local.close()
        remote.close()


@pytest.mark.real
def test_remote_top_k_h_init_against_in_process_exact_and_top_k(servers, smollm2_chat_steps, capsys):
    """The same contexts probed in process (exact and top-20 from full logits, canonical tokens) and by
    the server (top-20 log-probabilities), with the delimiter held back (running form) and not (text-end)."""
    from glimp_cli.entropy import exact_entropy

    rows = []
    for logits, remote in smollm2_boundaries(servers["small"].url, smollm2_chat_steps):
        running = topk_entropy_from_logprobs(remote.next_logits())
        text_end = topk_entropy_from_logprobs(np.array([lp for _, lp in remote._probe(remote.text, ())]))
        rows.append((exact_entropy(logits), topk_entropy(logits, K), running, text_end))
    assert remote.probe_form == RUNNING_FORM
    a = np.array(rows)
    running_gap, text_end_gap = np.abs(a[:, 2] - a[:, 1]), np.abs(a[:, 3] - a[:, 1])
    with capsys.disabled():
        print(f"\n{len(a)} boundaries: |server running-form top-{K} - in-process top-{K}| median "
              f"{np.median(running_gap):.3f} max {running_gap.max():.3f}; text-end form mean {text_end_gap.mean():.3f}; "
              f"in-process exact - top-{K} mean {np.mean(a[:, 0] - a[:, 1]):.3f}")
    assert len(a) >= 4
    # Held back, the server sees the in-process context token for token: only batch-shape noise remains.
    assert np.median(running_gap) <= 0.05 and running_gap.max() <= 0.3, rows
    # The text-end form is a different context: what a naive HTTP probe would measure.
    assert text_end_gap.mean() > 3 * running_gap.mean(), rows


@pytest.mark.real
def test_batch_through_servers_with_concurrency(real_config, clean_env, tmp_path):
    questions = write_questions(tmp_path / "q.jsonl", 3)
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["batch", str(questions), "-o", str(out), "--config", str(real_config),
                                 "--pair", "remote", "--mode", "glimp,large", "--concurrency", "2", "--tau", "2.0"])
    assert result.exit_code == 0, result.output
    records = results(out)
    assert sorted((r["id"], r["mode"]) for r in records) == sorted((q["id"], m) for q in QUESTIONS[:3]
                                                                   for m in ("glimp", "large"))
    for r in records:
        assert [s["index"] for s in r["steps"]] == list(range(len(r["steps"])))
        assert r["settings"]["estimator"] == f"topk:{K}"
    assert "accuracy (95% CI)" in result.stdout


@pytest.mark.real
def test_models_shows_each_remote_models_reachability(real_config, clean_env, tmp_path):
    config = yaml.safe_load(real_config.read_text())
    config["models"]["dead-remote"] = {**config["models"]["gemma-remote"],
                                       "base_url": f"http://127.0.0.1:{free_port()}/v1"}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    t0 = time.perf_counter()
    result = runner.invoke(app, ["models", "--config", str(path)])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 4}
    assert "yes:" in rows["smollm2-remote"] and "serves smollm2" in rows["smollm2-remote"]
    assert "yes:" in rows["gemma-remote"]
    assert "no:" in rows["dead-remote"] and "connection refused" in rows["dead-remote"]
    assert time.perf_counter() - t0 < 10


@pytest.mark.real
def test_killing_the_large_server_mid_batch_then_resume(servers, ggufs, smollm2_chat_steps, clean_env, tmp_path):
    large = LlamaServer(ggufs["gemma3-270m"], "gemma", tmp_path / "large.log", False).start()
    try:
        config = write_config(tmp_path / "models.yaml", servers["small"].url, large.url, smollm2_chat_steps)
        questions = write_questions(tmp_path / "q.jsonl", 5)
        out = tmp_path / "r.jsonl"
        args = ["batch", str(questions), "-o", str(out), "--config", str(config), "--pair", "remote",
                "--mode", "glimp", "--tau", "2.0"]
        returncode, stdout, stderr = batch_killed_after_first_result(args, out, large.kill)
        assert returncode == 1, (stdout, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("glimp: error:")]
        assert len(errors) == 1, stderr
        assert "'gemma-remote'" in errors[0] and large.url in errors[0], errors
        finished = results(out)  # every line whole
        assert 1 <= len(finished) < 5 and len({r["id"] for r in finished}) == len(finished)

        large.start()  # the same port
        result = runner.invoke(app, [*args, "--resume"])
        assert result.exit_code == 0, result.output
        records = results(out)
        assert sorted((r["id"], r["mode"]) for r in records) == sorted((q["id"], "glimp") for q in QUESTIONS[:5])
        assert records[: len(finished)] == finished  # the finished lines were kept as they were
    finally:
        large.kill()
