"""Tracing and request correlation without a gateway: when tracing is on, what the engine is
sent, which client ids and trace contexts are taken, and the log filter. Spans go to the SDK's
in-memory exporter; nothing touches the network."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import request_context
from service.request_context import RequestScope
from service.tracing import Tracing, TracingConfigError, tracing_configured

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ENDPOINT = "http://collector.test:4317"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    tracing = Tracing.with_processor(SimpleSpanProcessor(exporter))
    yield tracing
    tracing.shutdown()


@pytest.fixture
def bound(tracing: Tracing) -> Iterator[RequestScope]:
    scope = RequestScope("req-1", time.perf_counter(), tracer=tracing.tracer)
    token = request_context.bind(scope)
    yield scope
    request_context.unbind(token)


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_SERVICE_NAME": "gateway"}, False),
    ],
    ids=["nothing", "endpoint", "traces-endpoint", "blank", "sdk-disabled", "exporter-none", "name-only"],
)
def test_tracing_is_on_only_with_an_otlp_endpoint(env: dict[str, str], on: bool) -> None:
    assert tracing_configured(env) is on
    tracing = Tracing.from_environment(env)
    try:
        assert tracing.enabled is on
        assert (tracing.provider is not None) is on
    finally:
        tracing.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_both_otlp_protocols_build_an_exporter_without_connecting(protocol: str) -> None:
    tracing = Tracing.from_environment(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
    )
    assert tracing.enabled
    tracing.shutdown()  # nothing was recorded: nothing is sent


def test_an_unknown_protocol_is_refused() -> None:
    with pytest.raises(TracingConfigError, match="http/json"):
        Tracing.from_environment(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        )


def test_the_service_is_named_hybrid_serve_unless_the_environment_names_it(
    monkeypatch: pytest.MonkeyPatch, exporter: InMemorySpanExporter
) -> None:
    default = Tracing.with_processor(SimpleSpanProcessor(exporter))
    assert default.provider is not None
    assert default.provider.resource.attributes[SERVICE_NAME] == "hybrid-serve"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu")
    named = Tracing.with_processor(SimpleSpanProcessor(exporter))
    assert named.provider is not None
    assert named.provider.resource.attributes[SERVICE_NAME] == "gateway-eu"


# ---------------------------------------------------------------------------- client input


@pytest.mark.parametrize(
    ("given", "taken"),
    [
        ("client-id-1", True),
        ("a.b:c_d-E9", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("has space", False),
        ("new\nline", False),
        ("req-é", False),
        ("100%", False),
        (None, False),
    ],
)
def test_a_client_request_id_is_taken_only_if_it_is_a_sane_token(given: str | None, taken: bool) -> None:
    assert request_context.accepted_request_id(given) == (given if taken else None)


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-" + "0" * 32 + f"-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-" + "0" * 16 + "-01",  # all-zero parent id
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # the forbidden version
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # upper case hex
        f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has four fields
        f"00-{TRACE_ID}-{PARENT_ID}",
        "garbage",
    ],
)
def test_an_invalid_traceparent_is_not_forwarded(traceparent: str) -> None:
    assert request_context.valid_trace_headers(traceparent, "vendor=1") == {}


def test_a_valid_trace_context_is_kept_whole() -> None:
    assert request_context.valid_trace_headers(TRACEPARENT, "congo=t61rcWkgMzE") == {
        "traceparent": TRACEPARENT,
        "tracestate": "congo=t61rcWkgMzE",
    }
    # A later version may add fields: what is known of it is read, the rest kept.
    later = f"01-{TRACE_ID}-{PARENT_ID}-01-more"
    assert request_context.valid_trace_headers(later, None) == {"traceparent": later}


@pytest.mark.parametrize("tracestate", ["x" * 513, "a=\x01", "a=é", ""])
def test_an_unfit_tracestate_is_dropped_and_the_traceparent_kept(tracestate: str) -> None:
    assert request_context.valid_trace_headers(TRACEPARENT, tracestate) == {"traceparent": TRACEPARENT}


def test_a_tracestate_alone_is_not_forwarded() -> None:
    assert request_context.valid_trace_headers(None, "congo=t61rcWkgMzE") == {}


# ---------------------------------------------------------------------------- what the engine gets


def test_outside_a_request_the_engine_gets_no_extra_headers() -> None:
    assert request_context.upstream_headers() == {}
    assert request_context.request_id() is None


def test_without_tracing_the_clients_trace_context_goes_as_it_came() -> None:
    client = {"traceparent": TRACEPARENT, "tracestate": "congo=1"}
    token = request_context.bind(RequestScope("req-7", time.perf_counter(), trace_headers=client))
    try:
        assert request_context.upstream_headers() == {"X-Request-Id": "req-7", **client}
        # Spans are the shared no-op: nothing recorded, nothing made current.
        with request_context.span("route") as span:
            assert span is trace.INVALID_SPAN
            assert trace.get_current_span() is trace.INVALID_SPAN
        assert request_context.start_span("engine.chat", kind=trace.SpanKind.CLIENT) is trace.INVALID_SPAN
    finally:
        request_context.unbind(token)


def test_with_tracing_the_engine_gets_the_current_span_as_its_parent(
    bound: RequestScope, exporter: InMemorySpanExporter
) -> None:
    with request_context.span("engine.chat", kind=trace.SpanKind.CLIENT) as span:
        headers = request_context.upstream_headers()
    context = span.get_span_context()
    assert headers["X-Request-Id"] == "req-1"
    assert headers["traceparent"].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
    assert [s.name for s in exporter.get_finished_spans()] == ["engine.chat"]


def test_a_span_started_for_a_stream_is_current_only_when_activated(
    bound: RequestScope, exporter: InMemorySpanExporter
) -> None:
    with request_context.span("POST /v1/chat/completions") as parent:
        opened = request_context.start_span("engine.chat", kind=trace.SpanKind.CLIENT)
        assert trace.get_current_span() is parent
        with request_context.activate(opened):
            assert trace.get_current_span() is opened
        assert opened.is_recording()  # not ended on leaving: the stream ends it
        opened.end()
    finished = {s.name: s for s in exporter.get_finished_spans()}
    child = finished["engine.chat"]
    assert child.parent is not None
    assert child.parent.span_id == parent.get_span_context().span_id


# ---------------------------------------------------------------------------- log lines


def test_log_lines_of_a_request_carry_its_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(request_context.RequestIdFilter())
    log = logging.getLogger("service.test")
    token = request_context.bind(RequestScope("req-42", time.perf_counter()))
    try:
        with caplog.at_level(logging.INFO):
            log.info("route %s: %s", "adapter=none", "50% sure")
    finally:
        request_context.unbind(token)
    log.warning("outside")
    inside, outside = caplog.records
    assert inside.request_id == "req-42"  # type: ignore[attr-defined]
    assert outside.request_id == "-"  # type: ignore[attr-defined]
    shown = request_context.RequestIdFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    assert shown.format(inside) == "INFO service.test: [req-42] route adapter=none: 50% sure"
    assert shown.format(outside) == "WARNING service.test: outside"
    # The record is left as logged, for the other handlers.
    assert inside.getMessage() == "route adapter=none: 50% sure"


def test_a_record_through_two_handlers_gets_one_id() -> None:
    log_filter = request_context.RequestIdFilter()
    record = logging.LogRecord("service.test", logging.INFO, __file__, 1, "hello", None, None)
    token = request_context.bind(RequestScope("req-9", time.perf_counter()))
    try:
        log_filter.filter(record)
    finally:
        request_context.unbind(token)
    log_filter.filter(record)  # a later handler, outside the request's context
    assert record.request_id == "req-9"  # type: ignore[attr-defined]


def test_handlers_get_the_id_once_in_the_format_they_had() -> None:
    logger = logging.getLogger("test_tracing.install")
    logger.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        request_context.install_request_ids(logger)
        request_context.install_request_ids(logger)
        assert sum(isinstance(f, request_context.RequestIdFilter) for f in handler.filters) == 1
        token = request_context.bind(RequestScope("req-5", time.perf_counter()))
        try:
            logger.warning("engine %s", "down")
        finally:
            request_context.unbind(token)
        logger.warning("idle")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["WARNING [req-5] engine down", "WARNING idle"]
