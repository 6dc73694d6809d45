"""The admin API's client for the command line: the gateway's URL and admin token come from the
settings (``HYBRID_GATEWAY_URL``, ``HYBRID_ADMIN_TOKEN``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx

from service.settings import load_settings


def admin_client() -> httpx.Client:
    """A client with the admin token; the read timeout allows a large ingestion to finish."""
    settings = load_settings()
    if settings.admin_token is None:
        raise SystemExit("HYBRID_ADMIN_TOKEN is not set: the admin API needs it")
    return httpx.Client(
        base_url=settings.gateway_base_url,
        headers={"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"},
        timeout=httpx.Timeout(10.0, read=600.0),
    )


def report(response: httpx.Response) -> int:
    """Print the JSON answer, or the error's message on stderr; the exit code."""
    if response.status_code >= 400:
        print(error_message(response), file=sys.stderr)
        return 1
    if response.content:
        print(json.dumps(response.json(), indent=2))
    return 0


def error_message(response: httpx.Response) -> str:
    """``error <status>: <message>`` from the error envelope, or from the raw body."""
    try:
        return f"error {response.status_code}: {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"error {response.status_code}: {response.text[:500]}"


def upload_adapter(client: httpx.Client, directory: Path, fields: dict[str, Any]) -> httpx.Response:
    """POST the two PEFT files of ``directory`` with the registration ``fields`` as a form."""
    form = {
        k: json.dumps(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)
        for k, v in fields.items()
    }
    with (
        (directory / "adapter_config.json").open("rb") as config,
        (directory / "adapter_model.safetensors").open("rb") as weights,
    ):
        files = {
            "adapter_config": ("adapter_config.json", config, "application/json"),
            "adapter_model": ("adapter_model.safetensors", weights, "application/octet-stream"),
        }
        return client.post("/admin/adapters", data=form, files=files)
