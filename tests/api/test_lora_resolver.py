"""``HYBRID_LORA_RESOLVER``: the engines (many replicas behind a router) load adapters from the
shared store themselves, by the id of the stored version. The gateway writes the store, checks
a new adapter with a one-token request, asks the engine for the version's id and shows clients
the adapter's name. (The real resolver, replicas and router: tests/e2e/test_replicas.py.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from adapters.store import VERSIONS_DIR
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
    running_gateway,
    store_dir_fixture,
    upload,
)
from tests.api.conftest import CHAT, chat_body, sse_json
from tests.fakes import FakeEngine
from tests.vllm_bodies import chunk


@pytest.fixture(name="settings")
def resolver_settings(base_dir: Path, import_dir: Path) -> Settings:
    return admin_settings(base_dir=base_dir, import_dir=import_dir, lora_resolver=True, adapter_sync_s=0.05)


def version_ids(store_dir: Path) -> list[str]:
    return sorted(entry.name for entry in (store_dir / VERSIONS_DIR).iterdir())


async def register(
    client: httpx.AsyncClient, engine: FakeEngine, name: str, adapter: Path, *, replace: bool = False
) -> str:
    """Register ``name`` (the engine answers the check) and return the id the engine was asked."""
    engine.enqueue_completion("A")
    response = await upload(client, name, adapter, replace=str(replace).lower())
    assert response.status_code in (200, 201), response.text
    probe = engine.last_chat_body
    assert probe["max_tokens"] == 1
    engine_id = probe["model"]
    assert isinstance(engine_id, str)
    return engine_id


async def test_a_registration_is_checked_by_the_engine_resolving_its_version(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    engine_id = await register(client, engine, "pirate", lora_adapter)
    # Nothing is pushed to the engine: it found the version in the store by its id.
    assert engine.load_requests == []
    assert version_ids(store_dir) == [engine_id]
    assert engine_id.startswith("pirate-")
    models = (await client.get("/v1/models")).json()["data"]
    assert [card["id"] for card in models] == [engine.base_model_id, "pirate", "auto"]
    assert models[1]["parent"] == engine.base_model_id


async def test_chat_asks_the_engine_for_the_version_and_answers_with_the_name(
    client: httpx.AsyncClient, engine: FakeEngine, lora_adapter: Path
) -> None:
    engine_id = await register(client, engine, "pirate", lora_adapter)

    engine.enqueue_completion("Arr.", model=engine_id)
    response = await client.post(CHAT, json=chat_body(model="pirate"))
    assert response.status_code == 200, response.text
    assert engine.last_chat_body["model"] == engine_id
    assert response.json()["model"] == "pirate"

    engine.enqueue_stream([chunk(role="assistant", model=engine_id), chunk("Arr.", model=engine_id)])
    streamed = await client.post(CHAT, json=chat_body(model="pirate", stream=True))
    events, done = sse_json(streamed)
    assert done == "[DONE]"
    assert {event["model"] for event in events} == {"pirate"}


async def test_a_replacement_is_a_new_id_so_no_replica_keeps_the_old_weights(
    client: httpx.AsyncClient, engine: FakeEngine, lora_adapter: Path, other_lora_adapter: Path
) -> None:
    first = await register(client, engine, "pirate", lora_adapter)
    second = await register(client, engine, "pirate", other_lora_adapter, replace=True)
    assert second != first
    engine.enqueue_completion("Arr.", model=second)
    assert (await client.post(CHAT, json=chat_body(model="pirate"))).status_code == 200
    assert engine.last_chat_body["model"] == second


async def test_a_deleted_adapter_is_gone_without_asking_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    await register(client, engine, "pirate", lora_adapter)
    assert (await client.delete(f"{ADMIN}/pirate", headers=AUTH)).status_code == 204
    assert engine.unload_requests == []
    assert version_ids(store_dir) == []
    response = await client.post(CHAT, json=chat_body(model="pirate"))
    assert response.status_code == 404


async def test_an_adapter_the_engine_cannot_find_is_not_kept(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    # What a replica without the resolver (or with another directory) answers.
    engine.enqueue_error(404, "The model `pirate-x` does not exist.", error_type="NotFoundError")
    response = await upload(client, "pirate", lora_adapter)
    error = assert_admin_error(response, 502, param=None, code="engine_error")
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" in error["message"]
    await assert_nothing_registered(client, engine, store_dir)


async def test_an_adapter_the_engine_cannot_load_is_refused_and_not_kept(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    engine.enqueue_error(400, "Loading lora pirate failed: shapes do not match")
    response = await upload(client, "pirate", lora_adapter)
    assert_admin_error(response, 400, param=None, code=None)
    await assert_nothing_registered(client, engine, store_dir)


async def test_the_stored_config_names_what_the_engine_loaded(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    # vLLM's resolver loads an adapter only when base_model_name_or_path equals its --model,
    # which /v1/models reports as the base's root.
    engine_id = await register(client, engine, "pirate", lora_adapter)
    config = json.loads((store_dir / VERSIONS_DIR / engine_id / "adapter_config.json").read_text())
    (base,) = (card for card in engine.models if card.get("parent") is None)
    assert config["base_model_name_or_path"] == base["root"]


async def test_a_gateway_serves_what_another_gateway_registered_in_the_shared_store(
    app: FastAPI, client: httpx.AsyncClient, engine: FakeEngine, settings: Settings, lora_adapter: Path
) -> None:
    shared = settings.model_copy(update={"adapter_dir": app.state.settings.adapter_store_dir})
    async with running_gateway(shared, engine, app.state.settings.data_dir / "other") as (_, other):
        engine_id = await register(other, engine, "pirate", lora_adapter)
        await until_listed(client, "pirate", listed=True)
        engine.enqueue_completion("Arr.", model=engine_id)
        assert (await client.post(CHAT, json=chat_body(model="pirate"))).status_code == 200
        assert engine.last_chat_body["model"] == engine_id

        assert (await other.delete(f"{ADMIN}/pirate", headers=AUTH)).status_code == 204
        await until_listed(client, "pirate", listed=False)
        assert (await client.post(CHAT, json=chat_body(model="pirate"))).status_code == 404


async def until_listed(client: httpx.AsyncClient, name: str, *, listed: bool) -> None:
    """Wait (5 s at most) for the gateway's periodic store sync to see ``name`` come or go."""
    async with asyncio.timeout(5):
        while True:
            models = (await client.get("/v1/models")).json()["data"]
            if (name in {card["id"] for card in models}) == listed:
                return
            await asyncio.sleep(0.05)
