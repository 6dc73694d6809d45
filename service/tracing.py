"""OpenTelemetry tracing of the gateway, on only when an OTLP endpoint is configured.

Configuration is OpenTelemetry's own environment (no ``HYBRID_`` setting): tracing is on when
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, unless
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. The exporter speaks gRPC (the
exporter chromadb already depends on), or HTTP with ``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``
(``opentelemetry-exporter-otlp-proto-http``, installed with vLLM). Everything else (headers,
timeout, sampler, ``OTEL_SERVICE_NAME``, resource attributes) is read by the SDK as usual.

The tracer provider belongs to the app, not to the process (the global one can be set once
only, and each test builds its own app): the middleware binds the app's tracer for each
request (:mod:`service.request_context`), and the router and the engine client open their
spans through it. Off, no provider exists and every span is a shared no-op.

Spans: the HTTP request (``SERVER``, child of the client's ``traceparent``), ``route`` (the
router's decision), ``retrieve`` (the index query), ``engine.chat`` (``CLIENT``: the upstream
generation, to its stream's end). vLLM gets the ``engine.chat`` span as its parent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from service import __version__

TRACER_NAME = "hybrid-serve"
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


class TracingConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Tracing:
    """The app's tracer, or None when tracing is off."""

    tracer: trace.Tracer | None = None
    provider: TracerProvider | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Tracing:
        env = os.environ if environ is None else environ
        if not tracing_configured(env):
            return cls()
        return cls.with_processor(BatchSpanProcessor(_otlp_exporter(env)))

    @classmethod
    def with_processor(cls, processor: SpanProcessor) -> Tracing:
        """Tracing into ``processor`` (tests give an in-memory exporter's)."""
        provider = TracerProvider(resource=_resource())
        provider.add_span_processor(processor)
        return cls(provider.get_tracer(TRACER_NAME, __version__), provider)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def shutdown(self) -> None:
        """Export what is still buffered (the SDK also does so at interpreter exit)."""
        if self.provider is not None:
            self.provider.shutdown()


def tracing_configured(env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(env.get(name, "").strip() for name in _ENDPOINTS)


@contextmanager
def server_span(
    tracer: trace.Tracer,
    name: str,
    client_headers: Mapping[str, str],
    attributes: Mapping[str, AttributeValue],
) -> Iterator[trace.Span]:
    """The request's own span, current while it is served, child of the client's trace
    context if it sent a valid one (a new trace otherwise)."""
    parent = TraceContextTextMapPropagator().extract(dict(client_headers))
    with tracer.start_as_current_span(
        name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
    ) as span:
        yield span


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    """The exporter reads its endpoint, headers and timeout from the environment itself."""
    protocol = next((env[name].strip() for name in _PROTOCOLS if env.get(name, "").strip()), "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )
        except ImportError as exc:
            raise TracingConfigError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf needs opentelemetry-exporter-otlp-proto-http "
                "installed; or use grpc (the default)"
            ) from exc
        return HttpExporter()
    raise TracingConfigError(f"unsupported OTLP protocol {protocol!r}: grpc or http/protobuf")


def _resource() -> Resource:
    """``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` win; the name defaults to ours
    rather than the SDK's ``unknown_service``."""
    detected = Resource.create()
    ours = Resource({SERVICE_NAME: TRACER_NAME, SERVICE_VERSION: __version__})
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        return detected.merge(ours)
    return ours.merge(detected)
