"""SIGTERM with requests in flight (a rolling update): they finish, new ones get 503 with
Retry-After meanwhile, /ready says 503, and the gateway then stops with its whole engine."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import ENDLESS, running_service

pytestmark = pytest.mark.e2e

DRAIN_S = 120
STREAMS = 3
STREAMED = {"messages": ENDLESS, "max_tokens": 120, "temperature": 0, "stream": True}
PLAIN = {**STREAMED, "max_tokens": 600, "stream": False}
"""The plain request generates five times longer than the streams: the gateway is certainly
still draining while the test probes it (with equal lengths, a loaded CI machine once saw every
request finish, and the gateway leave, between two probes)."""


def test_sigterm_drains_in_flight_requests_then_stops(tmp_path: Path) -> None:
    with running_service(tmp_path, max_model_len="1024", drain_timeout_s=str(DRAIN_S)) as service:
        url = f"{service.url}/v1/chat/completions"
        started = threading.Barrier(STREAMS + 1)
        streamed: list[list[str]] = []
        plain: list[httpx.Response] = []

        def stream() -> None:
            lines: list[str] = []
            with httpx.stream("POST", url, json=STREAMED, timeout=120) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        if len(lines) == 2:
                            started.wait(timeout=60)
            streamed.append(lines)

        def complete() -> None:
            plain.append(httpx.post(url, json=PLAIN, timeout=DRAIN_S))

        threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
        threads.append(threading.Thread(target=complete))
        for thread in threads:
            thread.start()
        started.wait(timeout=120)  # every stream is generating

        service.process.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        time.sleep(0.3)
        refused = httpx.post(url, json={**PLAIN, "max_tokens": 4}, timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        assert int(refused.headers["retry-after"]) > 0
        assert httpx.get(f"{service.url}/ready", timeout=10).status_code == 503
        assert httpx.get(f"{service.url}/health", timeout=10).status_code == 200

        for thread in threads:
            thread.join(timeout=DRAIN_S)
        assert len(streamed) == STREAMS
        for lines in streamed:
            assert lines[-1] == "data: [DONE]"
            assert not any('"error"' in line for line in lines)
            assert any('"finish_reason":"length"' in line for line in lines)
        assert [response.status_code for response in plain] == [200]
        assert plain[0].json()["choices"][0]["finish_reason"] == "length"

        # Drained: the gateway goes on its own, well before the drain period is over.
        service.process.wait(timeout=DRAIN_S)
        assert time.monotonic() - sent_at < DRAIN_S
        # Leaving the block checks that no engine process outlived the gateway.
