"""SIGTERM with requests in flight (a rolling update): they finish, new ones get 503 with
Retry-After meanwhile, /ready says 503, and the gateway then stops with its whole engine."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.harness import ENDLESS, RunningService, explained, running_service

pytestmark = pytest.mark.e2e

DRAIN_S = 120
STREAMS = 3
STREAMED = {"messages": ENDLESS, "max_tokens": 120, "temperature": 0, "stream": True}
PLAIN = {**STREAMED, "max_tokens": 200, "stream": False}
UPLOADED = {**PLAIN, "max_tokens": 8}
IN_FLIGHT = "hybrid_chat_completions_in_flight"


class SlowUpload:
    """A chat completion whose body arrives in two parts, the second when the test says. It is in
    flight from its head on, however fast the engine generates, so the gateway is certainly
    still draining while the test probes it. (Generations alone did not do that: on CI's
    machine they twice all ended, and the gateway left, before the probes were done.)"""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        parts = urlsplit(url)
        self._connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=DRAIN_S)
        payload = json.dumps(body).encode()
        self._rest = payload[len(payload) // 2 :]
        self._connection.putrequest("POST", "/v1/chat/completions")
        self._connection.putheader("Content-Type", "application/json")
        self._connection.putheader("Content-Length", str(len(payload)))
        self._connection.endheaders(payload[: len(payload) // 2])

    def finish(self) -> tuple[int, dict[str, Any]]:
        self._connection.send(self._rest)
        response = self._connection.getresponse()
        return response.status, json.loads(response.read())


def _wait_for(
    what: str, condition: Callable[[], bool], service: RunningService, timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s:.0f} s\n{service.describe()}"
        time.sleep(0.1)


def test_sigterm_drains_in_flight_requests_then_stops(tmp_path: Path) -> None:
    with running_service(tmp_path, max_model_len="1024", drain_timeout_s=str(DRAIN_S)) as service:
        # Threads whose failures come back through their futures: none is left to raise into
        # a later test.
        pool = ThreadPoolExecutor(STREAMS + 1)
        try:
            _drain(service, pool)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        # Leaving the block checks that no engine process outlived the gateway.


def _drain(service: RunningService, pool: ThreadPoolExecutor) -> None:
    url = f"{service.url}/v1/chat/completions"
    upload = SlowUpload(service.url, UPLOADED)
    _wait_for("admitted", lambda: service.gateway_metric(IN_FLIGHT) == 1, service)
    started = threading.Barrier(STREAMS + 1)

    def stream() -> list[str]:
        lines: list[str] = []
        with httpx.stream("POST", url, json=STREAMED, timeout=120) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data:"):
                    lines.append(line)
                    if len(lines) == 2:
                        started.wait(timeout=60)
        return lines

    plain = pool.submit(httpx.post, url, json=PLAIN, timeout=DRAIN_S)
    _wait_for("admitted", lambda: service.gateway_metric(IN_FLIGHT) == 2, service)
    streams = [pool.submit(stream) for _ in range(STREAMS)]
    started.wait(timeout=120)  # every stream is generating

    service.process.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    with explained(service):
        _wait_for("draining", lambda: service.gateway_metric("hybrid_draining") == 1, service, 10)
        refused = httpx.post(url, json={**PLAIN, "max_tokens": 4}, timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        assert int(refused.headers["retry-after"]) > 0
        assert httpx.get(f"{service.url}/ready", timeout=10).status_code == 503
        assert httpx.get(f"{service.url}/health", timeout=10).status_code == 200
        probed_after = time.monotonic() - sent_at

        # Admitted before the signal, its body still arriving: it is served all the same.
        status, answer = upload.finish()
        assert status == 200, answer
        assert answer["choices"][0]["finish_reason"] == "length"

        for lines in [future.result(timeout=DRAIN_S) for future in streams]:
            assert lines[-1] == "data: [DONE]", lines[-3:]
            assert not any('"error"' in line for line in lines), lines[-3:]
            assert any('"finish_reason":"length"' in line for line in lines), lines[-3:]
        response = plain.result(timeout=DRAIN_S)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] == "length"

        # Drained: the gateway goes on its own, well before the drain period is over.
        service.process.wait(timeout=DRAIN_S)
    left_after = time.monotonic() - sent_at
    assert left_after < DRAIN_S
    print(f"probes done {probed_after:.1f} s after SIGTERM; the gateway left after {left_after:.1f} s")
