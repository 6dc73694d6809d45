"""The engine's adapters follow the store: on start the gateway loads what the store holds and
unloads what it does not; after an engine restart a registered adapter is a 503 with
Retry-After (not a 404) until it is loaded again."""

from __future__ import annotations

import asyncio
from pathlib import Path

from adapters.store import AdapterStore
from service.settings import Settings
from tests.api.admin_support import (  # noqa: F401 (fixtures, under their pytest names)
    ADMIN,
    AUTH,
    BASE_ID,
    assert_admin_error,
    base_dir_fixture,
    engine_fixture,
    import_dir_fixture,
    running_gateway,
    settings_fixture,
    store_adapter,
    upload,
)
from tests.api.conftest import CHAT, chat_body
from tests.fakes import FakeEngine


async def test_start_up_loads_the_store_and_unloads_strangers(
    settings: Settings,
    engine: FakeEngine,
    tmp_path: Path,
    base_dir: Path,
    lora_adapter: Path,
    other_lora_adapter: Path,
) -> None:
    store = AdapterStore(tmp_path / "adapters")
    pirate = store_adapter(store, "pirate", lora_adapter, base_dir)
    poet = store_adapter(store, "poet", other_lora_adapter, base_dir)
    engine.loras = {"stranger": "/elsewhere/stranger"}  # loaded by someone else, unknown to the store

    async with running_gateway(settings, engine, tmp_path) as (_, client):
        assert engine.unload_requests == [{"lora_name": "stranger"}]
        assert sorted(engine.load_requests, key=lambda body: str(body["lora_name"])) == [
            {"lora_name": "pirate", "lora_path": str(pirate.path), "load_inplace": False},
            {"lora_name": "poet", "lora_path": str(poet.path), "load_inplace": False},
        ]
        assert engine.loras == {"pirate": str(pirate.path), "poet": str(poet.path)}

        listed = (await client.get(ADMIN, headers=AUTH)).json()["data"]
        assert [(r["name"], r["sha256"]) for r in listed] == [
            ("pirate", pirate.manifest.sha256),
            ("poet", poet.manifest.sha256),
        ]
        models = (await client.get("/v1/models")).json()["data"]
        assert sorted(card["id"] for card in models) == sorted([BASE_ID, "pirate", "poet", "auto"])
        engine.enqueue_completion(model="poet")
        response = await client.post(CHAT, json=chat_body(model="poet"))
        assert response.status_code == 200, response.text
        assert engine.last_chat_body["model"] == "poet"


async def test_start_up_keeps_what_the_engine_already_serves(
    settings: Settings, engine: FakeEngine, tmp_path: Path, base_dir: Path, lora_adapter: Path
) -> None:
    pirate = store_adapter(AdapterStore(tmp_path / "adapters"), "pirate", lora_adapter, base_dir)
    engine.loras = {"pirate": str(pirate.path)}
    async with running_gateway(settings, engine, tmp_path):
        assert engine.load_requests == []
        assert engine.unload_requests == []
        assert engine.loras == {"pirate": str(pirate.path)}


async def test_start_up_reloads_an_adapter_the_engine_serves_from_an_older_version(
    settings: Settings, engine: FakeEngine, tmp_path: Path, base_dir: Path, lora_adapter: Path
) -> None:
    # E.g. the gateway died between swapping the store's version and loading it into the engine.
    pirate = store_adapter(AdapterStore(tmp_path / "adapters"), "pirate", lora_adapter, base_dir)
    engine.loras = {"pirate": str(pirate.path.parent / "pirate-0123456789abcdef0123456789abcdef")}
    async with running_gateway(settings, engine, tmp_path):
        assert engine.loras == {"pirate": str(pirate.path)}


