"""What the code serving one request knows of it without being passed it: its id, its tracer and
the client's trace context, and the gateway's metrics. The middleware binds them in a context
variable for the request's task; asyncio tasks and ``asyncio.to_thread`` copy context
variables, so the router's thread and the stream's body see them too.

Outside a request (start-up, background reconciliation, the benchmarks) nothing is bound: no
request id, spans are no-ops, nothing is timed into a request's metrics.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from service.metrics import Metrics

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""A client's id is taken only if it is this: it goes into log lines and upstream headers."""
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TRACESTATE_MAX = 512
"""W3C Trace Context lets a proxy drop a tracestate it cannot carry whole; 512 is what it must
carry at least."""
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class RequestScope:
    request_id: str
    started: float
    """``time.perf_counter()`` when the gateway got the request head."""
    metrics: Metrics | None = None
    tracer: trace.Tracer | None = None
    """None: tracing is off, and the client's trace headers go to the engine as they came."""
    trace_headers: Mapping[str, str] = field(default_factory=dict)
    """The client's ``traceparent`` (and ``tracestate``), when valid."""


_current: ContextVar[RequestScope | None] = ContextVar("hybrid_request", default=None)


def bind(scope: RequestScope) -> Token[RequestScope | None]:
    return _current.set(scope)


def unbind(token: Token[RequestScope | None]) -> None:
    _current.reset(token)


def current() -> RequestScope | None:
    return _current.get()


def request_id() -> str | None:
    scope = _current.get()
    return scope.request_id if scope is not None else None


def accepted_request_id(given: str | None) -> str | None:
    """The client's id if it is a sane token (None: the gateway makes one)."""
    return given if given is not None and _REQUEST_ID.fullmatch(given) else None


def valid_trace_headers(traceparent: str | None, tracestate: str | None) -> dict[str, str]:
    """The client's W3C trace context if its ``traceparent`` is valid; a ``tracestate`` only
    with one (alone it means nothing), and only if short and printable."""
    if traceparent is None:
        return {}
    traceparent = traceparent.strip()
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return {}
    version, trace_id, parent_id, _flags, rest = match.groups()
    # Version ff is invalid; all-zero ids are invalid; version 00 has no further fields.
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16 or (version == "00" and rest):
        return {}
    headers = {"traceparent": traceparent}
    if (
        tracestate
        and len(tracestate) <= _TRACESTATE_MAX
        and tracestate.isascii()
        and tracestate.isprintable()
    ):
        headers["tracestate"] = tracestate
    return headers


def upstream_headers() -> dict[str, str]:
    """What the engine is sent about the current request: its id (vLLM makes it its own
    request id) and the trace context: under tracing, the current span's (so vLLM's spans
    are children of the gateway's), else the client's as it came."""
    scope = _current.get()
    if scope is None:
        return {}
    headers = {REQUEST_ID_HEADER: scope.request_id}
    if scope.tracer is not None:
        _PROPAGATOR.inject(headers)
    else:
        headers.update(scope.trace_headers)
    return headers


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Iterator[trace.Span]:
    """A child span of the current one, the current span while it runs; without tracing a
    shared do-nothing span (no context switch, nothing allocated)."""
    scope = _current.get()
    if scope is None or scope.tracer is None:
        yield trace.INVALID_SPAN
        return
    with scope.tracer.start_as_current_span(name, kind=kind, attributes=attributes) as opened:
        yield opened


def start_span(
    name: str, *, kind: trace.SpanKind, attributes: Mapping[str, AttributeValue] | None = None
) -> trace.Span:
    """A child span of the current one that outlives this call (a stream's): the caller ends
    it, and makes it current with :func:`activate` where needed."""
    scope = _current.get()
    if scope is None or scope.tracer is None:
        return trace.INVALID_SPAN
    return scope.tracer.start_span(name, kind=kind, attributes=attributes)


def activate(opened: trace.Span) -> contextlib.AbstractContextManager[object]:
    if opened is trace.INVALID_SPAN:
        return contextlib.nullcontext()
    return trace.use_span(opened, end_on_exit=False)


def metrics() -> Metrics | None:
    scope = _current.get()
    return scope.metrics if scope is not None else None


def started() -> float | None:
    """``time.perf_counter()`` when the current request's head arrived."""
    scope = _current.get()
    return scope.started if scope is not None else None


class RequestIdFilter(logging.Filter):
    """Sets ``request_id`` on the records a handler gets: the current request's id, ``-``
    outside requests (for a format that names ``%(request_id)s``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # the same record may pass several handlers
            record.request_id = request_id() or "-"
        return True


class RequestIdFormatter(logging.Formatter):
    """Shows a record's request id at the head of its message, in the format the handler had,
    so that the CLI's formats show it too. The record itself is left as it came: other handlers
    (tests' log capture among them) see the message the code logged."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", "-")
        if rid == "-" or not isinstance(record.msg, str):
            return self.inner.format(record)
        original = record.msg
        # The id has no '%' (its character set), so %-formatting of the rest is intact.
        record.msg = f"[{rid}] {original}"
        try:
            return self.inner.format(record)
        finally:
            record.msg = original


def install_request_ids(logger: logging.Logger | None = None) -> None:
    """Give the handlers of ``logger`` (the root's: where the gateway's loggers end up) the
    request id, once each: :class:`RequestIdFilter` and :class:`RequestIdFormatter`."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
        if not isinstance(handler.formatter, RequestIdFormatter):
            handler.setFormatter(RequestIdFormatter(handler.formatter or logging.Formatter()))
