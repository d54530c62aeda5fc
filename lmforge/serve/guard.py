"""The server's outermost ASGI layer: the API key, the body limit counted as bytes arrive, and the request counter
labelled by route template."""

from __future__ import annotations

import hmac
import json

from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.serve.metrics import UNMATCHED, ServerMetrics


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit; the app's HTTPException handler answers 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"the body is over {limit} bytes; send a smaller one")


class Guard:
    """Wraps the app: requests to a guarded path without the key get 401; a body over `max_body_bytes` gets 413
    as soon as that many bytes have arrived (or at once, from Content-Length), before the rest is read."""

    def __init__(
        self, app: ASGIApp, metrics: ServerMetrics, routes: list, max_body_bytes: int, api_key: str | None = None
    ):
        self.app, self.metrics, self.routes, self.limit = app, metrics, routes, max_body_bytes
        self.authorization = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # a response never started: the connection failed, as for the client

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(self._route(scope), str(status)).inc()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        # the key compared in constant time: a timing side channel would give it away byte by byte
        given = headers.get(b"authorization", b"")
        if self.authorization and needs_key(scope["path"]) and not hmac.compare_digest(given, self.authorization):
            message = "missing or wrong API key; send Authorization: Bearer <key>"
            return await _error(send, 401, message, code="invalid_api_key")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:  # h11 refuses a malformed length before us
            return await _error(send, 413, BodyTooLarge(self.limit).detail, close=True)
        received, started = 0, False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def send_started(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if received > self.limit:  # else the server would read, and drop, the rest of the upload
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counted_receive, send_started)
        except BodyTooLarge as e:  # read where no handler turned it into a response
            if started:
                raise
            await _error(send, 413, e.detail, close=True)

    def _route(self, scope: Scope) -> str:
        """The path template of the route this request matched: a label with few values, whatever paths arrive."""
        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE:  # PARTIAL: the path with another method (405)
                return route.path
        return UNMATCHED


def needs_key(path: str) -> bool:
    """The API and /metrics need the key when one is set; /health and the chat page stay open."""
    return path.startswith("/v1") or path == "/metrics"


async def _error(send: Send, status: int, message: str, code: str | None = None, close: bool = False) -> None:
    """An OpenAI error object, sent before the app has read the body; `close` ends the connection after it, so the
    client's upload stops instead of being read to its end."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(b"connection", b"close")] if close else []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
