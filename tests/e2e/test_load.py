"""Many clients that walk away: 200 concurrent streams abandoned at once must all be aborted in
vLLM, and after 800 more (1,000 disconnects in all) the gateway holds no more connections or
file descriptors than it did after the first burst (loopback only, bounded in time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable

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


async def _wave(url: str, size: int, *, while_open: Callable[[], Awaitable[None]] | None = None) -> None:
    """``size`` streams, each left by its client at its first token. With ``while_open``, every
    client stays until all are generating, and leaves once ``while_open`` has run."""
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        opened = asyncio.Semaphore(0)
        leave = asyncio.Event()
        if while_open is None:
            leave.set()
        tasks = [asyncio.create_task(_open_then_leave(client, url, opened, leave)) for _ in range(size)]
        try:
            if while_open is not None:
                async with asyncio.timeout(180):
                    for _ in range(size):
                        await opened.acquire()
                await while_open()
        finally:
            leave.set()
            await asyncio.gather(*tasks)


async def _generated(service: RunningService) -> float:
    return await asyncio.to_thread(service.engine_metric, "vllm:generation_tokens_total")


async def _running_requests(service: RunningService) -> float:
    """vLLM's running requests once back at 0, or after 15 s (an abort reaches the engine a
    moment after its client left, and its gauge a scheduler step after that)."""
    deadline = time.monotonic() + 15
    while (running := await asyncio.to_thread(service.engine_metric, "vllm:num_requests_running")) > 0:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    return running


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
    generated: list[float] = [await _generated(service)]

    async def count_generated() -> None:
        generated.append(await _generated(service))

    # 200 at once: every stream is generating when its client leaves.
    await _wave(url, CONCURRENT, while_open=count_generated)
    assert await _running_requests(service) == 0, "vLLM kept generating for clients that had gone"
    # Once they left, the engine generated a small part of what they had asked for and not had
    # (by tokens rather than time, which a slow machine stretches).
    before, at_leaving, after = *generated, await _generated(service)
    left_to_generate = CONCURRENT * MAX_TOKENS - (at_leaving - before)
    assert after - at_leaving < left_to_generate / 10, (before, at_leaving, after)
    opening, afterwards = at_leaving - before, after - at_leaving
    print(f"tokens generated: {opening:.0f} while the streams opened, {afterwards:.0f} after")

    # The baseline is taken after the first burst: it opened what the gateway keeps open.
    await asyncio.sleep(1)
    baseline = _held(gateway)
    # The rest of the 1,000, a wave at a time, each client leaving at its first token.
    for _ in range((DISCONNECTS - CONCURRENT) // WAVE):
        await _wave(url, WAVE)
    grown, connections = await _settle(gateway, baseline)
    assert not grown, f"descriptors held beyond the baseline {dict(baseline[0])}: {dict(grown)}"
    assert connections <= baseline[1], f"TCP connections: {baseline[1]} before, {connections} after"
    assert await _running_requests(service) == 0, "vLLM kept generating for clients that had gone"
    # And the gateway still serves.
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(url, json={**STREAM, "stream": False, "max_tokens": 4})
    assert response.status_code == 200, response.text
