"""The API tier: the real app over ASGI, its lifespan run, the engine a scripted fake.

A test that needs other limits overrides the ``settings`` fixture (or parametrizes it
indirectly); everything else is built from it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.app import build_app
from service.settings import Settings
from tests.fakes import FakeEngine

ENGINE_URL = "http://engine.test"
GATEWAY_URL = "http://gateway.test"
CHAT = "/v1/chat/completions"
USER = {"role": "user", "content": "Say hello."}


def make_settings(**overrides: Any) -> Settings:
    """Settings for a gateway in front of the fake engine (never a supervised local one); the
    ``app`` fixture points ``engine_url`` at the fake's port. The read timeout is short so that
    a stalled engine shows quickly."""
    return Settings(engine_url=ENGINE_URL, **{"engine_read_timeout_s": 0.5, **overrides})


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    engine = FakeEngine()
    await engine.start()
    yield engine
    await engine.stop()
    # A scripted reply nobody asked for (or one missing) means the test did not exercise
    # what it meant to.
    assert engine.pending == 0, f"{engine.pending} enqueued engine replies were never used"
    assert engine.unexpected == 0, "the engine got a chat request with no reply enqueued"


@pytest.fixture
async def app(settings: Settings, engine: FakeEngine, tmp_path: Path) -> AsyncIterator[FastAPI]:
    app = build_app(settings.model_copy(update={"engine_url": engine.url, "data_dir": tmp_path}))
    async with app.router.lifespan_context(app):
        # The gateway reconciles an external engine's adapters in the background on start:
        # let that finish, so each test sees only the engine traffic it causes.
        await asyncio.wait_for(app.state.adapters.wait_reconciled(), timeout=5)
        engine.requests.clear()
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=GATEWAY_URL) as client:
        yield client


def chat_body(**fields: Any) -> dict[str, Any]:
    """A valid chat request, with ``fields`` added or replaced."""
    return {"model": "auto", "messages": [USER], **fields}


async def assert_still_serving(
    client: httpx.AsyncClient, engine: FakeEngine, headers: dict[str, str] | None = None
) -> None:
    """A valid chat request is still answered: whatever came before harmed nothing."""
    engine.enqueue_completion("Still here.")
    response = await client.post(CHAT, json=chat_body(), headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Still here."


def assert_error(
    response: httpx.Response,
    status: int,
    *,
    param: str | None,
    code: str | None = None,
    error_type: str | None = None,
) -> dict[str, Any]:
    """The response is ``status`` with exactly OpenAI's envelope; returns the inner error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return assert_envelope(response.json(), param=param, code=code, status=status, error_type=error_type)


def assert_envelope(
    body: Any, *, param: str | None, code: str | None, status: int, error_type: str | None = None
) -> dict[str, Any]:
    """``error_type`` defaults to the type of most statuses: invalid_request_error below 500."""
    assert isinstance(body, dict)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    expected_type = error_type or ("invalid_request_error" if status < 500 else "server_error")
    assert error["type"] == expected_type, error
    assert error["param"] == param, error
    assert error["code"] == code, error
    return error


def sse_data(response: httpx.Response) -> list[str]:
    """The ``data`` payloads of an SSE body, in order (events split on blank lines)."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    payloads: list[str] = []
    for event in response.text.replace("\r\n", "\n").split("\n\n"):
        lines = [line[5:].removeprefix(" ") for line in event.split("\n") if line.startswith("data:")]
        if lines:
            payloads.append("\n".join(lines))
    return payloads


def sse_json(response: httpx.Response) -> tuple[list[dict[str, Any]], str]:
    """The JSON payloads of an SSE body and its last payload (which should be ``[DONE]``)."""
    payloads = sse_data(response)
    assert payloads, "empty SSE body"
    *events, last = payloads
    return [json.loads(p) for p in events], last
