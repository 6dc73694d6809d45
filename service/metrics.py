"""Prometheus metrics of the gateway, in a registry of its own (one per app, no globals)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.protocol import RouteDecision, Usage

if TYPE_CHECKING:
    from service.admission import Admission

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "hybrid_requests",
            "HTTP requests by route and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hybrid_request_duration_seconds",
            "Time to the end of the response (the whole stream for SSE).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "hybrid_tokens",
            "Tokens processed, by kind (prompt or completion) and model.",
            ["kind", "model"],
            registry=self.registry,
        )
        self.errors = Counter(
            "hybrid_errors",
            "Error responses and stream error events, by type and code.",
            ["type", "code"],
            registry=self.registry,
        )
        self.routes = Counter(
            "hybrid_routes",
            "Chat requests by route kind (base, adapter, base+rag, adapter+rag) and adapter.",
            ["kind", "adapter"],
            registry=self.registry,
        )
        self.engine_restarts = Counter(
            "hybrid_engine_restarts", "Restarts of the supervised engine.", registry=self.registry
        )
        self.injections_removed = Counter(
            "hybrid_injections_removed",
            "Sentences of retrieved passages removed as instructions to the model, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.secrets_redacted = Counter(
            "hybrid_secrets_redacted",
            "Secrets of a request's system prompt redacted from its answers.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "hybrid_chat_completions_in_flight",
            "Chat completions admitted and not yet answered to the end (HYBRID_MAX_CONCURRENT_REQUESTS "
            "caps them).",
            registry=self.registry,
        )
        self.draining = Gauge(
            "hybrid_draining",
            "1 from SIGTERM until the gateway stops (it drains), else 0.",
            registry=self.registry,
        )

    def watch(self, admission: Admission) -> None:
        """Read the gauges off ``admission`` at each scrape."""
        self.in_flight.set_function(lambda: admission.generating)
        self.draining.set_function(lambda: float(admission.draining))

    def count_usage(self, model: str, usage: Usage | None) -> None:
        if usage is not None:
            self.tokens.labels("prompt", model).inc(usage.prompt_tokens)
            self.tokens.labels("completion", model).inc(usage.completion_tokens)

    def count_route(self, route: RouteDecision) -> None:
        self.routes.labels(route.kind, route.adapter or "").inc()

    def count_injections(self, removed: Mapping[str, int]) -> None:
        for kind, count in removed.items():
            self.injections_removed.labels(kind).inc(count)

    def count_redactions(self, count: int) -> None:
        self.secrets_redacted.inc(count)

    def count_error(self, error_type: str, code: str | None) -> None:
        self.errors.labels(error_type, code or "").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
