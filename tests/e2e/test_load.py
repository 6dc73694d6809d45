"""Many clients that walk away: 200 concurrent streams abandoned at once must all be aborted in
vLLM, and after 800 more (1,000 disconnects in all) the gateway holds no more connections or
file descriptors than it did after the first burst (loopback only, bounded in time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter

import httpx
import psutil
import pytest

from tests.harness import ENDLESS, RunningService

pytestmark = pytest.mark.e2e

CONCURRENT = 200
DISCONNECTS = 1000
WAVE = 100
MAX_TOKENS = 1000
STREAM = {
    "messages": ENDLESS,
    "max_tokens": MAX_TOKENS,
    "temperature": 0,
    "stream": True,
}


def _held(process: psutil.Process) -> tuple[Counter[str], int, int]:
    """What the gateway's open descriptors point at, its TCP connections and its threads."""
    targets: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{process.pid}/fd"):
        with contextlib.suppress(OSError):  # closed while listed
            target = os.readlink(f"/proc/{process.pid}/fd/{fd}")
            # Sockets and pipes by kind: their inode numbers change with every connection.
            targets[target.split(":[", 1)[0]] += 1
    return targets, len(process.net_connections(kind="tcp")), process.num_threads()


def _grown(now: tuple[Counter[str], int, int], baseline: tuple[Counter[str], int, int]) -> Counter[str]:
    """Descriptors held now beyond ``baseline``. chromadb keeps one SQLite connection per thread
    that reads the embedded index, so a thread the (bounded) pools added since may hold one."""
    grown = now[0] - baseline[0]
    new_threads = max(0, now[2] - baseline[2])
    for target in [t for t in grown if t.endswith("chroma.sqlite3")]:
        grown[target] = max(0, grown[target] - new_threads)
    return +grown


async def _open_then_leave(
    client: httpx.AsyncClient, url: str, opened: asyncio.Semaphore | None, leave: asyncio.Event
) -> None:
    async with client.stream("POST", url, json=STREAM) as response:
        if response.status_code != 200:
            await response.aread()
            pytest.fail(f"{response.status_code} {response.headers} {response.text}")
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                break  # generating
        if opened is not None:
            opened.release()
        await leave.wait()
    # Leaving the block mid-stream closes the connection.


async def _wave(url: str, size: int, *, hold_until_all_started: bool) -> None:
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        opened = asyncio.Semaphore(0)
        leave = asyncio.Event()
        if not hold_until_all_started:
            leave.set()
        tasks = [asyncio.create_task(_open_then_leave(client, url, opened, leave)) for _ in range(size)]
        try:
            if hold_until_all_started:
                async with asyncio.timeout(180):
                    for _ in range(size):
                        await opened.acquire()
        finally:
            leave.set()
            await asyncio.gather(*tasks)


async def _running_requests(service: RunningService) -> float:
    return await asyncio.to_thread(service.engine_metric, "vllm:num_requests_running")


async def _settle(
    gateway: psutil.Process, baseline: tuple[Counter[str], int, int]
) -> tuple[Counter[str], int]:
    """Descriptors grown beyond ``baseline`` and TCP connections, once back at it or after 15 s."""
    deadline = time.monotonic() + 15
    while True:
        now = _held(gateway)
        grown = _grown(now, baseline)
        if (not grown and now[1] <= baseline[1]) or time.monotonic() > deadline:
            return grown, now[1]
        await asyncio.sleep(0.5)


async def test_abandoned_streams_are_aborted_and_release_everything(service: RunningService) -> None:
    url = f"{service.url}/v1/chat/completions"
    gateway = psutil.Process(service.process.pid)
    generated_before = await asyncio.to_thread(service.engine_metric, "vllm:generation_tokens_total")

    # 200 at once: every stream is generating when its client leaves.
    await _wave(url, CONCURRENT, hold_until_all_started=True)
    deadline = time.monotonic() + 15
    while (running := await _running_requests(service)) > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.25)
    assert running == 0, "vLLM kept generating for clients that had gone"
    generated = await asyncio.to_thread(service.engine_metric, "vllm:generation_tokens_total")
    assert generated - generated_before < CONCURRENT * MAX_TOKENS / 10

    # The baseline is taken after the first burst: it opened what the gateway keeps open.
    await asyncio.sleep(1)
    baseline = _held(gateway)
    # The rest of the 1,000, a wave at a time, each client leaving at its first token.
    for _ in range((DISCONNECTS - CONCURRENT) // WAVE):
        await _wave(url, WAVE, hold_until_all_started=False)
    grown, connections = await _settle(gateway, baseline)
    assert not grown, f"descriptors held beyond the baseline {dict(baseline[0])}: {dict(grown)}"
    assert connections <= baseline[1], f"TCP connections: {baseline[1]} before, {connections} after"
    assert await _running_requests(service) == 0
    # And the gateway still serves.
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(url, json={**STREAM, "stream": False, "max_tokens": 4})
    assert response.status_code == 200
