"""The gateway behind the real uvicorn server and :class:`GatewayHttpProtocol`, on a loopback
port, spoken to over raw sockets: what the ASGI client cannot send (malformed HTTP, a head that
never ends) is refused in OpenAI's envelope, and the server goes on serving.

A NUL in a header never reaches the app, so never reaches auth: the HTTP parser refuses it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.http_protocol import HEAD_ALLOWANCE, gateway_protocol
from service.settings import Settings
from tests.api.conftest import CHAT, assert_envelope, chat_body
from tests.fakes import FakeEngine

PIECE = 16 * 1024


@pytest.fixture
async def port(app: FastAPI, settings: Settings) -> AsyncIterator[int]:
    """The app (its lifespan already run by the ``app`` fixture) served by uvicorn as ``serve``
    runs it, in this test's event loop."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http=gateway_protocol(settings.max_header_bytes),
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    assert server.started, "uvicorn did not start"
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    await asyncio.wait_for(task, timeout=10)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout=5)
    return int(status_line.split()[1]), headers, body


async def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a new connection and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


def assert_refusal(
    response: tuple[int, dict[str, str], bytes], status: int, code: str | None
) -> dict[str, Any]:
    got, headers, body = response
    assert got == status, body
    assert headers["content-type"] == "application/json"
    return assert_envelope(json.loads(body), param=None, code=code, status=status)


async def assert_serving(port: int, engine: FakeEngine) -> None:
    """A normal chat request on a new connection is answered."""
    engine.enqueue_completion("Still here.")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        response = await client.post(CHAT, json=chat_body())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Still here."


# ---------------------------------------------------------------------------- oversized heads


async def test_a_1_mb_header_is_431_before_it_is_all_received(
    port: int, engine: FakeEngine, settings: Settings
) -> None:
    """The head is sent 16 KiB at a time, with a pause after each piece; the 431 arrives while
    nearly all of it is unsent: the server held at most its bound plus a read, never the MB."""
    head = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(read_response(reader))
    sent = 0
    try:
        for start in range(0, len(head), PIECE):
            writer.write(head[start : start + PIECE])
            await writer.drain()
            sent += PIECE
            await asyncio.wait({answer}, timeout=0.05)
            if answer.done():
                break
        error = assert_refusal(await answer, 431, "request_header_fields_too_large")
    finally:
        writer.close()
    assert sent <= settings.max_header_bytes + HEAD_ALLOWANCE + PIECE
    assert "request line and headers exceed" in error["message"]
    assert engine.requests == []
    await assert_serving(port, engine)


async def test_1000_headers_are_431(port: int, engine: FakeEngine) -> None:
    headers = b"".join(b"X-H-%04d: v\r\n" % i for i in range(1000))
    response = await exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n" + headers + b"\r\n")
    error = assert_refusal(response, 431, "request_header_fields_too_large")
    assert "1001 headers" in error["message"]
    assert engine.requests == []
    await assert_serving(port, engine)


async def test_heads_are_counted_per_request_on_a_keep_alive_connection(
    port: int, engine: FakeEngine
) -> None:
    """Twenty requests with 10 kB of headers each on one connection: each head is within the
    bound, though together they are far over it; and a 1 MB body is a body, not a head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(20):
            writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Pad: " + b"p" * 10_000 + b"\r\n\r\n")
            await writer.drain()
            status, _, body = await read_response(reader)
            assert status == 200, body
        engine.enqueue_completion()
        payload = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 1024 * 1024}])).encode()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(payload)
            + payload
        )
        await writer.drain()
        status, _, body = await read_response(reader)
        assert status == 200, body
    finally:
        writer.close()


# ---------------------------------------------------------------------------- malformed HTTP

MALFORMED = {
    "nul-in-authorization": b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n"
    b"Authorization: Bearer key\x00x\r\n\r\n",
    "newline-in-a-header": b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nX-A: a\rb\r\n\r\n",
    "garbage-request-line": b"HELLO THERE\r\n\r\n",
    "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32 + b"\r\n\r\n",
    "space-in-header-name": b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nX Bad: 1\r\n\r\n",
    "bad-chunk-size": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "content-length-and-chunked": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
    b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_http_is_a_400_envelope(port: int, engine: FakeEngine, raw: bytes) -> None:
    error = assert_refusal(await exchange(port, raw), 400, "invalid_http_request")
    assert "malformed" in error["message"]
    assert engine.chat_requests == []
    await assert_serving(port, engine)


@pytest.mark.parametrize("path", [b"//v1/models", b"/v1/%2e%2e/admin/adapters", b"/v1/models/"])
async def test_path_tricks_over_the_wire_are_404(port: int, engine: FakeEngine, path: bytes) -> None:
    response = await exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    _, headers, _ = response
    assert_refusal(response, 404, None)
    assert "location" not in headers
    assert engine.requests == []
    await assert_serving(port, engine)
