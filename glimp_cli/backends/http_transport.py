"""HTTP transport to an OpenAI-compatible server: requests, event streams, retries, one-line errors.

Every request of the HTTP backend goes through `Endpoint`: httpx for the requests (its timeouts are "no byte
for this long", as `timeout` promises) and httpx-sse for the event streams (an event's `data:` may
span several lines). Retries with backoff on connection errors, timeouts and 5xx are glimp's own:
httpx retries only failed connects, and every failure here must become one line naming model and URL.
What the requests ask and what their answers mean is the backend's business (`openai_http.py`).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Iterator

import httpx
from httpx_sse import EventSource, SSEError

from glimp_cli.backends.base import ContextFull
from glimp_cli.errors import BackendError

BACKOFF_SECONDS = 0.5  # first retry delay; doubles per attempt
BACKOFF_CAP = 8.0


class _Transient(Exception):
    """A failure worth retrying: no connection, a timeout, a 5xx."""


class Endpoint:
    """Requests to one OpenAI-compatible server: auth, timeout, retries with backoff, one-line errors."""

    def __init__(self, label: str, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 2, backoff: float = BACKOFF_SECONDS, client: httpx.Client | None = None):
        self.label = label  # names the model in every error
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max(0, max_retries)
        self.backoff = backoff
        self._client = client

    @property
    def client(self) -> httpx.Client:
        """One connection pool per endpoint, made on first use (so constructing an Endpoint is free)."""
        if self._client is None:
            self._client = httpx.Client()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def url(self, path: str) -> str:
        return self.base_url + path

    def fail(self, url: str, what: str) -> BackendError:
        return BackendError(f"{self.label} at {url}: {what}")

    def get_json(self, path: str, timeout: float | None = None, retries: int | None = None) -> dict:
        return self._call("GET", path, None, timeout, retries)

    def post_json(self, path: str, body: dict, retries: int | None = None) -> dict:
        return self._call("POST", path, body, None, retries)

    def post_stream(self, path: str, body: dict) -> Iterator[dict]:
        """The server-sent events of a streamed completion, one JSON object each.

        Retries only until the response starts; a stream that breaks later is one error.
        Closing the generator closes the connection, which makes the server stop generating.
        """
        url = self.url(path)
        response = self._retrying(url, lambda: self._send("POST", url, {**body, "stream": True}, self.timeout))
        events = 0
        try:
            try:
                for sse in EventSource(response).iter_sse():
                    if not sse.data:
                        continue  # an event with no data (a keep-alive)
                    if sse.data.strip() == "[DONE]":
                        return
                    event = self._decode(url, sse.data)
                    if "error" in event:
                        raise self.fail(url, f"server error: {_error_message(event)}")
                    events += 1
                    yield event
            except SSEError:
                # Not an event stream: a JSON body (an error object), or nothing at all.
                raw = response.read().decode("utf-8", errors="replace")
                if raw.strip():
                    data = self._decode(url, raw)
                    raise self.fail(url, f"server error: {_error_message(data)}" if "error" in data
                                    else "the server answered a streamed request without an event stream")
        except httpx.TimeoutException:
            raise self.fail(url, f"no data for {self.timeout:g} s (timeout) in the middle of a stream") from None
        except httpx.TransportError as exc:
            raise self.fail(url, f"the stream broke: {_reason(exc)}") from None
        finally:
            response.close()
        if not events:
            raise EmptyStream()
        raise self.fail(url, "the stream ended without [DONE]")

    def _call(self, method: str, path: str, body: dict | None, timeout: float | None, retries: int | None) -> dict:
        url = self.url(path)
        seconds = timeout or self.timeout

        def attempt() -> dict:
            response = self._send(method, url, body, seconds)
            try:
                raw = response.read()
            except httpx.TimeoutException:
                raise _Transient(f"no answer within {seconds:g} s (timeout)") from None
            except httpx.TransportError as exc:
                raise _Transient(_reason(exc)) from None
            finally:
                response.close()
            return self._decode(url, raw.decode("utf-8", errors="replace"))

        return self._retrying(url, attempt, retries)

    def _retrying(self, url: str, attempt, retries: int | None = None):
        tries = 1 + (self.max_retries if retries is None else retries)
        for i in range(tries):
            try:
                return attempt()
            except _Transient as exc:
                if i + 1 == tries:
                    raise self.fail(url, f"{exc} ({tries} attempt{'s' if tries > 1 else ''})") from None
                time.sleep(min(self.backoff * 2 ** i, BACKOFF_CAP))

    def _send(self, method: str, url: str, body: dict | None, timeout: float) -> httpx.Response:
        """Send a request and return its response once the headers are in (the body is read by the caller)."""
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            request = self.client.build_request(method, url, json=body, headers=headers, timeout=timeout)
            response = self.client.send(request, stream=True)
        except httpx.TimeoutException:
            raise _Transient(f"no answer within {timeout:g} s (timeout)") from None
        except httpx.TransportError as exc:
            raise _Transient(_reason(exc)) from None
        if response.status_code < 400:
            return response
        try:
            raw = response.read().decode("utf-8", errors="replace")
        except httpx.HTTPError:
            raw = ""
        finally:
            response.close()
        detail = _http_detail(raw, response.reason_phrase)
        code = response.status_code
        if code >= 500:
            raise _Transient(f"HTTP {code}: {detail}")
        if code == 400 and "context" in detail.lower() and "length" in detail.lower():
            raise ContextFull(f"{self.label}: {detail}")
        raise self.fail(url, f"HTTP {code}: {detail}")

    def _decode(self, url: str, text: str) -> dict:
        try:
            data = json.loads(text)
        except ValueError:
            snippet = " ".join(text.split())[:80]
            raise self.fail(url, f"malformed JSON in the response: {snippet!r}") from None
        if not isinstance(data, dict):
            raise self.fail(url, f"expected a JSON object, got {type(data).__name__}")
        return data


class EmptyStream(Exception):
    """A stream that closed before its first event (llama.cpp's server does this for a too-long prompt)."""


def _reason(exc: BaseException) -> str:
    """What went wrong with a connection, from the OS error under httpx's exception when there is one."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (is the server running?)"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the host ({cause.strerror or cause})"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the server closed the connection ({exc})"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return str(exc) or type(exc).__name__


def _http_detail(raw: str, reason: str) -> str:
    try:
        message = _error_message(json.loads(raw))
    except ValueError:
        message = " ".join(raw.split())[:200]
    return message or reason or "no details"


def _error_message(data: object) -> str:
    """The human part of an OpenAI-style ({"error": {"message"}}) or FastAPI ({"detail"}) error body."""
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if isinstance(err, list) and err and isinstance(err[0], dict):
            err = err[0].get("msg", err[0])
        if err is not None:
            return " ".join(str(err).split())[:300]
    return " ".join(str(data).split())[:300]
