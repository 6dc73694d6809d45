"""The supervisor keeps the local engine alive: a killed engine is restarted, a stream it was
generating ends with an error event and [DONE], while it is down clients get 503 with
Retry-After (never a hang) and /ready says so, and its adapters are loaded again."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.test_adapters import upload
from tests.harness import ENDLESS, START_TIMEOUT_S, RunningService, wait_ready

pytestmark = pytest.mark.e2e

LONG_STREAM = {
    "messages": ENDLESS,
    "max_tokens": 1000,
    "temperature": 0,
    "stream": True,
}


def test_a_killed_engine_is_restarted_with_its_adapters(service: RunningService, lora_adapter: Path) -> None:
    with service.admin() as admin:
        assert upload(admin, "survivor", lora_adapter).status_code == 201
    engine = service.engine_processes()
    leader = min(engine, key=lambda p: p.create_time())
    # Killed mid-stream: the client gets one error event and [DONE], not a hang or a cut.
    lines: list[str] = []
    with httpx.stream("POST", f"{service.url}/v1/chat/completions", json=LONG_STREAM, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                lines.append(line)
                if len(lines) == 3:
                    leader.send_signal(signal.SIGKILL)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data:"))["error"]
    assert error["code"] == "engine_unavailable", error
    assert not any('"error"' in line for line in lines[:-2])

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
    # The adapter is loaded again by the reconciliation that follows every restart; until
    # then a request for it is a 503 (retry), never a 404.
    deadline = time.monotonic() + 60
    while True:
        try:
            survivor = client.chat.completions.create(
                model="survivor", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
            break
        except openai.APIStatusError as exc:
            if exc.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert survivor.model == "survivor"
    with service.admin() as admin:
        assert admin.delete("/admin/adapters/survivor").status_code == 204
    metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
    assert "hybrid_engine_restarts_total 1.0" in metrics
