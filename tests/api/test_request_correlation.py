"""Correlating a request across the gateway and the engine: its id reaches vLLM (which makes it
its own request id) and the gateway's log lines, the client's W3C trace context reaches vLLM,
and with tracing on the gateway's spans (in the SDK's in-memory exporter) sit between them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import request_context
from service.settings import Settings
from service.tracing import Tracing
from tests.api.admin_support import TOKEN
from tests.api.conftest import CHAT, assert_error, chat_body, make_settings, sse_json
from tests.api.test_admin_collections import REFUNDS, doc, ingested
from tests.fakes import Drop, FakeEngine
from tests.vllm_bodies import BASE_MODEL, stream_chunks

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
QUESTION = {"role": "user", "content": "How long does a refund take to reach my card?"}


@pytest.fixture
def settings() -> Settings:
    return make_settings(admin_token=TOKEN)


async def chat(
    client: httpx.AsyncClient, engine: FakeEngine, headers: dict[str, str], **fields: Any
) -> httpx.Response:
    if fields.get("stream"):
        engine.enqueue_stream(stream_chunks("Hi", "!"))
    else:
        engine.enqueue_completion()
    response = await client.post(CHAT, json=chat_body(**fields), headers=headers)
    assert response.status_code == 200, response.text
    if fields.get("stream"):
        _, last = sse_json(response)
        assert last == "[DONE]"
    return response


# ---------------------------------------------------------------------------- the request id


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_the_clients_request_id_reaches_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine, stream: bool
) -> None:
    response = await chat(client, engine, {"x-request-id": "client-id-1"}, stream=stream)
    assert response.headers["x-request-id"] == "client-id-1"
    assert engine.chat_requests[-1].headers["X-Request-Id"] == "client-id-1"


async def test_a_generated_request_id_reaches_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    response = await chat(client, engine, {})
    assert engine.chat_requests[-1].headers["X-Request-Id"] == response.headers["x-request-id"]


@pytest.mark.parametrize(
    "given",
    ["has space", "semi;colon", "x" * 129, "req\tid", "<script>"],
    ids=["space", "semicolon", "too-long", "tab", "markup"],
)
async def test_an_unfit_request_id_is_replaced_everywhere(
    client: httpx.AsyncClient, engine: FakeEngine, given: str
) -> None:
    response = await chat(client, engine, {"x-request-id": given})
    replaced = response.headers["x-request-id"]
    assert replaced != given
    assert request_context.accepted_request_id(replaced) == replaced
    assert engine.chat_requests[-1].headers["X-Request-Id"] == replaced


async def test_every_engine_call_of_a_request_carries_its_id(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    # With passages, the gateway asks the engine's /tokenize before it generates.
    await ingested(client, "handbook", doc("refunds.md", REFUNDS))
    engine.requests.clear()
    engine.enqueue_completion()
    response = await client.post(
        CHAT, json=chat_body(messages=[QUESTION], rag="on"), headers={"x-request-id": "rag-1"}
    )
    assert response.status_code == 200, response.text
    paths = [request.path for request in engine.requests]
    assert "/tokenize" in paths, paths
    assert {request.headers.get("X-Request-Id") for request in engine.requests} == {"rag-1"}


@pytest.mark.parametrize(
    ("path", "status"),
    [("/nope", 404), (CHAT, 400)],
    ids=["404", "400"],
)
async def test_errors_carry_the_request_id(client: httpx.AsyncClient, path: str, status: int) -> None:
    response = await client.post(path, json=chat_body(n=0), headers={"x-request-id": "err-1"})
    assert response.status_code == status
    assert response.headers["x-request-id"] == "err-1"


async def test_an_engine_failure_carries_the_request_id_and_logs_it(
    client: httpx.AsyncClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(request_context.RequestIdFilter())
    engine.enqueue_raise(Drop())
    with caplog.at_level(logging.INFO):
        response = await client.post(CHAT, json=chat_body(), headers={"x-request-id": "down-1"})
    assert_error(response, 503, param=None, code="engine_unavailable")
    assert response.headers["x-request-id"] == "down-1"
    assert engine.chat_requests[-1].headers["X-Request-Id"] == "down-1"
    ours = [record for record in caplog.records if record.name.startswith("service.")]
    assert {record.request_id for record in ours} == {"down-1"}  # type: ignore[attr-defined]
    shown = request_context.RequestIdFormatter(logging.Formatter("%(message)s"))
    lines = [shown.format(record) for record in ours]
    assert any(line.startswith("[down-1] route ") for line in lines), lines
    assert any(line.startswith("[down-1] POST /v1/chat/completions -> 503") for line in lines), lines


# ---------------------------------------------------------------------------- trace context, tracing off


async def test_the_clients_trace_context_reaches_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    await chat(client, engine, {"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"})
    headers = engine.chat_requests[-1].headers
    assert headers["traceparent"] == TRACEPARENT
    assert headers["tracestate"] == "congo=t61rcWkgMzE"


@pytest.mark.parametrize(
    "sent",
    [{"traceparent": "00-not-a-trace-01", "tracestate": "a=1"}, {"tracestate": "a=1"}, {}],
    ids=["invalid", "tracestate-alone", "none"],
)
async def test_no_trace_context_is_made_up_or_passed_on_invalid(
    client: httpx.AsyncClient, engine: FakeEngine, sent: dict[str, str]
) -> None:
    await chat(client, engine, sent)
    headers = engine.chat_requests[-1].headers
    assert "traceparent" not in headers
    assert "tracestate" not in headers


# ---------------------------------------------------------------------------- tracing on


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory: what ``build_app`` gets instead of the OTLP environment."""
    exporter = InMemorySpanExporter()
    tracing = Tracing.with_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(Tracing, "from_environment", classmethod(lambda cls, environ=None: tracing))
    yield exporter
    tracing.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    finished = exporter.get_finished_spans()
    named = {span.name: span for span in finished}
    assert len(named) == len(finished), [span.name for span in finished]
    return named


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


