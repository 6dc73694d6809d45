"""The whole app at its concurrency cap and while draining: the excess is refused at once, what
was admitted completes, /ready tells load balancers to go elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.settings import Settings
from tests.api.conftest import CHAT, assert_error, chat_body, make_settings, sse_json
from tests.api.test_completions import CompletionsEngine, stream_chunk
from tests.api.test_models_health_metrics import metric, scrape
from tests.fakes import HOLD_S, FakeEngine
from tests.vllm_bodies import chunk, stream_chunks

COMPLETIONS = "/v1/completions"
# The other routes that count against HYBRID_MAX_CONCURRENT_REQUESTS, each with a valid body.
GENERATION_ROUTES: dict[str, dict[str, Any]] = {
    COMPLETIONS: {"model": "auto", "prompt": "Once upon a time", "max_tokens": 4},
    "/v1/responses": {"model": "auto", "input": "Say hello."},
    "/v1/embeddings": {"model": "", "input": "Say hello."},  # the embedder's name, set by `valid_body`
}


@pytest.fixture
def settings() -> Settings:
    # The held streams stay open for as long as the test needs, even if a loaded machine pauses it.
    return make_settings(max_concurrent_requests=2, engine_read_timeout_s=HOLD_S)


@pytest.fixture
async def engine() -> AsyncIterator[CompletionsEngine]:
    """The fake vLLM, answering (and holding) completion streams as well as chat ones."""
    engine = CompletionsEngine()
    await engine.start()
    yield engine
    await engine.stop()
    assert engine.pending == 0, f"{engine.pending} enqueued engine replies were never used"
    assert engine.unexpected == 0, "the engine got a request with no reply enqueued"


def valid_body(app: FastAPI, path: str) -> dict[str, Any]:
    if path == "/v1/embeddings":
        return {**GENERATION_ROUTES[path], "model": app.state.knowledge.embedder.name}
    return GENERATION_ROUTES[path]


async def _until_streams(engine: FakeEngine, count: int) -> None:
    async with asyncio.timeout(5):
        while len(engine.streams) < count:  # noqa: ASYNC110 (the fake records streams in a list)
            await asyncio.sleep(0.01)


def _release(engine: FakeEngine) -> None:
    """The engine drops every held stream: each admitted one ends and frees its slot."""
    for stream in engine.streams:
        assert stream.transport is not None
        stream.transport.close()


async def test_streams_over_the_cap_get_429_and_admitted_ones_complete(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    for _ in range(2):
        engine.enqueue_stream([chunk("", role="assistant"), chunk("Hi")], hold=True)

    async def hold_a_stream() -> list[str]:
        async with client.stream("POST", CHAT, json=chat_body(stream=True)) as response:
            assert response.status_code == 200
            return [line async for line in response.aiter_lines() if line.startswith("data:")]

    streams = [asyncio.create_task(hold_a_stream()) for _ in range(2)]
    async with asyncio.timeout(5):
        while len(engine.streams) < 2:  # noqa: ASYNC110 (the fake records streams in a list)
            await asyncio.sleep(0.01)

    refused = await client.post(CHAT, json=chat_body())
    assert_error(refused, 429, param=None, code="rate_limit_exceeded", error_type="requests")
    assert refused.headers["retry-after"] == "1"
    assert len(engine.chat_requests) == 2  # the refused request never reached the engine
    assert metric(await scrape(client), "hybrid_chat_completions_in_flight") == 2

    # The engine drops both connections: each admitted stream still ends properly (an error
    # event, then [DONE]), and the slots are free again.
    for stream in engine.streams:
        assert stream.transport is not None
        stream.transport.close()
    for lines in await asyncio.gather(*streams):
        assert lines[-1] == "data: [DONE]"
    engine.enqueue_stream(stream_chunks("Hello"))
    _, last = sse_json(await client.post(CHAT, json=chat_body(stream=True)))
    assert last == "[DONE]"
    assert metric(await scrape(client), "hybrid_chat_completions_in_flight") == 0


@pytest.mark.parametrize("path", GENERATION_ROUTES)
async def test_other_generation_routes_over_the_cap_get_the_same_429_as_chat(
    app: FastAPI, client: httpx.AsyncClient, engine: FakeEngine, path: str
) -> None:
    for _ in range(2):
        engine.enqueue_stream([chunk("", role="assistant"), chunk("Hi")], hold=True)

    async def hold_a_stream() -> int:
        async with client.stream("POST", CHAT, json=chat_body(stream=True)) as response:
            async for _ in response.aiter_lines():
                pass
            return response.status_code

    streams = [asyncio.create_task(hold_a_stream()) for _ in range(2)]
    await _until_streams(engine, 2)

    chat = await client.post(CHAT, json=chat_body())
    refused = await client.post(path, json=valid_body(app, path))
    assert_error(refused, 429, param=None, code="rate_limit_exceeded", error_type="requests")
    assert refused.json() == chat.json()
    assert refused.headers["retry-after"] == chat.headers["retry-after"] == "1"
    assert len(engine.requests) == 2  # neither refused request reached the engine

    _release(engine)
    assert await asyncio.gather(*streams) == [200, 200]
    assert metric(await scrape(client), "hybrid_chat_completions_in_flight") == 0


async def test_a_completion_stream_holds_a_slot_as_a_chat_stream_does(
    client: httpx.AsyncClient, engine: CompletionsEngine
) -> None:
    engine.enqueue_stream([chunk("", role="assistant"), chunk("Hi")], hold=True)
    engine.enqueue_stream([stream_chunk("Once")], hold=True)

    async def hold(path: str, body: dict[str, Any]) -> int:
        async with client.stream("POST", path, json=body) as response:
            async for _ in response.aiter_lines():
                pass
            return response.status_code

    chat_stream = asyncio.create_task(hold(CHAT, chat_body(stream=True)))
    await _until_streams(engine, 1)
    completion_stream = asyncio.create_task(
        hold(COMPLETIONS, {**GENERATION_ROUTES[COMPLETIONS], "stream": True})
    )
    await _until_streams(engine, 2)
    assert metric(await scrape(client), "hybrid_chat_completions_in_flight") == 2

    refused = await client.post(CHAT, json=chat_body())
    assert_error(refused, 429, param=None, code="rate_limit_exceeded", error_type="requests")
    assert len(engine.chat_requests) == 1

    _release(engine)
    assert list(await asyncio.gather(chat_stream, completion_stream)) == [200, 200]
    assert metric(await scrape(client), "hybrid_chat_completions_in_flight") == 0


async def test_draining_gateway_refuses_chat_and_is_not_ready(
    app: FastAPI, client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    assert metric(await scrape(client), "hybrid_draining") == 0
    app.state.admission.start_draining()
    assert metric(await scrape(client), "hybrid_draining") == 1
    assert_error(await client.post(CHAT, json=chat_body()), 503, param=None, code="shutting_down")
    ready = await client.get("/ready")
    assert_error(ready, 503, param=None, code="shutting_down")
    assert int(ready.headers["retry-after"]) > 0
    assert (await client.get("/health")).status_code == 200
    assert engine.chat_requests == []


@pytest.mark.parametrize("path", GENERATION_ROUTES)
async def test_draining_gateway_refuses_the_other_generation_routes(
    app: FastAPI, client: httpx.AsyncClient, engine: FakeEngine, path: str
) -> None:
    app.state.admission.start_draining()
    refused = await client.post(path, json=valid_body(app, path))
    assert_error(refused, 503, param=None, code="shutting_down")
    assert refused.headers["connection"] == "close"
    assert int(refused.headers["retry-after"]) > 0
    assert engine.requests == []
