"""The surface around chat: the model list, liveness and readiness, Prometheus metrics, and what
every response carries (the error envelope for unknown routes, an ``X-Request-Id``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from tests.api.conftest import CHAT, GATEWAY_URL, assert_error, chat_body, make_settings
from tests.fakes import Drop, FakeEngine, Stall
from tests.openai_schema import assert_conforms
from tests.vllm_bodies import BASE_MODEL, MAX_MODEL_LEN, model_card, stream_chunks


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                value: float = sample.value
                return value
    return 0.0


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


# ---------------------------------------------------------------------------- /v1/models


async def test_models_conform_and_list_the_base_and_auto(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert_conforms("ListModelsResponse", body)
    ids = [card["id"] for card in body["data"]]
    assert ids == [BASE_MODEL, "auto"]
    base, auto = body["data"]
    assert base["max_model_len"] == MAX_MODEL_LEN
    assert "permission" not in base
    assert "parent" not in base
    assert auto["owned_by"] == "hybrid-serve"
    # vLLM's `root` is a path on the engine's disk: not the clients' business.
    assert "root" not in base
    assert "root" not in auto


async def test_models_lists_what_a_request_may_name_not_the_engines_other_adapters(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    # An adapter the engine holds but the gateway never registered cannot be requested, so it
    # is not listed (registered adapters are: see test_admin_adapters).
    engine.models = [model_card(), model_card("pirate-lora", parent=BASE_MODEL)]
    response = await client.get("/v1/models")
    assert [card["id"] for card in response.json()["data"]] == [BASE_MODEL, "auto"]
    assert_conforms("ListModelsResponse", response.json())
    engine.enqueue_completion()
    assert (await client.post(CHAT, json=chat_body())).status_code == 200
    assert engine.last_chat_body["model"] == BASE_MODEL


async def test_models_with_the_engine_down_is_503(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.models_error = Drop()
    response = await client.get("/v1/models")
    assert_error(response, 503, param=None, code="engine_unavailable")
    assert "retry-after" in response.headers


# ---------------------------------------------------------------------------- /health, /ready


async def test_health_is_200_even_with_the_engine_down(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.models_error = Drop()
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert engine.requests == []


async def test_ready_is_200_when_the_engine_serves_its_model(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "model": BASE_MODEL, "models": 1}


@pytest.mark.parametrize(
    "error",
    [Drop(), Stall()],
    ids=["connect", "timeout"],
)
async def test_ready_is_503_with_retry_after_when_the_engine_fails(
    client: httpx.AsyncClient, engine: FakeEngine, settings: Settings, error: Drop | Stall
) -> None:
    engine.models_error = error
    response = await client.get("/ready")
    assert_error(response, 503, param=None, code="engine_unavailable")
    assert response.headers["retry-after"] == str(settings.retry_after_s)


async def test_ready_is_503_while_the_engine_serves_no_model(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.models = []
    response = await client.get("/ready")
    assert_error(response, 503, param=None, code="engine_unavailable")
    assert "retry-after" in response.headers


async def test_ready_recovers_when_the_engine_comes_back(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.models_error = Drop()
    assert (await client.get("/ready")).status_code == 503
    engine.models_error = None
    assert (await client.get("/ready")).status_code == 200


# ---------------------------------------------------------------------------- /metrics


async def test_metrics_count_requests_by_route_and_status(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_completion()
    await client.post(CHAT, json=chat_body())
    await client.post(CHAT, json=chat_body(n=99))
    await client.get("/health")
    await client.get("/no/such/route")
    text = await scrape(client)
    assert metric(text, "hybrid_requests_total", route=CHAT, method="POST", status="200") == 1
    assert metric(text, "hybrid_requests_total", route=CHAT, method="POST", status="400") == 1
    assert metric(text, "hybrid_requests_total", route="/health", method="GET", status="200") == 1
    # Unknown paths share one label, so a scanner cannot blow up the series count.
    assert metric(text, "hybrid_requests_total", route="other", method="GET", status="404") == 1
    assert metric(text, "hybrid_request_duration_seconds_count", route=CHAT) == 2


async def test_metrics_count_tokens_of_a_completion(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    assert metric(await scrape(client), "hybrid_tokens_total", kind="prompt") == 0
    engine.enqueue_completion(prompt_tokens=21, completion_tokens=8)
    await client.post(CHAT, json=chat_body())
    text = await scrape(client)
    assert metric(text, "hybrid_tokens_total", kind="prompt", model=BASE_MODEL) == 21
    assert metric(text, "hybrid_tokens_total", kind="completion", model=BASE_MODEL) == 8


@pytest.mark.parametrize("include_usage", [False, True])
async def test_metrics_count_tokens_of_a_stream(
    client: httpx.AsyncClient, engine: FakeEngine, include_usage: bool
) -> None:
    engine.enqueue_stream(stream_chunks("a", "b", "c"))
    fields = {"stream_options": {"include_usage": True}} if include_usage else {}
    await client.post(CHAT, json=chat_body(stream=True, **fields))
    text = await scrape(client)
    assert metric(text, "hybrid_tokens_total", kind="prompt", model=BASE_MODEL) == 12
    assert metric(text, "hybrid_tokens_total", kind="completion", model=BASE_MODEL) == 3


async def test_metrics_count_errors_by_type_and_code(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post(CHAT, json=chat_body(temperature=9))
    await client.post(CHAT, json=chat_body(model="nope"))
    engine.enqueue_raise(Drop())
    await client.post(CHAT, json=chat_body())
    text = await scrape(client)
    assert metric(text, "hybrid_errors_total", type="invalid_request_error", code="") == 1
    assert metric(text, "hybrid_errors_total", type="invalid_request_error", code="model_not_found") == 1
    assert metric(text, "hybrid_errors_total", type="server_error", code="engine_unavailable") == 1


async def test_metrics_count_mid_stream_errors(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_stream(stream_chunks("a", with_usage=False), fail_with=Stall())
    response = await client.post(CHAT, json=chat_body(stream=True))
    assert response.status_code == 200
    text = await scrape(client)
    assert metric(text, "hybrid_errors_total", type="server_error", code="engine_timeout") == 1


async def test_metrics_time_the_routers_decision_and_the_index_query(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_completion()
    await client.post(CHAT, json=chat_body())
    engine.enqueue_completion()
    await client.post(CHAT, json=chat_body(rag="off"))  # decided, but no index query
    text = await scrape(client)
    # Filed under the adapter decided: none here, so the base model's empty label.
    assert metric(text, "hybrid_route_seconds_count", adapter="") == 2
    assert metric(text, "hybrid_retrieval_seconds_count", adapter="") == 1
    assert (
        0
        < metric(text, "hybrid_retrieval_seconds_sum", adapter="")
        <= metric(text, "hybrid_route_seconds_sum", adapter="")
    )


async def test_metrics_list_the_stream_latency_histograms(client: httpx.AsyncClient) -> None:
    families = {family.name for family in text_string_to_metric_families(await scrape(client))}
    assert {"hybrid_time_to_first_token_seconds", "hybrid_inter_token_seconds"} <= families


async def test_metrics_time_a_streams_first_token_and_the_gaps_between_tokens(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_stream(stream_chunks("a", "b", "c"))
    await client.post(CHAT, json=chat_body(stream=True))
    engine.enqueue_completion()
    await client.post(CHAT, json=chat_body())  # not streamed: no first token of its own
    text = await scrape(client)
    labels = {"model": BASE_MODEL, "adapter": ""}
    assert metric(text, "hybrid_time_to_first_token_seconds_count", **labels) == 1
    assert metric(text, "hybrid_inter_token_seconds_count", **labels) == 2


class TestBodyLimitIsObserved:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(max_body_bytes=1024)

    @pytest.fixture
    def too_large(self) -> bytes:
        return json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 2000}])).encode()

    async def test_413_is_counted_as_a_request(self, client: httpx.AsyncClient, too_large: bytes) -> None:
        response = await client.post(CHAT, content=too_large, headers={"content-type": "application/json"})
        assert response.status_code == 413
        text = await scrape(client)
        assert metric(text, "hybrid_requests_total", route=CHAT, method="POST", status="413") == 1

    async def test_413_is_counted_as_an_error(self, client: httpx.AsyncClient, too_large: bytes) -> None:
        response = await client.post(CHAT, content=too_large, headers={"content-type": "application/json"})
        assert response.status_code == 413
        text = await scrape(client)
        assert metric(text, "hybrid_errors_total", type="invalid_request_error", code="") == 1

    async def test_chunked_413_is_counted(self, client: httpx.AsyncClient, too_large: bytes) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield too_large

        response = await client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert "x-request-id" in response.headers
        text = await scrape(client)
        assert metric(text, "hybrid_requests_total", route=CHAT, method="POST", status="413") == 1
        assert metric(text, "hybrid_errors_total", type="invalid_request_error", code="") == 1

    async def test_413_carries_a_request_id(self, client: httpx.AsyncClient, too_large: bytes) -> None:
        response = await client.post(
            CHAT, content=too_large, headers={"content-type": "application/json", "x-request-id": "req-413"}
        )
        assert response.status_code == 413
        assert response.headers.get("x-request-id") == "req-413"


# ---------------------------------------------------------------------------- routes, request ids


async def test_unknown_route_is_404_envelope(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/completions/nope")
    error = assert_error(response, 404, param=None)
    assert "/v1/completions/nope" in error["message"]


async def test_health_answers_head_for_load_balancers(client: httpx.AsyncClient) -> None:
    response = await client.head("/health")
    assert response.status_code == 200
    assert response.content == b""


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", CHAT, "POST"),
        ("PUT", CHAT, "POST"),
        ("POST", "/v1/models", "GET"),
        ("DELETE", "/health", "GET, HEAD"),
    ],
)
async def test_wrong_method_is_405_envelope(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    response = await client.request(method, path)
    assert_error(response, 405, param=None)
    assert set(response.headers["allow"].split(", ")) == set(allow.split(", "))


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/health", None),
        ("GET", "/ready", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/models", None),
        ("GET", "/nope", None),
        ("GET", CHAT, None),
        ("POST", CHAT, chat_body()),
        ("POST", CHAT, chat_body(stream=True)),
        ("POST", CHAT, chat_body(n=0)),
        ("POST", CHAT, chat_body(model="nope")),
    ],
    ids=["health", "ready", "metrics", "models", "404", "405", "chat", "stream", "400", "model-404"],
)
async def test_every_response_has_a_request_id_echoing_the_clients(
    client: httpx.AsyncClient, engine: FakeEngine, method: str, path: str, body: dict[str, Any] | None
) -> None:
    def script_engine() -> None:
        if body == chat_body():
            engine.enqueue_completion()
        elif body == chat_body(stream=True):
            engine.enqueue_stream(stream_chunks("Hi"))

    script_engine()
    generated = await client.request(method, path, json=body)
    assert len(generated.headers["x-request-id"]) >= 16
    script_engine()
    echoed = await client.request(method, path, json=body, headers={"x-request-id": "client-id-1"})
    assert echoed.headers["x-request-id"] == "client-id-1"
    assert echoed.status_code == generated.status_code


async def test_request_ids_are_unique(client: httpx.AsyncClient) -> None:
    ids = {(await client.get("/health")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


async def test_an_overlong_request_id_is_replaced(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", headers={"x-request-id": "a" * 200})
    assert response.headers["x-request-id"] != "a" * 200
    assert 0 < len(response.headers["x-request-id"]) <= 128


async def test_a_non_ascii_request_id_is_echoed_intact_or_replaced(client: httpx.AsyncClient) -> None:
    sent = "req-é".encode("latin-1")
    response = await client.get("/health", headers={b"x-request-id": sent})
    echoed = dict(response.headers.raw)[b"x-request-id"]
    # Either the client's bytes back, or a fresh ASCII id: never a re-encoded variant of them.
    assert echoed == sent or echoed.isascii(), echoed


async def test_unexpected_error_is_500_envelope_with_request_id(app: FastAPI) -> None:
    # A bug in a route (here one added to raise what nobody expects) still answers in the
    # envelope, without leaking its text, and the response can be traced.
    async def broken() -> None:
        raise RuntimeError("bug")

    app.add_api_route("/broken", broken)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=GATEWAY_URL) as client:
        response = await client.get("/broken", headers={"x-request-id": "req-500"})
    error = assert_error(response, 500, param=None)
    assert "bug" not in error["message"]
    assert response.headers.get("x-request-id") == "req-500"
