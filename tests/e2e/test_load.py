"""Many clients that walk away: 200 concurrent streams, held open and read until all are in vLLM
(running or queued), then abandoned at once, must all leave vLLM; and after 800 more (1,000
disconnects in all) the gateway holds no more connections or file descriptors than it did after
the first burst (loopback only, bounded in time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class _Burst:
    leave: asyncio.Event = field(default_factory=asyncio.Event)
    generating: asyncio.Event = field(default_factory=asyncio.Event)
    with_tokens: int = 0
    """Streams that had a token when their clients left."""
    held: tuple[float, float] = (0, 0)
    """vLLM's running and waiting requests when the clients left."""
    generated: float = 0
    """vLLM's generated tokens (all requests, ever) when the clients left."""


async def _ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        await response.aread()
        pytest.fail(f"{response.status_code} {response.headers} {response.text}")


async def _leave_at_first_token(client: httpx.AsyncClient, url: str) -> None:
    async with client.stream("POST", url, json=STREAM) as response:
        await _ok(response)
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                return  # leaving the block mid-stream closes the connection


async def _hold(client: httpx.AsyncClient, url: str, opened: asyncio.Semaphore, burst: _Burst) -> None:
    """Read a stream as a client does until the burst leaves, then walk away. Reading goes on in
    a task of its own: leaving a loop over ``aiter_lines`` ends the generator, and httpx then
    closes the connection, so a client that stopped at its first token would leave at once."""
    async with client.stream("POST", url, json=STREAM) as response:
        await _ok(response)
        opened.release()

        async def read() -> None:
            counted = False
            async for line in response.aiter_lines():
                if not counted and line.startswith("data:"):
                    counted = True
                    burst.with_tokens += 1
                    burst.generating.set()

        reader = asyncio.create_task(read())
        await burst.leave.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    # Leaving the block mid-stream closes the connection.


async def _wave(url: str) -> None:
    """``WAVE`` streams, each left by its client at its first token."""
    limits = httpx.Limits(max_connections=WAVE, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(_leave_at_first_token(client, url) for _ in range(WAVE)))


async def _engine_holds(
    service: RunningService, until: Callable[[tuple[float, float]], bool], within_s: float
) -> tuple[float, float]:
    """vLLM's running and waiting requests once ``until`` holds of them, or after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        running = await asyncio.to_thread(service.engine_metric, "vllm:num_requests_running")
        waiting = await asyncio.to_thread(service.engine_metric, "vllm:num_requests_waiting")
        if until((running, waiting)) or time.monotonic() > deadline:
            return running, waiting
        await asyncio.sleep(0.25)


async def _burst(service: RunningService, url: str) -> _Burst:
    """``CONCURRENT`` streams held open and read until all of them are in vLLM and some are
    generating, then left at once."""
    limits = httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        opened, burst = asyncio.Semaphore(0), _Burst()
        tasks = [asyncio.create_task(_hold(client, url, opened, burst)) for _ in range(CONCURRENT)]
        try:
            async with asyncio.timeout(180):
                for _ in range(CONCURRENT):
                    await opened.acquire()
                await burst.generating.wait()
            # The gateway answers once vLLM accepted a request, which is in vLLM's queue a
            # moment later. vLLM runs up to its max_num_seqs at once (128 on CPU); the rest wait.
            burst.held = await _engine_holds(service, lambda held: sum(held) >= CONCURRENT, 60)
            assert sum(burst.held) >= CONCURRENT, f"vLLM held {burst.held} (running, waiting)"
            burst.generated = await _generated(service)
        finally:
            burst.leave.set()
            await asyncio.gather(*tasks)
    return burst


async def _engine_idle(service: RunningService) -> tuple[float, float]:
    """vLLM's running and waiting requests once both are 0, or after 15 s (an abort reaches the
    engine a moment after its client left, and its gauges a scheduler step after that)."""
    return await _engine_holds(service, lambda held: held == (0, 0), 15)


async def _generated(service: RunningService) -> float:
    return await asyncio.to_thread(service.engine_metric, "vllm:generation_tokens_total")


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

    # 200 at once, all of them in vLLM (running or waiting) when their clients leave together.
    before = await _generated(service)
    burst = await _burst(service, url)
    at_leaving = burst.generated
    assert await _engine_idle(service) == (0, 0), "vLLM kept requests of clients that had gone"
    # Once they left, the engine generated a small part of what they had asked for and not had
    # (by tokens rather than time, which a slow machine stretches).
    after = await _generated(service)
    left_to_generate = CONCURRENT * MAX_TOKENS - (at_leaving - before)
    assert after - at_leaving < left_to_generate / 10, (before, at_leaving, after)
    print(
        f"in vLLM when the clients left: {burst.held[0]:.0f} running, {burst.held[1]:.0f} waiting, "
        f"{burst.with_tokens} streams with tokens; tokens generated: {at_leaving - before:.0f} while "
        f"the streams were open, {after - at_leaving:.0f} after"
    )

    # The baseline is taken after the first burst: it opened what the gateway keeps open.
    await asyncio.sleep(1)
    baseline = _held(gateway)
    # The rest of the 1,000, a wave at a time, each client leaving at its first token.
    for _ in range((DISCONNECTS - CONCURRENT) // WAVE):
        await _wave(url)
    grown, connections = await _settle(gateway, baseline)
    assert not grown, f"descriptors held beyond the baseline {dict(baseline[0])}: {dict(grown)}"
    assert connections <= baseline[1], f"TCP connections: {baseline[1]} before, {connections} after"
    assert await _engine_idle(service) == (0, 0), "vLLM kept requests of clients that had gone"
    # And the gateway still serves.
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(url, json={**STREAM, "stream": False, "max_tokens": 4})
    assert response.status_code == 200, response.text
