"""No route escapes its auth. Every route of the app is classified here (a new one fails the
table test until it is), then each class is checked: ``/v1`` needs an API key, ``/admin`` the
admin token, and neither opens the other. Path and header tricks, odd bearer tokens and the
engine's own endpoints all end in a 4xx envelope that reached nothing.

The scheme of ``Authorization`` is matched case-insensitively (RFC 7235 §2.1): ``bearer <key>``
is accepted. The token itself is compared byte for byte."""

from __future__ import annotations

import urllib.parse
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.settings import Settings
from tests.api.conftest import CHAT, assert_error, assert_still_serving, chat_body, make_settings
from tests.fakes import FakeEngine

KEY = "key-one-0123456789"
ADMIN_TOKEN = "admin-secret-0123456789"
KEY_AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

PUBLIC, API_KEY, ADMIN = "public", "api key", "admin token"

# FastAPI's own pages stay public, as it serves them: the description holds no secret, and the
# gateway's API is OpenAI's, published anyway.
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/openapi.json"): PUBLIC,
    ("HEAD", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("HEAD", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("HEAD", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("HEAD", "/redoc"): PUBLIC,
    # probes and the scraper carry no credentials
    ("GET", "/health"): PUBLIC,
    ("HEAD", "/health"): PUBLIC,
    ("GET", "/ready"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("POST", "/v1/chat/completions"): API_KEY,
    ("GET", "/v1/models"): API_KEY,
    ("GET", "/v1/models/{model}"): API_KEY,
    ("POST", "/v1/embeddings"): API_KEY,
    ("POST", "/v1/completions"): API_KEY,
    ("POST", "/v1/responses"): API_KEY,
    ("GET", "/admin/adapters"): ADMIN,
    ("POST", "/admin/adapters"): ADMIN,
    ("GET", "/admin/adapters/{name}"): ADMIN,
    ("PATCH", "/admin/adapters/{name}"): ADMIN,
    ("DELETE", "/admin/adapters/{name}"): ADMIN,
    ("GET", "/admin/collections"): ADMIN,
    ("POST", "/admin/collections/{name}/documents"): ADMIN,
    ("DELETE", "/admin/collections/{name}/documents/{source:path}"): ADMIN,
    ("DELETE", "/admin/collections/{name}"): ADMIN,
    ("GET", "/admin/router"): ADMIN,
    ("POST", "/admin/router/explain"): ADMIN,
    ("POST", "/admin/router/fit"): ADMIN,
}


@pytest.fixture
def settings() -> Settings:
    return make_settings(api_keys=KEY, admin_token=ADMIN_TOKEN)


def concrete(path: str) -> str:
    return path.replace("{name}", "notes").replace("{source:path}", "docs/a.md").replace("{model}", "auto")


def by_class(kind: str) -> list[Any]:
    return [
        pytest.param(method, concrete(path), id=f"{method} {path}")
        for (method, path), where in ROUTES.items()
        if where == kind
    ]


def test_every_route_is_classified(settings: Settings, tmp_path: Any) -> None:
    from service.app import build_app

    app = build_app(settings.model_copy(update={"data_dir": tmp_path}))
    served = {
        (method, getattr(route, "path", ""))
        for route in app.routes
        for method in getattr(route, "methods", None) or ()
    }
    assert served - ROUTES.keys() == set(), "routes with no auth class: add them to ROUTES"
    assert ROUTES.keys() - served == set(), "ROUTES lists routes the app no longer has"


# ---------------------------------------------------------------------------- (a) each class


@pytest.mark.parametrize(("method", "path"), by_class(PUBLIC))
async def test_a_public_route_needs_no_credentials(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await client.request(method, path)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("method", "path"), by_class(API_KEY))
async def test_an_api_key_route_is_401_without_the_key(
    client: httpx.AsyncClient, engine: FakeEngine, method: str, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, ADMIN_AUTH):
        response = await client.request(method, path, json=chat_body(), headers=headers)
        assert_error(response, 401, param=None, code="invalid_api_key", error_type="authentication_error")
        assert response.headers["www-authenticate"] == "Bearer"
    assert engine.requests == []
    await assert_still_serving(client, engine, KEY_AUTH)


@pytest.mark.parametrize(("method", "path"), by_class(ADMIN))
async def test_an_admin_route_is_401_without_the_admin_token(
    client: httpx.AsyncClient, engine: FakeEngine, method: str, path: str
) -> None:
    body = {"name": "pirate", "path": "pirate", "documents": [{"source": "a", "text": "b"}]}
    refusals = [
        ({}, "missing_admin_token"),
        ({"Authorization": "Bearer wrong"}, "invalid_admin_token"),
        (KEY_AUTH, "invalid_admin_token"),
    ]
    for headers, code in refusals:
        response = await client.request(method, path, json=body, headers=headers)
        assert_error(response, 401, param=None, code=code, error_type="authentication_error")
        assert response.headers["www-authenticate"] == "Bearer"
    assert engine.requests == []
    listing = await client.get("/admin/adapters", headers=ADMIN_AUTH)
    assert listing.json() == {"object": "list", "data": []}  # nothing was registered
    await assert_still_serving(client, engine, KEY_AUTH)


# ---------------------------------------------------------------------------- (b) path tricks


async def asgi_get(app: FastAPI, raw_path: bytes, headers: list[tuple[bytes, bytes]]) -> httpx.Response:
    """A GET with the path exactly as given (httpx would resolve ``.`` and ``..``), decoded the
    way uvicorn decodes it."""
    path, _, query = raw_path.partition(b"?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": urllib.parse.unquote(path.decode("ascii")),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": headers
        if any(name == b"host" for name, _ in headers)
        else [(b"host", b"gateway.test"), *headers],
        "client": ("203.0.113.9", 50000),
        "server": ("gateway.test", 80),
    }
    status, response_headers, body = 0, [], b""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, response_headers, body
        if message["type"] == "http.response.start":
            status, response_headers = message["status"], message["headers"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    await app(scope, receive, send)
    return httpx.Response(status, headers=response_headers, content=body)


PATH_TRICKS = [
    b"//v1/models",
    b"/v1//models",
    b"/V1/models",
    b"/v1/MODELS",
    b"/v1/models/",
    b"/v1/%2e%2e/admin/adapters",
    b"/v1/%2E%2E/%2E%2E/admin/adapters",
    b"/v1/..%2fadmin/adapters",
    b"/admin/../v1/models",
    b"/v1/models%00",
    b"/v1/models;x",
    b"/./v1/models",
    b"/admin/adapters/",
    b"//admin/adapters",
]


@pytest.mark.parametrize("raw_path", PATH_TRICKS, ids=[p.decode() for p in PATH_TRICKS])
@pytest.mark.parametrize("credentials", ["none", "api-key"])
async def test_a_path_trick_is_a_plain_404(
    app: FastAPI, client: httpx.AsyncClient, engine: FakeEngine, raw_path: bytes, credentials: str
) -> None:
    """Not normalised into a route (no 200 without a key, no admin route with an API key), and
    not redirected (Starlette's slash redirect would take its Location from the Host header)."""
    headers = [(b"authorization", f"Bearer {KEY}".encode())] if credentials == "api-key" else []
    response = await asgi_get(app, raw_path, headers)
    error = assert_error(response, 404, param=None)
    assert error["message"].startswith("Unknown request URL")
    assert "location" not in response.headers
    assert engine.requests == []
    await assert_still_serving(client, engine, KEY_AUTH)


@pytest.mark.parametrize("host", [b"evil.example", b"localhost/v1/models?", b"evil.example:443"])
@pytest.mark.parametrize("raw_path", [b"/v1/models/", b"/docs/", b"/health/"])
async def test_a_hostile_host_header_gets_no_redirect(
    app: FastAPI, client: httpx.AsyncClient, engine: FakeEngine, host: bytes, raw_path: bytes
) -> None:
    response = await asgi_get(app, raw_path, [(b"host", host), (b"authorization", f"Bearer {KEY}".encode())])
    assert_error(response, 404, param=None)
    assert "location" not in response.headers
    await assert_still_serving(client, engine, KEY_AUTH)


async def test_a_hostile_host_header_changes_nothing_on_a_real_route(app: FastAPI) -> None:
    for host in (b"evil.example", b"localhost/v1/models?"):
        refused = await asgi_get(app, b"/v1/models", [(b"host", host)])
        assert_error(refused, 401, param=None, code="invalid_api_key", error_type="authentication_error")
        served = await asgi_get(
            app, b"/v1/models", [(b"host", host), (b"authorization", f"Bearer {KEY}".encode())]
        )
        assert served.status_code == 200
        assert "evil" not in served.text


PROXY_HEADERS = {
    "X-Forwarded-For": "127.0.0.1",
    "X-Real-IP": "127.0.0.1",
    "X-Forwarded-Host": "localhost",
    "X-Original-URL": "/health",
    "X-Rewrite-URL": "/health",
    "X-HTTP-Method-Override": "GET",
    "X-Method-Override": "GET",
}


async def test_proxy_and_override_headers_change_nothing(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    # A trusted-looking origin or a rewritten URL opens nothing...
    response = await client.get("/v1/models", headers=PROXY_HEADERS)
    assert_error(response, 401, param=None, code="invalid_api_key", error_type="authentication_error")
    admin_headers = {**PROXY_HEADERS, "X-Original-URL": "/admin/adapters", "X-Rewrite-URL": "/admin/adapters"}
    response = await client.get("/admin/adapters", headers=admin_headers)
    assert_error(response, 401, param=None, code="missing_admin_token", error_type="authentication_error")
    # ...routes nowhere else...
    response = await client.get("/health", headers={**KEY_AUTH, "X-Original-URL": "/admin/adapters"})
    assert response.json() == {"status": "ok"}
    # ...and changes no method.
    response = await client.post("/v1/models", headers={**KEY_AUTH, **PROXY_HEADERS})
    assert_error(response, 405, param=None)
    response = await client.get(CHAT, headers={**KEY_AUTH, "X-HTTP-Method-Override": "POST"})
    assert_error(response, 405, param=None)
    assert engine.requests == []
    await assert_still_serving(client, engine, KEY_AUTH)


# ---------------------------------------------------------------------------- (c) bearer tokens

ODD_TOKENS: dict[str, bytes] = {
    "sql": b"' OR 1=1 --",
    "template": b"{{7*7}}",
    "jndi": b"${jndi:ldap://x}",
    "format": b"%s%s%n",
    "10-kB": b"k" * 10_000,
    "prefix-of-the-key": KEY[:-1].encode(),
    "key-plus-space": KEY.encode() + b" ",
    "key-plus-suffix": KEY.encode() + b"x",
    "space-then-key": b" " + KEY.encode(),
    "two-keys": f"{KEY},{KEY}".encode(),
    "nul-after-key": KEY.encode() + b"\x00",
    "nul-inside": b"key-one\x000123456789",
    "latin-1": KEY.encode() + b"\xff",
}
# Credentials that are not a bearer token at all.
NOT_BEARER: dict[str, bytes] = {
    "bearer-alone": b"Bearer",
    "bearer-space": b"Bearer ",
    "basic": b"Basic a2V5LW9uZS0wMTIzNDU2Nzg5Og==",
    "no-scheme": KEY.encode(),
    "other-scheme": b"Token " + KEY.encode(),
}


@pytest.mark.parametrize(
    ("value", "admin_code"),
    [pytest.param(b"Bearer " + token, "invalid_admin_token", id=name) for name, token in ODD_TOKENS.items()]
    + [pytest.param(value, "missing_admin_token", id=name) for name, value in NOT_BEARER.items()],
)
async def test_an_odd_credential_is_401_everywhere(
    client: httpx.AsyncClient, engine: FakeEngine, value: bytes, admin_code: str
) -> None:
    headers = {b"authorization": value}
    response = await client.get("/v1/models", headers=headers)
    assert_error(response, 401, param=None, code="invalid_api_key", error_type="authentication_error")
    response = await client.post(CHAT, json=chat_body(), headers=headers)
    assert_error(response, 401, param=None, code="invalid_api_key", error_type="authentication_error")
    response = await client.get("/admin/adapters", headers=headers)
    assert_error(response, 401, param=None, code=admin_code, error_type="authentication_error")
    assert KEY not in response.text
    assert ADMIN_TOKEN not in response.text
    assert engine.requests == []
    await assert_still_serving(client, engine, KEY_AUTH)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
async def test_the_scheme_is_case_insensitive(client: httpx.AsyncClient, scheme: str) -> None:
    assert (await client.get("/v1/models", headers={"Authorization": f"{scheme} {KEY}"})).status_code == 200
    admin = await client.get("/admin/adapters", headers={"Authorization": f"{scheme} {ADMIN_TOKEN}"})
    assert admin.status_code == 200


# ---------------------------------------------------------------------------- (d) the engine's own API

# vLLM's own endpoints that the gateway does not serve. /v1/completions, /v1/embeddings and
# /v1/responses are the gateway's routes now (classified in ROUTES, behind the API key): the
# engine's are reached only through the gateway's own parsing, never as vLLM exposes them.
ENGINE_ENDPOINTS = [
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/pooling"),
    ("POST", "/score"),
    ("POST", "/v1/score"),
    ("POST", "/rerank"),
    ("POST", "/v1/rerank"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/collective_rpc"),
    ("POST", "/start_profile"),
    ("POST", "/stop_profile"),
    ("GET", "/server_info"),
    ("GET", "/version"),
    # vLLM's stored responses: the gateway serves POST /v1/responses statelessly, nothing more
    ("GET", "/v1/responses/resp_0123"),
    ("POST", "/v1/responses/resp_0123/cancel"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/invocations"),
    ("POST", "/scale_elastic_ep"),
]


@pytest.mark.parametrize(("method", "path"), ENGINE_ENDPOINTS, ids=[f"{m} {p}" for m, p in ENGINE_ENDPOINTS])
async def test_the_engines_own_endpoints_are_not_reachable(
    client: httpx.AsyncClient, engine: FakeEngine, method: str, path: str
) -> None:
    for headers in (KEY_AUTH, ADMIN_AUTH):
        response = await client.request(
            method, path, json={"lora_name": "x", "lora_path": "/"}, headers=headers
        )
        error = assert_error(response, 404, param=None)
        assert path in error["message"]
    assert engine.requests == []
    await assert_still_serving(client, engine, KEY_AUTH)


async def test_metrics_are_the_gateways_own(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert "hybrid_requests_total" in response.text
    assert "vllm:" not in response.text
    assert engine.requests == []
