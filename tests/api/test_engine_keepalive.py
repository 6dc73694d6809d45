"""The gateway's pool never sends a request on a connection the engine may be closing: vLLM
(uvicorn) closes a connection idle for 5 s, and aiohttp's pool would reuse one for 15 s. When the
gateway's loop is busy, the engine's close is not yet seen when the next request takes the
connection, and that request failed with a 503 the client had done nothing to cause."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from service.engine import VLLMEngine, engine_session
from service.errors import EngineUnavailableError
from tests.api.conftest import chat_body
from tests.vllm_bodies import completion

ENGINE_IDLE_TIMEOUT_S = 0.5


@dataclass
class IdleClosingEngine:
    url: str
    client_ports: list[int]
    """The client's port of each request: one port, one connection."""


@pytest.fixture
def engine() -> Iterator[IdleClosingEngine]:
    """A server that closes connections idle for ``ENGINE_IDLE_TIMEOUT_S``, as vLLM does after
    5 s. It runs on its own loop in a thread, so that it goes on while the test's loop is busy."""
    client_ports: list[int] = []

    async def chat(request: web.Request) -> web.Response:
        assert request.transport is not None
        client_ports.append(request.transport.get_extra_info("peername")[1])
        return web.json_response(completion())

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, keepalive_timeout=ENGINE_IDLE_TIMEOUT_S)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    yield IdleClosingEngine(f"http://127.0.0.1:{port}", client_ports)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


async def _chat_after_a_busy_pause(url: str, keepalive_s: float) -> None:
    """Two chat requests (POST, which aiohttp never retries by itself), the loop busy between."""
    async with engine_session(
        connect_timeout_s=2, read_timeout_s=5, max_connections=4, keepalive_s=keepalive_s
    ) as session:
        engine = VLLMEngine(session, url, retry_after_s=1)
        await engine.chat(chat_body())
        # The loop is busy (blocked here) past the server's idle timeout: the server closes the
        # pooled connection, and the gateway has not processed that yet when it sends again.
        time.sleep(3 * ENGINE_IDLE_TIMEOUT_S)  # noqa: ASYNC251 (blocking is the point)
        await engine.chat(chat_body())


async def test_a_connection_idle_past_the_keepalive_is_not_reused(engine: IdleClosingEngine) -> None:
    await _chat_after_a_busy_pause(engine.url, keepalive_s=ENGINE_IDLE_TIMEOUT_S - 0.1)
    assert len(set(engine.client_ports)) == 2


async def test_reusing_it_past_the_engines_idle_timeout_fails(engine: IdleClosingEngine) -> None:
    # Why the setting exists: aiohttp's default (15 s) outlives vLLM's 5 s.
    with pytest.raises(EngineUnavailableError, match="ServerDisconnectedError"):
        await _chat_after_a_busy_pause(engine.url, keepalive_s=15)


async def test_a_recently_used_connection_is_reused(engine: IdleClosingEngine) -> None:
    async with engine_session(
        connect_timeout_s=2, read_timeout_s=5, max_connections=4, keepalive_s=4
    ) as session:
        vllm = VLLMEngine(session, engine.url, retry_after_s=1)
        for _ in range(3):
            await vllm.chat(chat_body())
            await asyncio.sleep(0.05)
    assert len(engine.client_ports) == 3
    assert len(set(engine.client_ports)) == 1
