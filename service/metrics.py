"""Prometheus metrics of the gateway, in a registry of its own (one per app, no globals)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.protocol import RouteDecision, Usage

if TYPE_CHECKING:
    from service.admission import Admission

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# A first token on CPU: tens of ms for a short prompt on an idle engine, seconds behind a queue
# or a long retrieved context (the soak measured p50 0.29 s, p95 0.83 s).
_FIRST_TOKEN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)
# Between two chunks: one decode step (ms to tens of ms on CPU), longer when a batch grows.
_INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
# The router and the index: milliseconds (decide p50 11 ms, p99 14 ms; the index query p50 5 ms,
# p99 9 ms at 10,000 chunks), up to tens of ms under load.
_ROUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# The classifier's calibrated probabilities: an adapter is chosen at or above its threshold (about
# 0.4 to 0.65) and mostly lands above 0.9; a base decision may be well under 0.5 when it abstains.
# The top buckets are narrow because drift shows first as confidence sliding off 0.95-0.99.
_PROBABILITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# Cosine similarities lie in [-1, 1] (the first bucket takes everything at or below 0); finer
# around HYBRID_RAG_THRESHOLD's default, 0.45, where passages start being added.
_SIMILARITY_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9)


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
        self.first_token = Histogram(
            "hybrid_time_to_first_token_seconds",
            "Streams: from the request's arrival to its first chunk with content, by model and "
            "adapter ('' for the base model).",
            ["model", "adapter"],
            buckets=_FIRST_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "hybrid_inter_token_seconds",
            "Streams: time between two consecutive chunks with content, by model and adapter.",
            ["model", "adapter"],
            buckets=_INTER_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.route_seconds = Histogram(
            "hybrid_route_seconds",
            "The router's decision, the query's embedding and the index query included, by the "
            "adapter decided (empty: the base model).",
            ["adapter"],
            buckets=_ROUTE_BUCKETS,
            registry=self.registry,
        )
        self.retrieval_seconds = Histogram(
            "hybrid_retrieval_seconds",
            "The index query of a routed request (dense and lexical search, fusion), by the adapter "
            "decided (empty: the base model).",
            ["adapter"],
            buckets=_ROUTE_BUCKETS,
            registry=self.registry,
        )
        self.route_score = Histogram(
            "hybrid_route_score",
            "Automatic routing decisions: the classifier's calibrated probability of the class "
            "decided, by the adapter decided (empty: the base model).",
            ["adapter"],
            buckets=_PROBABILITY_BUCKETS,
            registry=self.registry,
        )
        self.retrieval_score = Histogram(
            "hybrid_retrieval_score",
            "Every passage the index returned for a routed request (used or not): its cosine "
            "similarity to the query, by collection.",
            ["collection"],
            buckets=_SIMILARITY_BUCKETS,
            registry=self.registry,
        )
        self.retrieval_top_score = Histogram(
            "hybrid_retrieval_top_score",
            "The best passage the index returned for a routed request: its cosine similarity to "
            "the query, by its collection.",
            ["collection"],
            buckets=_SIMILARITY_BUCKETS,
            registry=self.registry,
        )
        self.traffic_log_dropped = Counter(
            "hybrid_traffic_log_dropped",
            "Traffic log lines not written (the writer fell behind, or the file could not be written).",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "hybrid_chat_completions_in_flight",
            "Generation requests (chat completions, completions, responses, embeddings) admitted and "
            "not yet answered to the end (HYBRID_MAX_CONCURRENT_REQUESTS caps them).",
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

    def observe_first_token(self, model: str, adapter: str | None, seconds: float) -> None:
        self.first_token.labels(model, adapter or "").observe(seconds)

    def observe_inter_token(self, model: str, adapter: str | None, seconds: float) -> None:
        self.inter_token.labels(model, adapter or "").observe(seconds)

    def observe_route(self, adapter: str | None, seconds: float) -> None:
        self.route_seconds.labels(adapter or "").observe(seconds)

    def observe_retrieval(self, adapter: str | None, seconds: float) -> None:
        self.retrieval_seconds.labels(adapter or "").observe(seconds)

    def observe_route_score(self, adapter: str | None, probability: float) -> None:
        self.route_score.labels(adapter or "").observe(probability)

    def observe_retrieval_scores(self, scores: Sequence[tuple[str, float]]) -> None:
        """``(collection, cosine)`` of each passage a query got back."""
        for collection, score in scores:
            self.retrieval_score.labels(collection).observe(score)
        if scores:
            collection, score = max(scores, key=lambda pair: pair[1])
            self.retrieval_top_score.labels(collection).observe(score)

    def count_error(self, error_type: str, code: str | None) -> None:
        self.errors.labels(error_type, code or "").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
