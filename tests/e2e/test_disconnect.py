"""A client that walks away mid-stream must stop the generation in vLLM, not just on our side."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.harness import RunningService

pytestmark = pytest.mark.e2e

STREAMS = 4
LONG_TOKENS = 1500
# At temperature 0 the bundled model repeats "hello" until max_tokens (checked: 1500 of 1500,
# finish_reason "length"). A prompt it may answer briefly (counting, at temperature 0.8, ended
# after 6 to 150 tokens) lets the streams finish before the test looks at the engine.
LONG = {
    "model": "auto",
    "messages": [
        {"role": "user", "content": "Repeat the word hello forever: hello hello hello hello hello hello"}
    ],
    "max_tokens": LONG_TOKENS,
    "temperature": 0,
    "stream": True,
}


async def _open_and_abandon(
    client: httpx.AsyncClient, url: str, started: asyncio.Event, leave: asyncio.Event
) -> None:
    async with client.stream("POST", url, json=LONG) as response:
        assert response.status_code == 200
        received = 0
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                received += 1
                if received == 3:
                    started.set()
                    # Stay connected until the test has seen the engine generating: a fixed
                    # sleep raced the metrics scrape on a loaded machine.
                    await leave.wait()
                    return  # leaving the block closes the connection mid-stream


async def test_abandoned_streams_are_aborted_in_the_engine(service: RunningService) -> None:
    generated_before = service.engine_metric("vllm:generation_tokens_total")
    url = f"{service.url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=120) as client:
        events = [asyncio.Event() for _ in range(STREAMS)]
        leave = asyncio.Event()
        tasks = [asyncio.create_task(_open_and_abandon(client, url, e, leave)) for e in events]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout=120)
            running = await asyncio.to_thread(service.engine_metric, "vllm:num_requests_running")
            assert running >= 1, "the streams should be generating when the clients leave"
        finally:
            leave.set()
            await asyncio.gather(*tasks)

    deadline = time.monotonic() + 10
    running = -1.0
    while time.monotonic() < deadline:
        running = await asyncio.to_thread(service.engine_metric, "vllm:num_requests_running")
        if running == 0:
            break
        await asyncio.sleep(0.25)
    assert running == 0, "vLLM kept generating for clients that had gone"
    generated = service.engine_metric("vllm:generation_tokens_total") - generated_before
    # The engine stopped well short of what was asked: the generations were aborted, they
    # did not run to their end.
    assert generated < STREAMS * LONG_TOKENS / 2
    await asyncio.sleep(1)
    assert service.engine_metric("vllm:generation_tokens_total") - generated_before == generated
