"""Bearer-token checks: client API keys on /v1 (when ``HYBRID_API_KEYS`` is set) and the admin
token on /admin. Comparisons are constant-time, so a wrong key's timing says nothing about the
right one."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import AuthenticationError
from service.settings import Settings


def bearer_token(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # RFC 7235: the scheme is case-insensitive ("bearer <key>" is accepted). The token is taken
    # as sent: a token with stray spaces is a different token, not a near miss.
    if scheme.lower() != "bearer" or not given:
        return None
    return given


def token_matches(given: str, expected: str) -> bool:
    # Header bytes arrive decoded as latin-1: encode them back the same way to compare bytes.
    return hmac.compare_digest(given.encode("latin-1"), expected.encode())


async def require_api_key(request: Request) -> None:
    """401 unless the request carries one of the configured API keys (no keys: open)."""
    keys: frozenset[str] = request.app.state.api_keys
    if not keys:
        return
    given = bearer_token(request)
    # Every key is compared, so the time taken does not tell which one came closest.
    if given is None or not sum(token_matches(given, key) for key in keys):
        raise AuthenticationError(
            "Incorrect or missing API key: send 'Authorization: Bearer <key>' with one of the "
            "gateway's keys (HYBRID_API_KEYS).",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_admin(request: Request) -> None:
    """401 without a bearer token or with one that is not the admin token: a wrong token
    identifies nobody (RFC 7235's 401; 403 is for a known caller without the right), and it is
    how OpenAI answers a wrong key."""
    settings: Settings = request.app.state.settings
    assert settings.admin_token is not None  # the admin routers are mounted only with a token
    given = bearer_token(request)
    if given is None:
        raise AuthenticationError(
            "The admin API needs 'Authorization: Bearer <HYBRID_ADMIN_TOKEN>'.",
            code="missing_admin_token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not token_matches(given, settings.admin_token.get_secret_value()):
        raise AuthenticationError(
            "The admin token is not valid.",
            code="invalid_admin_token",
            headers={"WWW-Authenticate": "Bearer"},
        )
