"""Cross-cutting concerns as pure ASGI middleware (``BaseHTTPMiddleware`` would break
streaming and disconnect detection)."""

from __future__ import annotations

import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import APIError, HeadersTooLargeError, PayloadTooLargeError
from service.metrics import Metrics


class BodySizeLimit:
    """413 for a body over ``max_bytes``: at once from ``Content-Length``, or as soon as a
    chunked body passes the limit, before anything parses it."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, metrics: Metrics, larger: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.larger = larger or {}  # path prefix -> its own limit (adapter uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = next(
            (n for prefix, n in self.larger.items() if scope["path"].startswith(prefix)), self.max_bytes
        )
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            error = self._too_large(limit)
            await send_error(send, error, self.metrics)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large(limit)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self, limit: int) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"The request body exceeds the limit of {limit} bytes.")


class HeaderLimits:
    """431 for more than ``max_headers`` headers or more than ``max_bytes`` of header names and
    values, before routing or auth reads any of them (a 100 kB bearer token is not compared)."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_headers: int, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_headers = max_headers
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        size = sum(len(name) + len(value) for name, value in headers)
        if len(headers) > self.max_headers or size > self.max_bytes:
            error = HeadersTooLargeError(
                f"The request has {len(headers)} headers of {size} bytes: at most {self.max_headers} "
                f"headers and {self.max_bytes} bytes are accepted."
            )
            await send_error(send, error, self.metrics)
            return
        await self.app(scope, receive, send)


REQUEST_ID = "request_id"
"""Key of the request id in ``request.state``."""


class RequestContext:
    """Gives every response an ``X-Request-Id`` (the client's, if it sent a sane one) and
    counts requests and their latency by route."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = (
            given
            if given and len(given) <= 128 and given.isascii() and given.isprintable()
            else uuid.uuid4().hex
        )
        scope.setdefault("state", {})[REQUEST_ID] = request_id
        path = scope["path"]
        route = path if path in self.routes else "other"
        status = 500
        started = time.perf_counter()

        async def tagged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def send_error(send: Send, error: APIError, metrics: Metrics) -> None:
    """Answer ``error`` from a middleware, counted as the app's error handlers count theirs."""
    metrics.count_error(error.error_type, error.code)
    body = error.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
