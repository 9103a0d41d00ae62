"""`glimp serve`: the router behind an OpenAI-compatible HTTP API, with a live page at `/`.

Importing this package loads no web framework; `serve` checks the `serve` extra and then starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from glimp_cli.config import PairSpec, Registry
from glimp_cli.errors import MissingExtraError

# Seconds a stopping server waits for its workers. A worker still busy then (a long prefill, an
# upstream call that does not answer) is abandoned: its request gets a 503 and the process exits.
# Below app.SHUTDOWN_GRACE_SECONDS, so that the stream of an abandoned worker still ends with its error.
STOP_SECONDS = 5.0


@dataclass
class ServeOptions:
    """What `glimp serve` was asked for; `log` prints one line to the operator."""

    registry: Registry
    pairs: list[PairSpec]
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    queue_size: int = 8
    api_key_env: str | None = None
    max_body_bytes: int = 1_000_000
    cors_origins: tuple[str, ...] = ()  # as given: each may hold several, separated by commas
    quiet: bool = False  # no access-log line per request
    prompt_cache: bool = True  # keep a conversation's earlier turns cached between its requests (Engine.prompt_cache)
    stop_seconds: float = STOP_SECONDS
    log: Callable[[str], None] = print


def serve(options: ServeOptions) -> str:
    """Run the server until a signal stops it; returns how it stopped."""
    try:
        import prometheus_client  # noqa: F401
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(f"glimp serve needs the serve extra ({exc.name} is missing): "
                                "pip install 'glimp[serve]'") from None
    from glimp_cli.serve.server import run

    return run(options)
