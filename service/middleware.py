"""Cross-cutting concerns as pure ASGI middleware (``BaseHTTPMiddleware`` would break
streaming and disconnect detection)."""

from __future__ import annotations

import contextlib
import time
import uuid

from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import request_context
from service.errors import APIError, HeadersTooLargeError, PayloadTooLargeError
from service.metrics import Metrics
from service.tracing import Tracing, server_span


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
    """Gives every request an id (the client's ``X-Request-Id`` if it is a sane token), returned
    as ``X-Request-Id`` on every response, bound with the client's trace context for the code
    that serves the request (:mod:`service.request_context`: log lines, the engine's headers,
    spans); traces the request when tracing is on; counts requests and their latency by route."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, routes: frozenset[str], tracing: Tracing | None = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.tracer = tracing.tracer if tracing is not None else None
        # Built after logging is configured (the CLI configures it first): the id reaches its
        # handlers' lines.
        request_context.install_request_ids()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_context.accepted_request_id(_header(scope, b"x-request-id")) or uuid.uuid4().hex
        scope.setdefault("state", {})[REQUEST_ID] = request_id
        client_trace = request_context.valid_trace_headers(
            _header(scope, b"traceparent"), _header(scope, b"tracestate")
        )
        path = scope["path"]
        route = path if path in self.routes else "other"
        method = scope["method"]
        status = 500

        async def tagged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        token = request_context.bind(
            request_context.RequestScope(request_id, started, self.metrics, self.tracer, client_trace)
        )
        try:
            with self._span(scope, route, client_trace) as span:
                await self.app(scope, receive, tagged_send)
                if span.is_recording():
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(trace.StatusCode.ERROR)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            self.metrics.requests.labels(route, method, str(status)).inc()
        # Not in the finally: Starlette logs an unexpected error outside this middleware, in the
        # same task, and that line needs the id too (the task ends with the request).
        request_context.unbind(token)

    def _span(
        self, scope: Scope, route: str, client_trace: dict[str, str]
    ) -> contextlib.AbstractContextManager[trace.Span]:
        if self.tracer is None:
            return contextlib.nullcontext(trace.INVALID_SPAN)
        method = scope["method"]
        attributes: dict[str, str] = {
            "http.request.method": method,
            "url.path": scope["path"],
            "hybrid.request_id": scope["state"][REQUEST_ID],
        }
        if route != "other":
            attributes["http.route"] = route
        # Span names stay few: an unknown path is named by its method alone.
        name = f"{method} {route}" if route != "other" else method
        return server_span(self.tracer, name, client_trace, attributes)


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
