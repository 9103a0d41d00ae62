"""`/metrics` of `glimp serve` in the Prometheus text format, and one access-log line per request.

Every app counts in a registry of its own, not prometheus_client's global one, so that several servers
(or the tests' apps) in one process do not add up or refuse each other's metric names.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Iterable
from urllib.parse import quote

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match

from glimp_cli.serve.workers import OUTCOMES, Job, WorkerPool

# A request runs a whole trace: seconds to minutes, not the milliseconds of the library's default buckets.
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# One probe is a forward pass of the small model over a step's first token(s).
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Share of a trace's steps the large model wrote; le="0" counts the traces it never wrote in.
SHARE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# An error body is a small JSON object; a longer body is not read for its kind.
ERROR_BODY_LIMIT = 64 * 1024
UNROUTED = "unrouted"  # the route label of a path the server does not offer (one value, whatever the path)


class ServeMetrics:
    """The metrics of one server: requests, trace tokens and routing, errors, and its pools' load."""

    def __init__(self, pools: dict[str, WorkerPool]):
        self.registry = CollectorRegistry()
        metric = dict(registry=self.registry)
        self.requests = Counter("glimp_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], **metric)
        self.request_seconds = Histogram("glimp_request_duration_seconds",
                                         "Seconds from a request's arrival to the end of its answer (streams included)",
                                         ["route"], buckets=REQUEST_BUCKETS, **metric)
        self.completion_tokens = Counter("glimp_completion_tokens", "Tokens of the answered traces, by the model "
                                         "that wrote them (small or large)", ["pair", "model"], **metric)
        self.prompt_tokens = Counter("glimp_prompt_tokens", "Prompt tokens billed in usage (the prompts of the "
                                     "models that ran)", ["pair"], **metric)
        self.large_share = Histogram("glimp_large_share", "Share of an answered trace's steps the large model wrote",
                                     ["pair"], buckets=SHARE_BUCKETS, **metric)
        self.probe_seconds = Histogram("glimp_probe_seconds", "Seconds of each step's probe (its H_init)",
                                       ["pair"], buckets=PROBE_BUCKETS, **metric)
        self.errors = Counter("glimp_errors", "Error answers (error bodies and streams ended by an error chunk), "
                              "by OpenAI error type and code", ["type", "code"], **metric)
        self.registry.register(PoolCollector(pools))

    def response(self, request: Request) -> Response:
        """The registry in the format the scraper accepts (Prometheus text, or OpenMetrics if asked)."""
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(self.registry), headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    def observe_trace(self, result: dict) -> None:
        """Count an answered trace: tokens by model, prompt tokens, its large share, each probe's time."""
        record = result["glimp"]
        pair = record["pair"]
        for model, tokens in record["summary"]["tokens"].items():
            self.completion_tokens.labels(pair, model).inc(tokens)
        self.prompt_tokens.labels(pair).inc(result["usage"]["prompt_tokens"])
        if record["steps"]:
            self.large_share.labels(pair).observe(record["large_share"])
        for step in record["steps"]:
            if step["h_init"] is not None:  # a forced answer or a mode without routing has no probe
                self.probe_seconds.labels(pair).observe(step["probe_seconds"])


class PoolCollector(Collector):
    """The workers' load, read from the pools at each scrape: busy workers, queue depth, how jobs ended."""

    def __init__(self, pools: dict[str, WorkerPool]):
        self.pools = pools

    def collect(self) -> Iterable[Metric]:
        workers = GaugeMetricFamily("glimp_workers", "Workers of a pair", labels=["pair"])
        busy = GaugeMetricFamily("glimp_workers_busy", "Workers running a request", labels=["pair"])
        waiting = GaugeMetricFamily("glimp_queue_waiting", "Requests admitted and waiting for a worker (queue depth)",
                                    labels=["pair"])
        size = GaugeMetricFamily("glimp_queue_size", "Places in the queue (--queue)", labels=["pair"])
        jobs = CounterMetricFamily("glimp_jobs", "Admitted requests by how they ended", labels=["pair", "outcome"])
        for name, pool in self.pools.items():
            load = pool.load()
            workers.add_metric([name], load["workers"])
            busy.add_metric([name], load["busy"])
            waiting.add_metric([name], load["waiting"])
            size.add_metric([name], load["queue"])
            for outcome in OUTCOMES:
                jobs.add_metric([name, outcome], load[outcome])
        yield from (workers, busy, waiting, size, jobs)


class RequestRecorder:
    """ASGI middleware: counts and times every HTTP request, observes its trace, and logs one line for it.

    A completion route leaves its Job in `request.state.job`; the job's final event gives the model, the
    usage and, for a stream that ended in an error chunk, the error. `log` None: no access log (--quiet).
    """

    def __init__(self, app, metrics: ServeMetrics, routes: list[BaseRoute], log: Callable[[str], None] | None):
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.log = log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        answer = {"status": None, "body": bytearray()}

        async def watch(message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body" and answer["status"] >= 400 \
                    and len(answer["body"]) <= ERROR_BODY_LIMIT:
                answer["body"] += message.get("body", b"")
            await send(message)

        crashed = False
        try:
            await self.app(scope, receive, watch)
        except Exception:
            crashed = True  # Starlette's outermost layer answers 500 and uvicorn logs the traceback
            raise
        finally:
            self._record(scope, state.get("job"), answer, crashed, time.perf_counter() - start)

    def _record(self, scope, job: Job | None, answer: dict, crashed: bool, seconds: float) -> None:
        status = answer["status"] or 500
        route = route_label(self.routes, scope)
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.request_seconds.labels(route).observe(seconds)
        final = job.final if job is not None else None
        error = None
        if crashed:
            error = ("server_error", "")
        elif status >= 400 and answer["body"]:  # a client that left gets no body (499): not an error answer
            error = error_kind(bytes(answer["body"]))
        elif status == 200 and final is not None and final[0] == "error":  # a started stream: its error chunk
            error = (final[1].kind, final[1].code or "")
        if error is not None:
            self.metrics.errors.labels(*error).inc()
        usage = None
        if final is not None and final[0] == "done" and status == 200:
            self.metrics.observe_trace(final[1])
            usage = final[1]["usage"]
        if self.log is not None:
            self.log(access_line(scope, status, seconds, job, usage, error))


def route_label(routes: list[BaseRoute], scope) -> str:
    """The route's path template (`/v1/models/{model:path}`), so that labels stay few whatever clients send."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", UNROUTED)
    return UNROUTED


def error_kind(body: bytes) -> tuple[str, str]:
    """(type, code) of an OpenAI error body; a body that is not one is of type `unknown`."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("type") or "unknown"), str(error.get("code") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "unknown", ""


def access_line(scope, status: int, seconds: float, job: Job | None, usage: dict | None,
                error: tuple[str, str] | None) -> str:
    """One request as the access log shows it: method, path, status, seconds, model, prompt+completion tokens."""
    path = quote(scope["path"], safe="/:@!$&'()*+,;=~")  # a decoded %0A must not start a new log line
    model = job.request.model if job is not None else "-"
    tokens = f"{usage['prompt_tokens']}+{usage['completion_tokens']}" if usage else "-"
    line = f"glimp serve: {scope['method']} {path} {status} {seconds:.3f}s model={model} tokens={tokens}"
    if error is not None:
        line += f" error={error[1] or error[0]}"
    return line
