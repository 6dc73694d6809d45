"""The whole app at its concurrency cap and while draining: the excess is refused at once, what
was admitted completes, /ready tells load balancers to go elsewhere."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from service.settings import Settings
from tests.api.conftest import CHAT, assert_error, chat_body, make_settings, sse_json
from tests.api.test_models_health_metrics import metric, scrape
from tests.fakes import HOLD_S, FakeEngine
from tests.vllm_bodies import chunk, stream_chunks


@pytest.fixture
def settings() -> Settings:
    # The held streams stay open for as long as the test needs, even if a loaded machine pauses it.
    return make_settings(max_concurrent_requests=2, engine_read_timeout_s=HOLD_S)


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
