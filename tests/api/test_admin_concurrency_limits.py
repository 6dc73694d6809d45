"""Registrations at the same time (different names proceed in parallel, one name is taken once),
and the admin API's own, larger body limit beside the chat route's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE
from service.settings import Settings
from tests.api.admin_support import (  # noqa: F401 (fixtures, under their pytest names)
    ADMIN,
    AUTH,
    admin_settings,
    assert_admin_error,
    assert_nothing_registered,
    base_dir_fixture,
    engine_fixture,
    import_dir_fixture,
    settings_fixture,
    store_dir_fixture,
    store_entries,
    upload,
)
from tests.api.conftest import CHAT, GATEWAY_URL, assert_error, chat_body
from tests.fakes import FakeEngine

# ---------------------------------------------------------------------------- concurrency


async def test_ten_registrations_at_once_are_all_loaded(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    engine.load_delay_s = 0.2  # long enough for the loads to overlap if nothing serialises them
    names = [f"tenant-{i}" for i in range(10)]

    responses = await asyncio.gather(*(upload(client, name, lora_adapter) for name in names))

    assert [r.status_code for r in responses] == [201] * 10, [r.text for r in responses]
    assert sorted(r.json()["name"] for r in responses) == names
    assert sorted(engine.loras) == names
    assert len(set(engine.loras.values())) == 10  # one version directory each
    # One lock per name: different names are loaded in parallel.
    assert engine.peak_concurrent_loads > 1
    listed = (await client.get(ADMIN, headers=AUTH)).json()["data"]
    assert [record["name"] for record in listed] == names
    link_names, versions = store_entries(store_dir)
    assert link_names == names
    assert len(versions) == 10


async def test_two_registrations_of_one_name_at_once_one_wins(
    client: httpx.AsyncClient, engine: FakeEngine, lora_adapter: Path, other_lora_adapter: Path
) -> None:
    engine.load_delay_s = 0.1
    responses = await asyncio.gather(
        upload(client, "pirate", lora_adapter), upload(client, "pirate", other_lora_adapter)
    )

    assert sorted(r.status_code for r in responses) == [201, 409], [r.text for r in responses]
    (won,) = (r for r in responses if r.status_code == 201)
    (lost,) = (r for r in responses if r.status_code == 409)
    assert_admin_error(lost, 409, param="name", code="adapter_exists")
    (load,) = engine.load_requests
    assert engine.loras == {"pirate": load["lora_path"]}
    shown = (await client.get(f"{ADMIN}/pirate", headers=AUTH)).json()
    assert shown == won.json()


# ---------------------------------------------------------------------------- body limits

CHAT_LIMIT = 64 * 1024
ADMIN_LIMIT = 4 * 1024 * 1024  # above the real adapter's ~1.9 MB


class TestBodyLimits:
    @pytest.fixture
    def settings(self, base_dir: Path, import_dir: Path) -> Settings:
        return admin_settings(
            base_dir=base_dir, import_dir=import_dir, max_body_bytes=CHAT_LIMIT, max_upload_bytes=ADMIN_LIMIT
        )

    async def test_an_upload_larger_than_the_chat_limit_is_accepted(
        self, client: httpx.AsyncClient, engine: FakeEngine, lora_adapter: Path
    ) -> None:
        assert (lora_adapter / WEIGHTS_FILE).stat().st_size > CHAT_LIMIT
        response = await upload(client, "pirate", lora_adapter)
        assert response.status_code == 201, response.text
        assert set(engine.loras) == {"pirate"}

    async def test_an_upload_over_the_admin_limit_is_413(
        self, client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
    ) -> None:
        padded = (lora_adapter / WEIGHTS_FILE).read_bytes() + b"\x00" * ADMIN_LIMIT
        response = await upload(client, "pirate", lora_adapter, weights=padded)
        error = assert_admin_error(response, 413, param=None, code=None)
        assert str(ADMIN_LIMIT) in error["message"]
        await assert_nothing_registered(client, engine, store_dir)

    async def test_a_chunked_upload_over_the_admin_limit_is_413(
        self, client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
    ) -> None:
        files = {
            "adapter_config": (CONFIG_FILE, (lora_adapter / CONFIG_FILE).read_bytes()),
            "adapter_model": (WEIGHTS_FILE, b"\x00" * (2 * ADMIN_LIMIT)),
        }
        prepared = httpx.Request("POST", GATEWAY_URL + ADMIN, data={"name": "pirate"}, files=files)
        body = prepared.read()
        pieces = [body[start : start + 256 * 1024] for start in range(0, len(body), 256 * 1024)]
        sent: list[bytes] = []

        async def chunks() -> AsyncIterator[bytes]:
            for piece in pieces:
                sent.append(piece)
                yield piece

        headers = {**AUTH, "content-type": prepared.headers["content-type"]}
        response = await client.post(ADMIN, content=chunks(), headers=headers)
        assert "content-length" not in response.request.headers
        assert_admin_error(response, 413, param=None, code=None)
        assert len(sent) < len(pieces)  # refused once past the limit, not after reading it all
        await assert_nothing_registered(client, engine, store_dir)

    async def test_the_chat_route_keeps_its_smaller_limit(
        self, client: httpx.AsyncClient, engine: FakeEngine
    ) -> None:
        content = "x" * (CHAT_LIMIT + 1)
        response = await client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": content}]))
        error = assert_error(response, 413, param=None)
        assert str(CHAT_LIMIT) in error["message"]
        assert engine.chat_requests == []

    async def test_a_json_registration_over_the_chat_limit_is_not_refused_for_size(
        self, client: httpx.AsyncClient, engine: FakeEngine, import_dir: Path
    ) -> None:
        # Long example lists are admin business: the admin limit applies, not the chat one.
        body = {"name": "pirate", "path": "missing", "examples": ["x" * 1000] * 100}
        assert len(json.dumps(body)) > CHAT_LIMIT
        response = await client.post(ADMIN, json=body, headers=AUTH)
        assert_admin_error(response, 400, param="path", code="invalid_adapter")
