"""The HTTP side of `glimp serve`: Starlette routes, auth, body limit, SSE, errors as OpenAI JSON."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from glimp_cli.serve.metrics import RequestRecorder, ServeMetrics
from glimp_cli.serve.protocol import ApiError, CompletionRequest, ServedPair, chunk_body, completion_body, parse_request
from glimp_cli.serve.workers import DISCONNECTED, Job, WorkerPool

# json.loads joins an escaped surrogate pair into one character: a surrogate left in a string has no pair.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Seconds a stream may take after a shutdown signal to end with its error chunk before it is cut.
SHUTDOWN_GRACE_SECONDS = 10.0


@dataclass
class ServerState:
    """What the routes share: the served pairs, their workers, the key and limits, the CORS origins."""

    pairs: dict[str, ServedPair]
    pools: dict[str, WorkerPool]
    api_key: str | None
    max_body_bytes: int
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API from a browser ("*": any)
    created: int = field(default_factory=lambda: int(time.time()))
    access_log: Callable[[str], None] | None = None  # one line per request; None: none (--quiet)

    def begin_shutdown(self) -> None:
        for pool in self.pools.values():
            pool.begin_shutdown()

    def fail_unfinished(self) -> None:
        for pool in self.pools.values():
            pool.fail_unfinished()


def build_app(state: ServerState) -> Starlette:
    """The ASGI app: `/` (the live page), `/health`, and the OpenAI-compatible `/v1` routes."""
    page = resources.files("glimp_cli.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "auth": state.api_key is not None,
                             "models": [p.model_ids()[0] for p in state.pairs.values()],
                             "load": {name: pool.load() for name, pool in state.pools.items()}})

    async def list_models(request: Request) -> Response:
        authorize(request, state)
        return JSONResponse({"object": "list", "data": [_model_card(p, i, state.created)
                                                         for p in state.pairs.values() for i in p.model_ids()]})

    async def get_model(request: Request) -> Response:
        authorize(request, state)
        wanted = request.path_params["model"]
        for served in state.pairs.values():
            if wanted in served.model_ids():
                return JSONResponse(_model_card(served, wanted, state.created))
        raise ApiError(404, f"The model {wanted!r} does not exist", param="model", code="model_not_found")

    async def chat(request: Request) -> Response:
        return await complete(request, "chat", state)

    async def text(request: Request) -> Response:
        return await complete(request, "text", state)

    metrics = ServeMetrics(state.pools)

    async def metrics_page(request: Request) -> Response:
        authorize(request, state)  # like llama-server: with a key, the scraper sends it too
        return metrics.response(request)

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", text, methods=["POST"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    middleware = [Middleware(CORSMiddleware, allow_origins=list(state.cors_origins), allow_methods=["GET", "POST"],
                             allow_headers=["*"], expose_headers=["Retry-After"])] if state.cors_origins else []
    recorder = Middleware(RequestRecorder, metrics=metrics, routes=routes, log=state.access_log)  # outermost: sees all
    return Starlette(routes=routes, middleware=[recorder, *middleware], exception_handlers=handlers)


def authorize(request: Request, state: ServerState) -> None:
    """With --api-key-env, every /v1 route and /metrics need `Authorization: Bearer KEY`."""
    if state.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
        what = "Incorrect API key provided" if given else "Missing API key: send Authorization: Bearer KEY"
        raise ApiError(401, what, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing bodies over `limit` bytes before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    if not data:
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        body = json.loads(bytes(data))
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # fails fast on a lone surrogate; the walk names where
    except UnicodeEncodeError:
        where = _lone_surrogate(body)
        raise ApiError(400, f"{where} holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape without its pair), "
                            "which is not a character", param=where, code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to parse", code="invalid_json") from None
    return body


def _lone_surrogate(body) -> str:
    """Where in `body` a string (or key) holds a lone surrogate, as a param path such as messages[0].content."""
    stack = [(body, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                here = f"{where}.{key}" if where else key
                stack += [(key, here), (item, here)]
        elif isinstance(value, list):
            stack += [(item, f"{where}[{i}]") for i, item in enumerate(value)]
        elif isinstance(value, str) and LONE_SURROGATE.search(value):
            return (where or "the request body").encode("utf-8", "backslashreplace").decode("utf-8")
    return "the request body"


async def complete(request: Request, kind: str, state: ServerState) -> Response:
    """Both completion routes: check the request, queue it for a worker, answer whole or streamed."""
    authorize(request, state)
    try:
        body = await read_json(request, state.max_body_bytes)
    except ClientDisconnect:
        return Response(status_code=400)
    parsed = parse_request(kind, body, state.pairs)
    pool = state.pools[parsed.pair.name]
    # A prompt too long for a model is refused before it takes a place in the queue; tokenizing is off the loop.
    job = Job(await anyio.to_thread.run_sync(pool.fit, parsed), asyncio.get_running_loop())
    request.state.job = job  # for the access log and /metrics
    pool.submit(job)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        if not parsed.stream:
            event = await _final_event(job)
            if event[0] == "error":
                raise event[1]
            if event[0] == "gone":
                return Response(status_code=499)  # nobody reads it: the client has left
            return JSONResponse(completion_body(parsed, job.ident, int(time.time()), event[1]))
        first = await job.events.get()  # "started", or an error before any output: a plain error response
        if first[0] == "error":
            raise first[1]
    except BaseException:
        job.cancel(DISCONNECTED)
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if job.cancel_reason == DISCONNECTED:
        return Response(status_code=499)
    return EventSourceResponse(_sse(job, int(time.time())), ping=15, shutdown_event=anyio.Event(),
                               shutdown_grace_period=SHUTDOWN_GRACE_SECONDS)


async def _final_event(job: Job) -> tuple:
    while True:
        event = await job.events.get()
        if event[0] in ("done", "error", "gone"):
            return event


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Until the answer starts, a client that hangs up cancels its job (the SSE response watches after).

    A cancelled job may end without an event of its own, so the handler is woken with "gone".
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel(DISCONNECTED)
            job.events.put_nowait(("gone",))
            return


async def _sse(job: Job, created: int):
    """The OpenAI chunk stream of one job: role, content deltas (steps announced), finish, usage, [DONE]."""
    request: CompletionRequest = job.request
    ident = job.ident
    try:
        yield _data(chunk_body(request, ident, created, text="", role=True))
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                _, text, start = event
                yield _data(chunk_body(request, ident, created, text=text,
                                       glimp={"step_start": start} if start else None))
            elif event[0] == "step_end":
                yield _data(chunk_body(request, ident, created, text="" if request.kind == "text" else None,
                                       glimp={"step_end": event[1]}))
            elif event[0] == "done":
                result = event[1]
                yield _data(chunk_body(request, ident, created, text="" if request.kind == "text" else None,
                                       finish=result["finish_reason"], glimp=result["glimp"]))
                if request.include_usage:
                    yield _data(chunk_body(request, ident, created, usage=result["usage"]))
                yield {"data": "[DONE]"}
                return
            elif event[0] == "error":
                yield _data(event[1].body())
                yield {"data": "[DONE]"}
                return
    finally:
        job.cancel(DISCONNECTED)  # a no-op when the job finished; stops it when the client left


def _data(obj: dict) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False)}


def _model_card(served: ServedPair, ident: str, created: int) -> dict:
    spec = served.spec
    mode = ident.partition(":")[2] or spec.mode
    return {"id": ident, "object": "model", "created": created, "owned_by": "glimp",
            "glimp": {"pair": spec.name, "small": spec.small, "large": spec.large, "mode": mode, "tau": spec.tau,
                      "estimator": spec.estimator}}


def _error_response(exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        offered = ", ".join(f"{method} {route.path_format}" for route in request.app.routes
                            for method in sorted(route.methods - {"HEAD"}))
        return _error_response(ApiError(404, f"{request.url.path} is not a path this server offers; "
                                             f"it offers {offered}", code="not_found"))
    if exc.status_code == 405:
        return _error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                        code="method_not_allowed"))
    return _error_response(ApiError(exc.status_code, str(exc.detail)))


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette raises the exception again after this answer, so uvicorn logs its traceback.
    return _error_response(ApiError(500, "internal error in glimp serve (the server's log has the details)",
                                    kind="server_error"))