async def test_a_registration_during_reconciliation_is_served(
    settings: Settings,
    engine: FakeEngine,
    tmp_path: Path,
    base_dir: Path,
    lora_adapter: Path,
    other_lora_adapter: Path,
) -> None:
    store = AdapterStore(tmp_path / "adapters")
    stored = ["pirate", "poet", "scribe", "tutor"]
    for name in stored:
        store_adapter(store, name, lora_adapter, base_dir)
    # The start-up reconciliation loads four, one after the other: 1 s, while the registration
    # below takes one load (0.25 s) and finishes well before.
    engine.load_delay_s = 0.25
    async with running_gateway(settings, engine, tmp_path, reconciled=False) as (app, client):
        # Reconciliation is loading the store's adapters (so the base model is known).
        await asyncio.wait_for(engine.load_started.wait(), timeout=5)
        response = await upload(client, "sailor", other_lora_adapter)
        assert response.status_code == 201, response.text
        await asyncio.wait_for(app.state.adapters.wait_reconciled(), timeout=5)

        assert sorted(engine.loras) == sorted([*stored, "sailor"])
        # What a chat request resolves by (checked first: a failed chat would leave its
        # enqueued reply unused).
        assert app.state.adapters.is_registered("sailor")
        engine.enqueue_completion(model="sailor")
        response = await client.post(CHAT, json=chat_body(model="sailor"))
        assert response.status_code == 200, response.text


async def test_start_up_with_an_empty_store_unloads_everything(
    settings: Settings, engine: FakeEngine, tmp_path: Path
) -> None:
    engine.loras = {"a": "/x/a", "b": "/x/b"}
    async with running_gateway(settings, engine, tmp_path):
        assert engine.load_requests == []
        assert sorted(body["lora_name"] for body in engine.unload_requests) == ["a", "b"]
        assert engine.loras == {}


async def test_after_an_engine_restart_a_registered_adapter_is_503_until_reloaded(
    settings: Settings, engine: FakeEngine, tmp_path: Path, lora_adapter: Path
) -> None:
    async with running_gateway(settings, engine, tmp_path) as (app, client):
        assert (await upload(client, "pirate", lora_adapter)).status_code == 201
        (first_load,) = engine.load_requests
        engine.requests.clear()

        # The engine restarts: it comes back with no adapters, and the gateway is told.
        engine.loras.clear()
        app.state.adapters.engine_lost()

        response = await client.post(CHAT, json=chat_body(model="pirate"))
        error = assert_admin_error(response, 503, param=None, code="engine_unavailable")
        assert "pirate" in error["message"]
        assert response.headers["retry-after"] == str(settings.retry_after_s)
        assert engine.chat_requests == []
        # The store is the truth meanwhile: the adapter is still registered.
        shown = await client.get(f"{ADMIN}/pirate", headers=AUTH)
        assert shown.status_code == 200
        # The base model is not held up by the adapters.
        engine.enqueue_completion(model=BASE_ID)
        assert (await client.post(CHAT, json=chat_body())).status_code == 200

        await app.state.adapters.reconcile()

        assert engine.load_requests == [first_load]
        assert engine.loras == {"pirate": first_load["lora_path"]}
        engine.enqueue_completion(model="pirate")
        response = await client.post(CHAT, json=chat_body(model="pirate"))
        assert response.status_code == 200, response.text
        assert engine.last_chat_body["model"] == "pirate"


async def test_an_adapter_the_engine_refuses_at_start_up_is_503_not_404(
    settings: Settings,
    engine: FakeEngine,
    tmp_path: Path,
    base_dir: Path,
    lora_adapter: Path,
    other_lora_adapter: Path,
) -> None:
    store = AdapterStore(tmp_path / "adapters")
    store_adapter(store, "pirate", lora_adapter, base_dir)
    poet = store_adapter(store, "poet", other_lora_adapter, base_dir)
    engine.fail_next_load = (500, "Loading lora pirate failed")  # loads go in name order
    async with running_gateway(settings, engine, tmp_path) as (_, client):
        assert engine.loras == {"poet": str(poet.path)}
        response = await client.post(CHAT, json=chat_body(model="pirate"))
        assert_admin_error(response, 503, param=None, code="engine_unavailable")
        assert "retry-after" in response.headers
        engine.enqueue_completion(model="poet")
        assert (await client.post(CHAT, json=chat_body(model="poet"))).status_code == 200
