"""The supervisor keeps the local engine alive: a killed engine is restarted, and while it is
down clients get 503 with Retry-After (never a hang), and /ready says so."""

from __future__ import annotations

import signal
import time

import httpx
import openai
import pytest

from tests.harness import START_TIMEOUT_S, RunningService, wait_ready

pytestmark = pytest.mark.e2e


def test_a_killed_engine_is_restarted(service: RunningService) -> None:
    engine = service.engine_processes()
    leader = min(engine, key=lambda p: p.create_time())
    leader.send_signal(signal.SIGKILL)

    # While it is down: 503 + Retry-After from /ready and from chat, quickly.
    deadline = time.monotonic() + 30
    ready = httpx.get(f"{service.url}/ready", timeout=10)
    while ready.status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        ready = httpx.get(f"{service.url}/ready", timeout=10)
    assert ready.status_code == 503
    assert int(ready.headers["retry-after"]) > 0
    assert ready.json()["error"]["code"] == "engine_unavailable"

    client = service.client(max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"]

    wait_ready(service.url, START_TIMEOUT_S, service.process)
    completion = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert completion.choices[0].message.content
    assert leader.pid not in {p.pid for p in service.engine_processes()}
    metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
    assert "hybrid_engine_restarts_total 1.0" in metrics
