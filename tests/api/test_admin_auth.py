"""The admin API's own bearer token: no routes without one configured, 401 without a bearer
token or with any other token (however odd its bytes), and the public routes untouched."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.api.admin_support import (  # noqa: F401 (fixtures, under their pytest names)
    ADMIN,
    AUTH,
    BASE_ID,
    TOKEN,
    admin_settings,
    assert_admin_error,
    assert_nothing_registered,
    base_dir_fixture,
    engine_fixture,
    import_dir_fixture,
    running_gateway,
    settings_fixture,
    store_dir_fixture,
    upload,
)
from tests.api.conftest import CHAT, chat_body, make_settings
from tests.fakes import FakeEngine

# Every admin route (POST with a JSON registration naming an import path).
ROUTES = [("GET", ADMIN), ("GET", f"{ADMIN}/pirate"), ("DELETE", f"{ADMIN}/pirate"), ("POST", ADMIN)]


async def call(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str] | dict[bytes, bytes]
) -> httpx.Response:
    body = {"name": "pirate", "path": "pirate"} if method == "POST" else None
    return await client.request(method, path, json=body, headers=headers)


# ---------------------------------------------------------------------------- no token configured


async def test_admin_routes_are_not_mounted_without_a_token(engine: FakeEngine, tmp_path: Path) -> None:
    settings = make_settings(admin_token=None)
    async with running_gateway(settings, engine, tmp_path) as (app, client):
        assert not [route for route in app.routes if getattr(route, "path", "").startswith("/admin")]
        for method, path in ROUTES:
            response = await call(client, method, path, AUTH)
            error = assert_admin_error(response, 404, param=None, code=None)
            assert path in error["message"]
        engine.enqueue_completion(model=BASE_ID)
        assert (await client.post(CHAT, json=chat_body())).status_code == 200


# ---------------------------------------------------------------------------- 401: no bearer token

NOT_BEARER = {
    "no-header": {},
    "basic": {"Authorization": "Basic YWRtaW46YWRtaW4tc2VjcmV0"},
    "bearer-empty": {"Authorization": "Bearer "},
    "bearer-alone": {"Authorization": "Bearer"},
    "token-without-scheme": {"Authorization": TOKEN},
    "other-scheme": {"Authorization": f"Token {TOKEN}"},
    "empty-header": {"Authorization": ""},
}


@pytest.mark.parametrize("headers", NOT_BEARER.values(), ids=NOT_BEARER.keys())
async def test_without_a_bearer_token_is_401(
    client: httpx.AsyncClient, engine: FakeEngine, headers: dict[str, str]
) -> None:
    for method, path in ROUTES:
        response = await call(client, method, path, headers)
        error = assert_admin_error(response, 401, param=None, code="missing_admin_token")
        assert "Bearer" in error["message"]
    assert engine.requests == []


async def test_an_unauthenticated_upload_is_refused_before_anything_is_stored(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    response = await upload(client, "pirate", lora_adapter, headers={})
    assert_admin_error(response, 401, param=None, code="missing_admin_token")
    await assert_nothing_registered(client, engine, store_dir)


# ---------------------------------------------------------------------------- 401: a wrong token

WRONG_TOKENS: dict[str, bytes] = {
    "wrong": b"not-the-secret",
    "prefix": TOKEN[:-1].encode(),
    "longer": f"{TOKEN}x".encode(),
    "other-case": TOKEN.upper().encode(),
    "two-spaces": f" {TOKEN}".encode(),
    "10-kB": b"a" * 10_000,
    "10-kB-starting-right": TOKEN.encode() + b"a" * 10_000,
    "nul": f"{TOKEN}\x00".encode(),
    "nul-inside": b"admin\x00secret",
    "latin-1-byte": f"{TOKEN}\xff".encode("latin-1"),
    "utf-8": "ädmin-sécret".encode(),
    "sql": b"' OR '1'='1' --",
    "sql-after-token": f"{TOKEN}' OR 1=1 --".encode(),
    "jinja": b"{{ settings.admin_token }}",
    "shell": b"${HYBRID_ADMIN_TOKEN}",
    "format": b"%s%s%s%n",
}


@pytest.mark.parametrize("token", WRONG_TOKENS.values(), ids=WRONG_TOKENS.keys())
async def test_a_wrong_token_is_401(client: httpx.AsyncClient, engine: FakeEngine, token: bytes) -> None:
    for method, path in ROUTES:
        response = await call(client, method, path, {b"Authorization": b"Bearer " + token})
        assert_admin_error(response, 401, param=None, code="invalid_admin_token")
        assert response.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in response.text
    assert engine.requests == []


async def test_a_wrong_token_cannot_upload(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    response = await upload(client, "pirate", lora_adapter, headers={"Authorization": "Bearer guess"})
    assert_admin_error(response, 401, param=None, code="invalid_admin_token")
    await assert_nothing_registered(client, engine, store_dir)


# ---------------------------------------------------------------------------- 200: the token


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_token_is_accepted_whatever_the_scheme_case(client: httpx.AsyncClient, scheme: str) -> None:
    response = await client.get(ADMIN, headers={"Authorization": f"{scheme} {TOKEN}"})
    assert response.status_code == 200, response.text
    assert response.json() == {"object": "list", "data": []}


class TestNonAsciiToken:
    """A token configured with non-ASCII characters, sent as its UTF-8 bytes."""

    TOKEN = "sécret-ü"

    @pytest.fixture
    def settings(self, base_dir: Path, import_dir: Path) -> Settings:
        return admin_settings(base_dir=base_dir, import_dir=import_dir, admin_token=self.TOKEN)

    async def test_the_right_non_ascii_token_is_accepted(self, client: httpx.AsyncClient) -> None:
        response = await client.get(ADMIN, headers={b"Authorization": b"Bearer " + self.TOKEN.encode()})
        assert response.status_code == 200, response.text

    async def test_a_wrong_non_ascii_token_is_401(self, client: httpx.AsyncClient) -> None:
        response = await client.get(ADMIN, headers={b"Authorization": "Bearer sécret-ö".encode()})
        assert_admin_error(response, 401, param=None, code="invalid_admin_token")


# ---------------------------------------------------------------------------- the public routes


async def test_the_public_routes_need_no_admin_token(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_completion(model=BASE_ID)
    response = await client.post(CHAT, json=chat_body())
    assert response.status_code == 200, response.text
    assert engine.last_chat_body["model"] == BASE_ID
    models = await client.get("/v1/models")
    assert models.status_code == 200
    assert [card["id"] for card in models.json()["data"]] == [BASE_ID, "auto"]
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/ready")).status_code == 200
