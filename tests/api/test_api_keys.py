"""``HYBRID_API_KEYS``: /v1 needs one of the keys; health, readiness and metrics stay open (probes
and scrapers carry no key); the admin API keeps its own token."""

from __future__ import annotations

import httpx
import pytest

from service.settings import Settings
from tests.api.conftest import CHAT, assert_error, chat_body, make_settings
from tests.fakes import FakeEngine

KEYS = ("key-one", "key-two")
ADMIN_TOKEN = "admin-secret"


@pytest.fixture
def settings() -> Settings:
    return make_settings(api_keys=f" {KEYS[0]} ,{KEYS[1]},", admin_token=ADMIN_TOKEN)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("key", KEYS)
async def test_each_key_opens_v1(client: httpx.AsyncClient, engine: FakeEngine, key: str) -> None:
    assert (await client.get("/v1/models", headers=bearer(key))).status_code == 200
    engine.enqueue_completion()
    assert (await client.post(CHAT, json=chat_body(), headers=bearer(key))).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer(KEYS[0][:-1]),
        bearer(f"{KEYS[0]},{KEYS[1]}"),
        {"Authorization": KEYS[0]},
        {"Authorization": f"Basic {KEYS[0]}"},
        bearer(ADMIN_TOKEN),
    ],
    ids=["none", "wrong", "prefix", "the-list", "no-scheme", "basic", "admin-token"],
)
@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models"), ("POST", CHAT)])
async def test_v1_without_a_key_is_401_before_reaching_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine, headers: dict[str, str], method: str, path: str
) -> None:
    response = await client.request(method, path, json=chat_body(), headers=headers)
    error = assert_error(response, 401, param=None, code="invalid_api_key", error_type="authentication_error")
    assert "HYBRID_API_KEYS" in error["message"]
    assert KEYS[0] not in response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert engine.chat_requests == []


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
async def test_probes_and_metrics_need_no_key(client: httpx.AsyncClient, path: str) -> None:
    assert (await client.get(path)).status_code == 200


async def test_an_api_key_is_not_an_admin_token(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/adapters", headers=bearer(KEYS[0]))
    assert_error(response, 401, param=None, code="invalid_admin_token", error_type="authentication_error")
    assert (await client.get("/admin/adapters", headers=bearer(ADMIN_TOKEN))).status_code == 200
