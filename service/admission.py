"""Admission: which requests the gateway takes on. Generation is capped (a request over the cap
is a 429 at once, before its body is read, rather than a queue that grows until clients time
out), and while the gateway drains for shutdown every new request but the probes is a 503.

Pure ASGI middleware: a streamed response holds its slot until its last byte is sent or the
client goes away."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import APIError, EngineUnavailableError
from service.metrics import Metrics
from service.middleware import send_error

PROBES = frozenset({"/health", "/ready", "/metrics"})
"""Answered while draining too: /ready says 503 itself, /health that the process lives."""

GENERATION = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"})
"""The routes that count against the concurrency cap: chat completions, completions and responses
hold an engine generation each (a response is a chat completion underneath). Embeddings hold no
engine slot, but they are the gateway's own CPU work: each request runs the embedder (the one the
router's queries share) in a worker thread over up to 2,048 inputs, so an uncapped flood of them
would queue without bound in the thread pool and slow every chat request's routing; capped, the
excess gets the same quick 429 to back off on. One cap for all of them, so that
``HYBRID_MAX_CONCURRENT_REQUESTS`` bounds the gateway's whole generation work."""

OVER_CAPACITY_RETRY_AFTER_S = 1
"""A slot frees as soon as any generation ends: clients should come back soon, not in
``HYBRID_RETRY_AFTER_S`` (which is sized for an engine restart)."""


class TooManyRequestsError(APIError):
    """429 in OpenAI's words (``type: requests``, ``code: rate_limit_exceeded``), so SDKs back
    off and retry after ``Retry-After``."""

    status_code = 429
    error_type = "requests"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The gateway is serving its maximum of {limit} concurrent generation requests "
            "(chat completions, completions, responses, embeddings; "
            "HYBRID_MAX_CONCURRENT_REQUESTS); retry shortly.",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(OVER_CAPACITY_RETRY_AFTER_S)},
        )


class Admission:
    """What is in flight, the cap, and whether the gateway is draining."""

    def __init__(self, max_generating: int, *, retry_after_s: int) -> None:
        self.max_generating = max_generating
        self.retry_after_s = retry_after_s
        self.in_flight = 0  # every HTTP request, probes included
        self.generating = 0
        self.draining_since: float | None = None

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def start_draining(self) -> None:
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def shutting_down(self) -> EngineUnavailableError:
        error = EngineUnavailableError(
            "The gateway is shutting down; retry on another instance.",
            retry_after_s=self.retry_after_s,
            code="shutting_down",
        )
        # Tell keep-alive clients to reconnect, so a load balancer sends them elsewhere.
        error.headers["Connection"] = "close"
        return error


class AdmissionControl:
    """The middleware that applies :class:`Admission` to every HTTP request."""

    def __init__(self, app: ASGIApp, admission: Admission, metrics: Metrics) -> None:
        self.app = app
        self.admission = admission
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admission = self.admission
        path = scope["path"]
        error: APIError | None = None
        if admission.draining and path not in PROBES:
            error = admission.shutting_down()
        elif path in GENERATION and admission.generating >= admission.max_generating:
            error = TooManyRequestsError(admission.max_generating)
        if error is not None:
            await send_error(send, error, self.metrics)
            return
        generation = path in GENERATION
        admission.in_flight += 1
        admission.generating += generation
        try:
            await self.app(scope, receive, send)
        finally:
            admission.in_flight -= 1
            admission.generating -= generation
