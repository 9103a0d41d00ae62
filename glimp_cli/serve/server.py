"""Start `glimp serve`: bind, load one engine per worker and pair, run uvicorn, stop cleanly on a signal."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import socket
from time import monotonic
from urllib.parse import urlsplit

import uvicorn
from sse_starlette.sse import AppStatus

from glimp_cli.engine import Engine
from glimp_cli.errors import UsageError
from glimp_cli.serve import ServeOptions
from glimp_cli.serve.app import SHUTDOWN_GRACE_SECONDS, ServerState, build_app
from glimp_cli.serve.protocol import ServedPair
from glimp_cli.serve.workers import WorkerPool


class _Server(uvicorn.Server):
    """uvicorn's server, told to stop the workers at the first signal and not to re-raise it after."""

    def __init__(self, config: uvicorn.Config, state: ServerState, stop_seconds: float):
        super().__init__(config)
        self.state = state
        self.stop_seconds = stop_seconds
        self.stop_signal: int | None = None
        self._deadline: float | None = None

    def deadline(self) -> float:
        """When waiting for the workers ends: `stop_seconds` after the first signal."""
        if self._deadline is None:
            self._deadline = monotonic() + self.stop_seconds
        return self._deadline

    def handle_exit(self, sig: int, frame) -> None:
        # Runs in the signal handler: only flags. Jobs stop at their next token and streams end
        # with an error chunk; a second Ctrl-C stops waiting for them.
        self.deadline()
        self.state.begin_shutdown()
        AppStatus.should_exit = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        self.stop_signal = self.stop_signal or sig

    async def shutdown(self, sockets=None) -> None:
        # A worker stuck in a long call never sends its job's answer: the server sends a 503 in its place,
        # so that uvicorn does not wait for those connections past the deadline.
        delay = max(0.0, self.deadline() - monotonic())
        asyncio.get_running_loop().call_later(delay, self.state.fail_unfinished)
        await super().shutdown(sockets)


def run(options: ServeOptions) -> str:
    """Serve until SIGINT/SIGTERM; returns how it stopped."""
    api_key = _api_key(options.api_key_env)
    if options.workers < 1:
        raise UsageError("--workers must be at least 1")
    if options.queue_size < 0:
        raise UsageError("--queue must be >= 0")
    if options.max_body_bytes < 1024:
        raise UsageError("--max-body-bytes must be at least 1024")
    cors_origins = _cors_origins(options.cors_origins)
    sock = _bind(options.host, options.port)
    pools: dict[str, WorkerPool] = {}
    server = None
    try:
        served = {}
        for pair in options.pairs:
            formats = {getattr(pair, role): options.registry.model(getattr(pair, role)).prompt for role in ("small", "large")}
            served[pair.name] = ServedPair(pair, formats)
            engines: list[Engine] = []
            try:
                for _ in range(options.workers):
                    engines.append(Engine.load(options.registry, pair, {"small", "large"}))
                    engines[-1].prompt_cache = options.prompt_cache
            except BaseException:
                for engine in engines:
                    engine.close()
                raise
            pools[pair.name] = WorkerPool(pair.name, engines, options.queue_size)
        state = ServerState(served, pools, api_key, options.max_body_bytes, cors_origins,
                            access_log=None if options.quiet else options.log)
        config = uvicorn.Config(build_app(state), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=int(SHUTDOWN_GRACE_SECONDS) + 5)
        server = _Server(config, state, options.stop_seconds)
        host, port = sock.getsockname()[:2]
        where = f"[{host}]" if ":" in host else host
        ids = ", ".join(p.model_ids()[0] for p in served.values())
        if api_key is None and not _loopback(host):
            options.log(f"glimp serve: warning: listening on {host} without --api-key-env: "
                        "anyone who can reach this address can use the models")
        options.log(f"glimp serve: http://{where}:{port}/ ({ids}; {options.workers} worker(s) per pair, "
                    f"queue {options.queue_size}{', API key required' if api_key else ''}"
                    f"{'' if options.prompt_cache else ', no prompt cache'}"
                    f"{', CORS for ' + ' '.join(cors_origins) if cors_origins else ''}); Ctrl-C stops")
        server.run(sockets=[sock])
        return signal.Signals(server.stop_signal).name if server.stop_signal else "stopped"
    finally:
        deadline = server.deadline() if server else monotonic() + options.stop_seconds
        abandoned = [worker for pool in pools.values() for worker in pool.stop(deadline)]
        sock.close()
        if abandoned:
            waited = monotonic() - deadline + options.stop_seconds
            options.log(f"glimp serve: abandoned {len(abandoned)} worker(s) still busy {waited:.1f} s after the stop "
                        f"(limit {options.stop_seconds:g} s): {', '.join(abandoned)}")


def _api_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    key = os.environ.get(env_name, "")
    if not key.strip():
        raise UsageError(f"--api-key-env {env_name}: the environment variable {env_name} is not set or empty")
    return key.strip()


def _cors_origins(given: tuple[str, ...]) -> tuple[str, ...]:
    """The --cors-origin values split at commas, each checked to be an origin as a browser sends it, or *."""
    origins = tuple(o.strip() for value in given for o in value.split(",") if o.strip())
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and not (parts.scheme and parts.netloc and not parts.path and not parts.query
                                  and not parts.fragment):
            raise UsageError(f"--cors-origin {origin}: not an origin; give scheme://host[:port] with no path "
                             "(e.g. http://localhost:3000), or * for any")
    return origins


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
