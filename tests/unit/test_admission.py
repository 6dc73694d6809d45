"""Admission control on a bare ASGI app: the concurrency cap, the drain, and slots freed however
a request ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from service.admission import Admission, AdmissionControl
from service.metrics import Metrics

CHAT = "/v1/chat/completions"
OTHER_GENERATION = ["/v1/completions", "/v1/responses", "/v1/embeddings"]


class GatedApp:
    """Answers 200 once ``release`` is set; counts the requests that reached it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0
        self.fail = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.entered += 1
        if self.fail:
            raise RuntimeError("the app failed")
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def inner() -> GatedApp:
    return GatedApp()


@pytest.fixture
def admission() -> Admission:
    return Admission(2, retry_after_s=7)


@pytest.fixture
async def client(inner: GatedApp, admission: Admission) -> AsyncIterator[httpx.AsyncClient]:
    app = AdmissionControl(inner, admission, Metrics())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        yield client


async def _until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Poll ``condition``: what it reads is plain counters, which no event signals."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_over_the_cap_is_429_at_once_and_admitted_ones_complete(
    client: httpx.AsyncClient, inner: GatedApp, admission: Admission
) -> None:
    admitted = [asyncio.create_task(client.post(CHAT, content=b"{}")) for _ in range(2)]
    await _until(lambda: inner.entered == 2)
    refused = await client.post(CHAT, content=b"{}")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == {
        "message": refused.json()["error"]["message"],
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert "HYBRID_MAX_CONCURRENT_REQUESTS" in refused.json()["error"]["message"]
    assert inner.entered == 2  # the refused one never reached the app
    inner.release.set()
    assert [r.status_code for r in await asyncio.gather(*admitted)] == [200, 200]
    assert (admission.in_flight, admission.generating) == (0, 0)
    assert (await client.post(CHAT, content=b"{}")).status_code == 200


async def test_the_cap_counts_generation_only(client: httpx.AsyncClient, inner: GatedApp) -> None:
    busy = [asyncio.create_task(client.post(CHAT)) for _ in range(2)]
    await _until(lambda: inner.entered == 2)
    other = asyncio.create_task(client.get("/v1/models"))
    await _until(lambda: inner.entered == 3)
    inner.release.set()
    assert (await other).status_code == 200
    await asyncio.gather(*busy)


@pytest.mark.parametrize("path", OTHER_GENERATION)
async def test_every_generation_route_shares_the_cap_with_chat(
    client: httpx.AsyncClient, inner: GatedApp, admission: Admission, path: str
) -> None:
    busy = [asyncio.create_task(client.post(path, content=b"{}")), asyncio.create_task(client.post(CHAT))]
    await _until(lambda: inner.entered == 2)
    assert admission.generating == 2
    for refused_path in (CHAT, path):
        refused = await client.post(refused_path, content=b"{}")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert inner.entered == 2
    inner.release.set()
    assert [r.status_code for r in await asyncio.gather(*busy)] == [200, 200]
    assert (admission.in_flight, admission.generating) == (0, 0)


async def test_a_failing_request_frees_its_slot(
    client: httpx.AsyncClient, inner: GatedApp, admission: Admission
) -> None:
    inner.fail = True
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await client.post(CHAT)
    assert (admission.in_flight, admission.generating) == (0, 0)


async def test_a_client_that_leaves_frees_its_slot(
    client: httpx.AsyncClient, inner: GatedApp, admission: Admission
) -> None:
    task = asyncio.create_task(client.post(CHAT))
    await _until(lambda: admission.generating == 1)
    task.cancel()
    await _until(lambda: admission.generating == 0)
    assert admission.in_flight == 0


async def test_draining_refuses_new_requests_but_not_probes(
    client: httpx.AsyncClient, inner: GatedApp, admission: Admission
) -> None:
    in_flight = asyncio.create_task(client.post(CHAT))
    await _until(lambda: inner.entered == 1)
    admission.start_draining()
    for method, path in [
        ("POST", CHAT),
        *[("POST", other) for other in OTHER_GENERATION],
        ("GET", "/v1/models"),
        ("GET", "/admin/adapters"),
    ]:
        refused = await client.request(method, path)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "7"
        assert refused.headers["connection"] == "close"
        assert refused.json()["error"]["code"] == "shutting_down"
    assert inner.entered == 1
    inner.release.set()
    for probe in ("/health", "/ready", "/metrics"):
        assert (await client.get(probe)).status_code == 200
    assert (await in_flight).status_code == 200  # what was admitted before the drain finishes
