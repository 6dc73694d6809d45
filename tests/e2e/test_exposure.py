"""The engine is not part of the public surface: the local vLLM listens on loopback only, and
its own endpoints (adapter loading, tokenizer, cache and server controls, stored responses) do
not exist on the gateway. ``/v1/completions``, ``/v1/embeddings`` and ``/v1/responses`` are the
gateway's own routes (completions relayed after its own parsing, embeddings from its own
embedder): vLLM's extensions to them are refused there, never passed through."""

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
    ("POST", "/detokenize"),
    ("POST", "/reset_prefix_cache"),
    ("GET", "/server_info"),
    ("GET", "/v1/responses/resp_0123"),
]
# The gateway's own routes over what vLLM also serves, each with a vLLM extension vLLM accepts.
GATEWAY_OWN = [
    ("/v1/completions", {"model": "auto", "prompt": "x", "max_tokens": 1}, "lora_request"),
    ("/v1/completions", {"model": "auto", "prompt": "x", "max_tokens": 1}, "prompt_embeds"),
    ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "x"}, "truncate_prompt_tokens"),
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


@pytest.mark.parametrize(
    ("path", "body", "extension"), GATEWAY_OWN, ids=[f"{p} {e}" for p, _, e in GATEWAY_OWN]
)
def test_the_gateways_own_routes_refuse_the_engines_extensions(
    service: RunningService, path: str, body: dict[str, Any], extension: str
) -> None:
    valid = httpx.post(f"{service.url}{path}", json=body, timeout=120)
    assert valid.status_code == 200, valid.text  # served by the gateway...
    values = {"lora_request": {"lora_name": "x", "lora_path": "/etc"}, "prompt_embeds": "AAAA"}
    refused = httpx.post(
        f"{service.url}{path}", json={**body, extension: values.get(extension, 1)}, timeout=10
    )
    assert refused.status_code == 400, refused.text  # ...which relays none of vLLM's own fields
    assert refused.json()["error"]["param"] == extension


def _tcp(process: psutil.Process) -> list[Any]:
    try:
        return list(process.net_connections(kind="tcp"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
