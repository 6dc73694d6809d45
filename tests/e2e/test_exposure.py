"""The engine is not part of the public surface: the local vLLM listens on loopback only, and
its own endpoints (adapter loading, tokenizer, raw completions) do not exist on the gateway."""

from __future__ import annotations

import ipaddress
from typing import Any

import httpx
import psutil
import pytest

from tests.harness import RunningService

pytestmark = pytest.mark.e2e

ENGINE_ONLY = [
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/tokenize"),
    ("POST", "/v1/completions"),
    ("POST", "/reset_prefix_cache"),
    ("GET", "/server_info"),
]


def test_the_engine_listens_on_loopback_only(service: RunningService) -> None:
    listening = [
        connection.laddr
        for process in service.engine_processes()
        for connection in _tcp(process)
        if connection.status == psutil.CONN_LISTEN
    ]
    assert any(address.port == service.engine_port for address in listening), listening
    assert all(ipaddress.ip_address(address.ip).is_loopback for address in listening), listening


@pytest.mark.parametrize(("method", "path"), ENGINE_ONLY)
def test_engine_endpoints_are_not_reachable_through_the_gateway(
    service: RunningService, method: str, path: str
) -> None:
    body = {"lora_name": "x", "lora_path": "/etc", "model": "x", "prompt": "x"}
    response = httpx.request(method, f"{service.url}{path}", json=body, timeout=10)
    assert response.status_code in (404, 405), response.text
    assert set(response.json()) == {"error"}
    # ...while the engine itself has them (so the check above is not vacuous).
    assert httpx.post(f"{service.engine_url}/tokenize", json={"prompt": "hi"}, timeout=10).status_code in (
        200,
        400,
    )


def _tcp(process: psutil.Process) -> list[Any]:
    try:
        return list(process.net_connections(kind="tcp"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
