"""`glimp serve`'s /metrics, access log and billed usage, exact on the scripted fake pair, in process."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import FAKE_PROMPT, GatedFake
from glimp_cli.backends.fake import FakeBackend
from glimp_cli.backends.fake import ScriptedStep as S
from glimp_cli.config import ModelSpec, PairSpec, Registry
from glimp_cli.errors import GlimpError

SCRIPT = [
    S(0.5, "small one", "LARGE ONE"),
    S(2.0, "small two", "LARGE TWO"),
    S(0.3, "small three ", "LARGE THREE"),
    S(0.1, "The answer is 4.", "The answer is 42."),
]
# Without an answer marker nothing hands the answer to the large model: a trace cut by max_tokens is small's alone.
NO_MARKER = dataclasses.replace(FAKE_PROMPT, answer_marker=None)
# The large model's prompt is longer than the small one's, so the two prompt counts cannot be confused.
LONG_PROMPT = dataclasses.replace(NO_MARKER, template="Think it through, one step at a time.\nQ: {question}\nA:\n")
CHAT = {"model": "glimp/fake", "messages": [{"role": "user", "content": "q?"}]}
KEY = "metrics-test-key"


class FailingFake(FakeBackend):
    """A large model whose every write fails, as an upstream that goes away mid-trace."""

    def write(self, *args, **kwargs):
        raise GlimpError("the large model's server went away")


def fake_state(script, *, prompts=(FAKE_PROMPT, FAKE_PROMPT), queue=4, api_key=None, access_log=None,
               small=FakeBackend, large=FakeBackend, **settings):
    """The ServerState of one worker over the scripted fake pair (prompts: the small and the large model's)."""
    from glimp_cli.engine import Engine
    from glimp_cli.serve.app import ServerState
    from glimp_cli.serve.protocol import ServedPair
    from glimp_cli.serve.workers import WorkerPool

    formats = dict(zip(("s", "l"), prompts))
    registry = Registry({name: ModelSpec(name, prompt=fmt) for name, fmt in formats.items()}, {}, "fake", [], {}, {})
    pair = PairSpec("fake", "s", "l", **settings)
    backends = {"small": small("s", "small", script), "large": large("l", "large", script)}
    pool = WorkerPool("fake", [Engine(registry, pair, backends)], queue)
    return ServerState({"fake": ServedPair(pair, formats)}, {"fake": pool}, api_key, 1_000_000,
                       access_log=access_log)


@contextlib.contextmanager
def fake_server(script, **options):
    """Starlette's TestClient on the real app over `fake_state(script, **options)`."""
    from starlette.testclient import TestClient

    from glimp_cli.serve.app import build_app

    state = fake_state(script, **options)
    try:
        with TestClient(build_app(state)) as client:
            yield client
    finally:
        for pool in state.pools.values():
            assert pool.stop(time.monotonic() + 30) == [], "a worker did not stop"


def scrape(client, **headers) -> dict[tuple, float]:
    """GET /metrics parsed by prometheus_client: (sample name, sorted labels) -> value."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def stream_chat(client, **fields) -> list[str]:
    """A streamed chat request: its `data:` lines."""
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True, **fields}) as response:
        assert response.status_code == 200, response.read()
        return [line for line in response.iter_lines() if line.startswith("data: ")]


# --- usage ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau, writers, billed", [
    # The small model writes every step and the budget ends the trace before the large one starts.
    (100.0, {"small"}, {"small"}),
    # The large model writes every step; the small one read the prompt too, to probe each step.
    (0.4, {"large"}, {"small", "large"}),
])
def test_usage_bills_the_prompt_of_each_model_that_ran_and_no_other(tau, writers, billed):
    with fake_server(SCRIPT, prompts=(NO_MARKER, LONG_PROMPT), tau=tau) as client:
        for stream in (False, True):
            if stream:
                lines = stream_chat(client, max_tokens=15, stream_options={"include_usage": True})
                chunks = [json.loads(line[len("data: "):]) for line in lines if line != "data: [DONE]"]
                usage = chunks[-1]["usage"]
                record = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]["glimp"]
            else:
                reply = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 15}).json()
                usage, record = reply["usage"], reply["glimp"]
            prompts = record["prompt_tokens"]
            assert prompts["large"] > prompts["small"]  # both were checked against their contexts
            assert {s["model"] for s in record["steps"]} == writers
            assert usage["prompt_tokens"] == sum(prompts[role] for role in billed)
            assert usage["completion_tokens"] == sum(s["tokens"] for s in record["steps"])
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# step_entropy holds the small model's drafts until they settle: the stop string is found after the step.
@pytest.mark.parametrize("mode", ["glimp", "step_entropy"])
def test_usage_of_a_trace_cut_by_a_stop_string_before_the_large_model_ran_bills_the_small_prompt_alone(mode):
    with fake_server(SCRIPT, prompts=(NO_MARKER, LONG_PROMPT), tau=1.0, mode=mode) as client:
        reply = client.post("/v1/chat/completions", json={**CHAT, "stop": "one"}).json()
        assert [s["model"] for s in reply["glimp"]["steps"]] == ["small"]
        assert reply["usage"]["prompt_tokens"] == reply["glimp"]["prompt_tokens"]["small"]


# --- /metrics ---------------------------------------------------------------------------------

def test_metrics_count_requests_tokens_by_model_large_share_probes_and_errors():
    with fake_server(SCRIPT, tau=1.0) as client:
        replies = [client.post("/v1/chat/completions", json=CHAT).json() for _ in range(2)]
        assert client.post("/v1/chat/completions", json={**CHAT, "temperature": 9}).status_code == 400
        assert client.post("/v1/chat/completions", json={**CHAT, "model": "glimp/nope"}).status_code == 404
        assert client.get("/v1/models/glimp/nope").status_code == 404
        assert client.get("/no/such/path").status_code == 404
        samples = scrape(client)

    requests = "glimp_requests_total"
    assert value(samples, requests, route="/v1/chat/completions", status="200") == 2
    assert value(samples, requests, route="/v1/chat/completions", status="400") == 1
    assert value(samples, requests, route="/v1/chat/completions", status="404") == 1
    assert value(samples, requests, route="/v1/models/{model:path}", status="404") == 1
    assert value(samples, requests, route="unrouted", status="404") == 1  # one label for every unknown path
    assert value(samples, "glimp_request_duration_seconds_count", route="/v1/chat/completions") == 4

    steps = [s for reply in replies for s in reply["glimp"]["steps"]]
    for model in ("small", "large"):
        assert value(samples, "glimp_completion_tokens_total", pair="fake", model=model) == \
            sum(s["tokens"] for s in steps if s["model"] == model) > 0
    assert value(samples, "glimp_prompt_tokens_total", pair="fake") == sum(r["usage"]["prompt_tokens"] for r in replies)
    assert value(samples, "glimp_large_share_count", pair="fake") == 2
    assert value(samples, "glimp_large_share_sum", pair="fake") == pytest.approx(
        sum(r["glimp"]["large_share"] for r in replies))
    probed = [s for s in steps if s["h_init"] is not None]
    assert value(samples, "glimp_probe_seconds_count", pair="fake") == len(probed) > 0
    assert value(samples, "glimp_probe_seconds_sum", pair="fake") == pytest.approx(
        sum(s["probe_seconds"] for s in probed))

    errors = "glimp_errors_total"
    assert value(samples, errors, type="invalid_request_error", code="") == 1  # the temperature
    assert value(samples, errors, type="invalid_request_error", code="model_not_found") == 2
    assert value(samples, errors, type="invalid_request_error", code="not_found") == 1

    assert value(samples, "glimp_workers", pair="fake") == 1
    assert value(samples, "glimp_queue_size", pair="fake") == 4
    assert value(samples, "glimp_jobs_total", pair="fake", outcome="done") == 2


def test_metrics_show_the_queue_depth_while_the_worker_is_busy():
    gate = threading.Event()
    gated = functools.partial(GatedFake, gate=gate)
    with fake_server(SCRIPT, queue=2, small=gated, large=gated, tau=1.0) as client:
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(client.post("/v1/chat/completions",
                                                                               json=CHAT).status_code))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 30
            while (load := client.get("/health").json()["load"]["fake"])["busy"] + load["waiting"] < 2:
                assert time.monotonic() < deadline, load
                time.sleep(0.01)
            samples = scrape(client)
            assert value(samples, "glimp_workers_busy", pair="fake") == 1
            assert value(samples, "glimp_queue_waiting", pair="fake") == 1
        finally:
            gate.set()
            for thread in threads:
                thread.join(30)
        assert statuses == [200, 200]
        samples = scrape(client)
        assert value(samples, "glimp_workers_busy", pair="fake") == 0
        assert value(samples, "glimp_queue_waiting", pair="fake") == 0
        assert value(samples, "glimp_jobs_total", pair="fake", outcome="done") == 2


def test_a_stream_that_ends_in_an_error_chunk_counts_as_an_error_and_logs_it():
    lines: list[str] = []
    with fake_server(SCRIPT, large=FailingFake, access_log=lines.append, tau=1.0) as client:
        data = stream_chat(client)
        assert '"error"' in data[-2] and data[-1] == "data: [DONE]"  # status 200, then the error chunk
        samples = scrape(client)
    assert value(samples, "glimp_errors_total", type="server_error", code="") == 1
    assert value(samples, "glimp_requests_total", route="/v1/chat/completions", status="200") == 1
    assert value(samples, "glimp_completion_tokens_total", pair="fake", model="small") == 0  # no answered trace
    assert re.fullmatch(r"glimp serve: POST /v1/chat/completions 200 \d+\.\d{3}s model=glimp/fake tokens=- "
                        r"error=server_error", lines[0])


def test_each_server_counts_in_a_registry_of_its_own():
    from prometheus_client import REGISTRY

    with fake_server(SCRIPT, tau=1.0) as first, fake_server(SCRIPT, tau=1.0) as second:
        assert first.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert value(scrape(first), "glimp_requests_total", route="/v1/chat/completions", status="200") == 1
        assert value(scrape(second), "glimp_requests_total", route="/v1/chat/completions", status="200") == 0
        assert value(scrape(second), "glimp_completion_tokens_total", pair="fake", model="small") == 0
    assert not [m for m in REGISTRY.collect() if m.name.startswith("glimp_")]  # the global default registry


def test_with_an_api_key_metrics_need_it_and_health_does_not():
    with fake_server(SCRIPT, api_key=KEY, tau=1.0) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/health").status_code == 200
        samples = scrape(client, Authorization=f"Bearer {KEY}")
        assert value(samples, "glimp_requests_total", route="/metrics", status="401") == 1
        assert value(samples, "glimp_errors_total", type="invalid_request_error", code="invalid_api_key") == 1


def test_metrics_speak_openmetrics_to_a_scraper_that_asks_for_it():
    with fake_server(SCRIPT, tau=1.0) as client:
        response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.endswith("# EOF\n")


# --- the access log ---------------------------------------------------------------------------

LINE = re.compile(r"glimp serve: (?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d{3}) (?P<seconds>\d+\.\d{3})s "
                  r"model=(?P<model>\S+) tokens=(?P<tokens>\S+)(?: error=(?P<error>\S+))?")


def test_one_access_log_line_per_request_with_model_and_tokens():
    lines: list[str] = []
    with fake_server(SCRIPT, access_log=lines.append, tau=1.0) as client:
        whole = client.post("/v1/chat/completions", json=CHAT).json()["usage"]
        stream_chat(client)
        client.post("/v1/completions", json={"model": "glimp/fake:large", "prompt": "q?", "max_tokens": 10})
        client.post("/v1/chat/completions", json={**CHAT, "temperature": 9})
        client.get("/health")
        client.get("/v1/x%0Ay")  # a decoded newline must not start a line of its own
    fields = [LINE.fullmatch(line) for line in lines]
    assert all(fields), lines
    seen = [(f["method"], f["path"], f["status"], f["model"], f["tokens"], f["error"]) for f in fields]
    tokens = f"{whole['prompt_tokens']}+{whole['completion_tokens']}"
    assert seen[0] == ("POST", "/v1/chat/completions", "200", "glimp/fake", tokens, None)
    assert seen[1] == ("POST", "/v1/chat/completions", "200", "glimp/fake", tokens, None)  # same trace, streamed
    assert seen[2][:4] == ("POST", "/v1/completions", "200", "glimp/fake:large") and seen[2][4] != "-"
    assert seen[3] == ("POST", "/v1/chat/completions", "400", "-", "-", "invalid_request_error")
    assert seen[4] == ("GET", "/health", "200", "-", "-", None)
    assert seen[5] == ("GET", "/v1/x%0Ay", "404", "-", "-", "not_found")


def test_quiet_passes_from_the_command_line_to_a_server_without_access_log(serve_options, served_state):
    import glimp_cli.serve

    for args, quiet in ([], False), (["--quiet"], True):
        assert serve_options(args).quiet is quiet

    # The server's side: --quiet leaves the app without an access log; the startup lines still go to `log`.
    registry = Registry({n: ModelSpec(n, prompt=FAKE_PROMPT) for n in ("s", "l")}, {}, "fake", [], {}, {})
    for quiet in (False, True):
        said: list[str] = []
        state = served_state(glimp_cli.serve.ServeOptions(registry, [PairSpec("fake", "s", "l")], port=0, quiet=quiet,
                                                          log=said.append))
        assert state.access_log == (None if quiet else said.append)
        assert said and said[0].startswith("glimp serve: http://127.0.0.1:")
