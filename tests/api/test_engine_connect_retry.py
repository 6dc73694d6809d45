"""A request whose connection to the engine could not be opened is sent once more: nothing
reached the engine, so nothing is done twice. One that reached it is never sent again."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from service.engine import VLLMEngine, engine_session
from service.errors import EngineUnavailableError
from tests.api.conftest import CHAT, assert_error, chat_body
from tests.fakes import Drop, FakeEngine
from tests.vllm_bodies import completion, stream_chunks

RETRYING = "no connection to the engine"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with engine_session(connect_timeout_s=5, read_timeout_s=5, max_connections=4, keepalive_s=4) as s:
        yield s


@pytest.fixture
def closed_port() -> Iterator[socket.socket]:
    """A bound socket that does not listen yet: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


async def _chat(engine: VLLMEngine) -> Any:
    return await engine.chat(chat_body())


async def _stream(engine: VLLMEngine) -> Any:
    stream = await engine.open_chat_stream(chat_body(stream=True))
    try:
        return [data async for data in stream.data()]
    finally:
        await stream.aclose()


@pytest.mark.parametrize("call", [_chat, _stream], ids=["plain", "stream"])
async def test_a_refused_connection_is_tried_once_more(
    session: aiohttp.ClientSession,
    closed_port: socket.socket,
    caplog: pytest.LogCaptureFixture,
    call: Callable[[VLLMEngine], Coroutine[Any, Any, Any]],
) -> None:
    received: list[str] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        received.append(request.path)
        if (await request.json()).get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for data in [*map(json.dumps, stream_chunks("Hi")), "[DONE]"]:
                await response.write(f"data: {data}\n\n".encode())
            return response
        return web.json_response(completion())

    app = web.Application()
    app.router.add_post(CHAT, chat)
    runner = web.AppRunner(app)
    await runner.setup()
    engine = VLLMEngine(session, f"http://127.0.0.1:{closed_port.getsockname()[1]}", retry_after_s=1)
    with caplog.at_level(logging.INFO, logger="service.engine"):
        answer = asyncio.create_task(call(engine))
        # The first connection is refused; listen before the second (a quarter second later).
        async with asyncio.timeout(5):
            while not any(RETRYING in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
                await asyncio.sleep(0)
        closed_port.listen()
        await web.SockSite(runner, closed_port).start()
        try:
            assert await answer
        finally:
            await runner.cleanup()
    assert received == [CHAT]


async def test_refused_twice_is_503(
    session: aiohttp.ClientSession, closed_port: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    engine = VLLMEngine(session, f"http://127.0.0.1:{closed_port.getsockname()[1]}", retry_after_s=1)
    with caplog.at_level(logging.INFO, logger="service.engine"), pytest.raises(EngineUnavailableError):
        await engine.chat(chat_body())
    assert len([r for r in caplog.records if RETRYING in r.getMessage()]) == 1


async def test_a_request_the_engine_received_is_not_sent_again(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    # The engine cut the connection after reading the request: it may be generating already.
    engine.enqueue_raise(Drop())
    assert_error(await client.post(CHAT, json=chat_body()), 503, param=None, code="engine_unavailable")
    assert len(engine.chat_requests) == 1