class TestTracing:
    @pytest.fixture(autouse=True)
    def _tracing_first(self, spans: InMemorySpanExporter) -> None:
        """Autouse: the exporter is in place before the app fixture builds the app."""

    @pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
    async def test_the_spans_of_a_chat_nest_under_the_clients_trace(
        self, client: httpx.AsyncClient, engine: FakeEngine, spans: InMemorySpanExporter, stream: bool
    ) -> None:
        await ingested(client, "handbook", doc("refunds.md", REFUNDS))
        spans.clear()
        await chat(client, engine, {"traceparent": TRACEPARENT, "x-request-id": "t-1"}, stream=stream)
        named = by_name(spans)
        server = named["POST /v1/chat/completions"]
        route, retrieve, upstream = named["route"], named["retrieve"], named["engine.chat"]

        assert server.kind == trace.SpanKind.SERVER
        assert {f"{span.get_span_context().trace_id:032x}" for span in named.values()} == {TRACE_ID}  # type: ignore[union-attr]
        assert parent_of(server) == int(CLIENT_SPAN, 16)
        assert parent_of(route) == span_id(server)
        assert parent_of(retrieve) == span_id(route)
        assert parent_of(upstream) == span_id(server)
        assert server.attributes is not None
        assert server.attributes["hybrid.request_id"] == "t-1"
        assert server.attributes["http.response.status_code"] == 200
        assert server.attributes["http.route"] == CHAT

        assert route.attributes is not None
        assert route.attributes["hybrid.route.adapter"] == ""
        assert route.attributes["hybrid.rag_mode"] == "auto"
        assert isinstance(route.attributes["hybrid.route.rag"], bool)
        assert isinstance(route.attributes["hybrid.route.retrieval_score"], float)
        assert retrieve.attributes is not None
        assert retrieve.attributes["hybrid.passages"] == 1

        assert upstream.kind == trace.SpanKind.CLIENT
        assert upstream.attributes is not None
        assert upstream.attributes["gen_ai.request.model"] == BASE_MODEL
        assert upstream.attributes["hybrid.stream"] is stream
        # vLLM's spans will be children of the gateway's call to it.
        sent = engine.chat_requests[-1].headers["traceparent"]
        assert sent.startswith(f"00-{TRACE_ID}-{span_id(upstream):016x}-")
        assert engine.chat_requests[-1].headers["X-Request-Id"] == "t-1"
        # A stream's engine span lasts to the stream's end, within the request's.
        assert upstream.end_time is not None
        assert server.end_time is not None
        assert upstream.end_time <= server.end_time

    async def test_without_a_client_trace_the_gateway_starts_one(
        self, client: httpx.AsyncClient, engine: FakeEngine, spans: InMemorySpanExporter
    ) -> None:
        await chat(client, engine, {})
        named = by_name(spans)
        server = named["POST /v1/chat/completions"]
        assert server.parent is None
        trace_id = server.get_span_context().trace_id  # type: ignore[union-attr]
        assert engine.chat_requests[-1].headers["traceparent"].startswith(f"00-{trace_id:032x}-")

    async def test_an_engine_failure_marks_the_spans(
        self, client: httpx.AsyncClient, engine: FakeEngine, spans: InMemorySpanExporter
    ) -> None:
        engine.enqueue_raise(Drop())
        response = await client.post(CHAT, json=chat_body())
        assert response.status_code == 503
        named = by_name(spans)
        assert named["engine.chat"].status.status_code == trace.StatusCode.ERROR
        server = named["POST /v1/chat/completions"]
        assert server.attributes is not None
        assert server.attributes["http.response.status_code"] == 503
        assert server.status.status_code == trace.StatusCode.ERROR

    async def test_a_stream_the_client_leaves_ends_its_engine_span(
        self, client: httpx.AsyncClient, engine: FakeEngine, spans: InMemorySpanExporter
    ) -> None:
        engine.enqueue_stream(stream_chunks(*["word "] * 50))
        async with client.stream("POST", CHAT, json=chat_body(stream=True)) as response:
            assert response.status_code == 200
            async for _ in response.aiter_lines():
                break
        named = by_name(spans)
        assert "engine.chat" in named

    async def test_unknown_paths_share_one_span_name(
        self, client: httpx.AsyncClient, spans: InMemorySpanExporter
    ) -> None:
        await client.get("/no/such/path")
        await client.get("/health")
        names = sorted(span.name for span in spans.get_finished_spans())
        assert names == ["GET", "GET /health"]
