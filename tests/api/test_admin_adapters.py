"""Registering adapters through the admin API, with real PEFT adapters and a fake engine that
keeps its LoRA set as vLLM does: upload and import path, list and show, use by name in chat,
replace, delete, and an engine that refuses the load."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from adapters.store import VERSIONS_DIR
from service.bundled_model import HF_ID
from service.settings import Settings
from tests.api.admin_support import (  # noqa: F401 (fixtures, under their pytest names)
    ADMIN,
    AUTH,
    BASE_ID,
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
from tests.api.conftest import CHAT, assert_error, chat_body
from tests.fakes import FakeEngine


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def chat_with(client: httpx.AsyncClient, engine: FakeEngine, model: str) -> httpx.Response:
    """A chat request for ``model``, which the engine is expected to get and answer."""
    engine.enqueue_completion(model=model)
    return await client.post(CHAT, json=chat_body(model=model))


# ---------------------------------------------------------------------------- register by upload


async def test_an_upload_is_registered_loaded_listed_and_served(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    response = await upload(
        client,
        "pirate",
        lora_adapter,
        description="Answers like a pirate.",
        examples=json.dumps(["Where is the treasure?", "Ahoy, how are you?"]),
        threshold="0.4",
    )

    assert response.status_code == 201, response.text
    record: dict[str, Any] = response.json()
    assert record == {
        **record,
        "object": "adapter",
        "name": "pirate",
        "description": "Answers like a pirate.",
        "examples": ["Where is the treasure?", "Ahoy, how are you?"],
        "threshold": 0.4,
        "rank": 8,
        "alpha": 16.0,
        "target_modules": ["q_proj", "v_proj"],
        "sha256": sha256_of(lora_adapter / WEIGHTS_FILE),
        "base_model": HF_ID,
    }
    created = datetime.fromisoformat(record["created_at"])
    assert created.tzinfo is not None
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=1)

    # Loaded into the engine from the store's version directory, never from the upload.
    (load,) = engine.load_requests
    version = Path(load["lora_path"])
    assert load == {"lora_name": "pirate", "lora_path": str(version), "load_inplace": False}
    assert version.parent == store_dir / VERSIONS_DIR
    assert version.name.startswith("pirate-")
    assert (version / WEIGHTS_FILE).read_bytes() == (lora_adapter / WEIGHTS_FILE).read_bytes()
    # The stored config names what the engine loaded, its base's `root` (vLLM's filesystem
    # resolver compares the two).
    assert json.loads((version / CONFIG_FILE).read_bytes())["base_model_name_or_path"] == f"/models/{BASE_ID}"
    assert engine.loras == {"pirate": str(version)}
    assert store_entries(store_dir) == (["pirate"], [version.name])

    models = (await client.get("/v1/models")).json()["data"]
    assert [card["id"] for card in models] == [BASE_ID, "pirate", "auto"]
    assert models[1]["parent"] == BASE_ID
    assert "root" not in models[1]  # a path on the engine's disk

    listed = await client.get(ADMIN, headers=AUTH)
    assert listed.json() == {"object": "list", "data": [record]}
    shown = await client.get(f"{ADMIN}/pirate", headers=AUTH)
    assert shown.status_code == 200
    assert shown.json() == record

    served = await chat_with(client, engine, "pirate")
    assert served.status_code == 200, served.text
    assert engine.last_chat_body["model"] == "pirate"
    assert served.json()["model"] == "pirate"


async def test_a_streamed_chat_reaches_the_adapter(
    client: httpx.AsyncClient, engine: FakeEngine, lora_adapter: Path
) -> None:
    assert (await upload(client, "pirate", lora_adapter)).status_code == 201
    engine.enqueue_stream([])
    async with client.stream("POST", CHAT, json=chat_body(model="pirate", stream=True)) as response:
        assert response.status_code == 200
        await response.aread()
    assert engine.last_chat_body["model"] == "pirate"


async def test_an_unknown_name_is_404(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.get(f"{ADMIN}/pirate", headers=AUTH)
    assert_admin_error(response, 404, param="name", code="adapter_not_found")
    response = await client.post(CHAT, json=chat_body(model="pirate"))
    assert_error(response, 404, param="model", code="model_not_found")
    assert engine.chat_requests == []


# ---------------------------------------------------------------------------- register by import path


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
async def test_an_import_path_is_registered(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    import_dir: Path,
    store_dir: Path,
    lora_adapter: Path,
    absolute: bool,
) -> None:
    source = import_dir / "team" / "pirate"
    shutil.copytree(lora_adapter, source)
    body = {
        "name": "pirate",
        "path": str(source) if absolute else "team/pirate",
        "description": "Answers like a pirate.",
        "examples": ["Where is the treasure?"],
    }
    response = await client.post(ADMIN, json=body, headers=AUTH)

    assert response.status_code == 201, response.text
    record = response.json()
    assert record["name"] == "pirate"
    assert record["examples"] == ["Where is the treasure?"]
    assert record["sha256"] == sha256_of(lora_adapter / WEIGHTS_FILE)
    (load,) = engine.load_requests
    # Copied into the store: the engine never reads the import directory.
    assert Path(load["lora_path"]).parent == store_dir / VERSIONS_DIR
    assert engine.loras == {"pirate": load["lora_path"]}
    assert (await chat_with(client, engine, "pirate")).status_code == 200


def _escaping_link(import_dir: Path, outside: Path) -> str:
    (import_dir / "escape").symlink_to(outside, target_is_directory=True)
    return "escape"


PATHS_REFUSED = {
    "dot-dot": lambda import_dir, outside: "../x",
    "dot-dot-inside": lambda import_dir, outside: "team/../../x",
    "absolute-outside": lambda import_dir, outside: str(outside),
    "etc": lambda import_dir, outside: "/etc",
    "file-url": lambda import_dir, outside: "file:///etc",
    "http-url": lambda import_dir, outside: "http://x",
    "https-url": lambda import_dir, outside: "https://example.com/adapter",
    "unc": lambda import_dir, outside: "//server/share",
    "symlink-escaping": _escaping_link,
    "missing": lambda import_dir, outside: "no-such-adapter",
}


@pytest.mark.parametrize("make_path", PATHS_REFUSED.values(), ids=PATHS_REFUSED.keys())
async def test_an_import_path_outside_the_import_dir_is_400(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    import_dir: Path,
    store_dir: Path,
    lora_adapter: Path,
    make_path: Any,
) -> None:
    path = make_path(import_dir, lora_adapter)
    response = await client.post(ADMIN, json={"name": "pirate", "path": path}, headers=AUTH)
    assert_admin_error(response, 400, param="path", code="invalid_adapter")
    await assert_nothing_registered(client, engine, store_dir)


async def test_an_import_dir_holding_a_pickle_is_400(
    client: httpx.AsyncClient, engine: FakeEngine, import_dir: Path, store_dir: Path, lora_adapter: Path
) -> None:
    source = import_dir / "pickled"
    shutil.copytree(lora_adapter, source)
    (source / WEIGHTS_FILE).rename(source / "adapter_model.bin")
    response = await client.post(ADMIN, json={"name": "pirate", "path": "pickled"}, headers=AUTH)
    error = assert_admin_error(response, 400, param="path", code="invalid_adapter")
    assert "safetensors" in error["message"]
    await assert_nothing_registered(client, engine, store_dir)


class TestWithoutAnImportDir:
    @pytest.fixture
    def settings(self, base_dir: Path) -> Settings:
        return admin_settings(base_dir=base_dir, import_dir=None)

    async def test_a_path_is_refused_only_uploads(
        self, client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
    ) -> None:
        body = {"name": "pirate", "path": str(lora_adapter)}
        response = await client.post(ADMIN, json=body, headers=AUTH)
        error = assert_admin_error(response, 400, param="path", code="invalid_adapter")
        assert "only uploads" in error["message"]
        await assert_nothing_registered(client, engine, store_dir)

    async def test_an_upload_is_accepted(
        self, client: httpx.AsyncClient, engine: FakeEngine, lora_adapter: Path
    ) -> None:
        assert (await upload(client, "pirate", lora_adapter)).status_code == 201
        assert set(engine.loras) == {"pirate"}


# ---------------------------------------------------------------------------- training prompts

PROMPTS = ["Where is the treasure buried?", "Which way to Tortuga?", "How many cannons has the brig?"]


def stored_training_prompts(store_dir: Path, name: str) -> list[str]:
    """The training prompts in the manifest the store holds for ``name``."""
    prompts: list[str] = json.loads((store_dir / name / MANIFEST_FILE).read_bytes())["training_prompts"]
    return prompts


async def test_an_upload_carries_its_training_prompts_shown_as_a_count(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    response = await upload(client, "pirate", lora_adapter, training_prompts=json.dumps(PROMPTS))

    assert response.status_code == 201, response.text
    record = response.json()
    assert record["training_prompts"] == 3
    assert record["examples"] == []
    assert (await client.get(f"{ADMIN}/pirate", headers=AUTH)).json() == record
    assert (await client.get(ADMIN, headers=AUTH)).json()["data"] == [record]
    assert stored_training_prompts(store_dir, "pirate") == PROMPTS


async def test_an_import_path_carries_its_training_prompts(
    client: httpx.AsyncClient, engine: FakeEngine, import_dir: Path, store_dir: Path, lora_adapter: Path
) -> None:
    shutil.copytree(lora_adapter, import_dir / "pirate")
    body = {"name": "pirate", "path": "pirate", "examples": PROMPTS[:1], "training_prompts": PROMPTS}
    response = await client.post(ADMIN, json=body, headers=AUTH)

    assert response.status_code == 201, response.text
    assert response.json()["training_prompts"] == 3
    assert response.json()["examples"] == PROMPTS[:1]
    assert stored_training_prompts(store_dir, "pirate") == PROMPTS


async def test_an_adapter_registered_without_training_prompts_has_none(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    record = (await upload(client, "pirate", lora_adapter)).json()
    assert record["training_prompts"] == 0
    assert stored_training_prompts(store_dir, "pirate") == []


async def test_patch_replaces_the_training_prompts_and_only_them(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    first = (
        await upload(
            client,
            "pirate",
            lora_adapter,
            description="Answers like a pirate.",
            examples=json.dumps(["Ahoy?"]),
            training_prompts=json.dumps(PROMPTS),
        )
    ).json()

    patched = await client.patch(f"{ADMIN}/pirate", json={"training_prompts": ["Arr?"]}, headers=AUTH)
    assert patched.status_code == 200, patched.text
    assert patched.json() == {**first, "training_prompts": 1}
    assert stored_training_prompts(store_dir, "pirate") == ["Arr?"]

    # A PATCH that leaves them out leaves them as they are.
    described = await client.patch(
        f"{ADMIN}/pirate", json={"description": "Talks like a pirate."}, headers=AUTH
    )
    assert described.json()["training_prompts"] == 1
    assert stored_training_prompts(store_dir, "pirate") == ["Arr?"]

    emptied = await client.patch(f"{ADMIN}/pirate", json={"training_prompts": []}, headers=AUTH)
    assert emptied.json()["training_prompts"] == 0
    assert stored_training_prompts(store_dir, "pirate") == []
    assert (await client.get(f"{ADMIN}/pirate", headers=AUTH)).json() == emptied.json()


async def test_5000_training_prompts_of_2000_characters_are_accepted(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    # Escaped by the JSON encoding to six bytes a character: the form field's limit must allow it.
    prompts = [f"{i:04d}" + "é" * 1996 for i in range(5000)]
    response = await upload(client, "pirate", lora_adapter, training_prompts=json.dumps(prompts))
    assert response.status_code == 201, response.text
    assert response.json()["training_prompts"] == 5000
    assert stored_training_prompts(store_dir, "pirate") == prompts


TRAINING_PROMPTS_REFUSED = {
    "not-a-list": ("Where is the treasure?", "training_prompts"),
    "not-strings": ([1, 2], "training_prompts[0]"),
    "null-entry": (["Ahoy?", None], "training_prompts[1]"),
    "too-many": (["Ahoy?"] * 5001, "training_prompts"),
    "too-long": (["Ahoy?", "a" * 2001], "training_prompts[1]"),
    "empty": (["Ahoy?", ""], "training_prompts[1]"),
    "blank": (["Ahoy?", "Arr?", " \n\t "], "training_prompts[2]"),
}


@pytest.mark.parametrize(
    ("value", "param"), TRAINING_PROMPTS_REFUSED.values(), ids=TRAINING_PROMPTS_REFUSED.keys()
)
async def test_invalid_training_prompts_are_400_on_every_path(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    import_dir: Path,
    store_dir: Path,
    lora_adapter: Path,
    value: Any,
    param: str,
) -> None:
    shutil.copytree(lora_adapter, import_dir / "pirate")
    body = {"name": "pirate", "path": "pirate", "training_prompts": value}
    assert_admin_error(await client.post(ADMIN, json=body, headers=AUTH), 400, param=param, code=None)
    uploaded = await upload(client, "pirate", lora_adapter, training_prompts=json.dumps(value))
    assert_admin_error(uploaded, 400, param=param, code=None)
    await assert_nothing_registered(client, engine, store_dir)

    assert (
        await upload(client, "pirate", lora_adapter, training_prompts=json.dumps(PROMPTS))
    ).status_code == 201
    patched = await client.patch(f"{ADMIN}/pirate", json={"training_prompts": value}, headers=AUTH)
    error = assert_admin_error(patched, 400, param=param, code=None)
    if "blank" in error["message"]:
        assert param.endswith("]")
    assert stored_training_prompts(store_dir, "pirate") == PROMPTS


# ---------------------------------------------------------------------------- replace, delete


async def test_a_taken_name_is_409_unless_replace_which_swaps_it(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    store_dir: Path,
    lora_adapter: Path,
    other_lora_adapter: Path,
) -> None:
    first = (await upload(client, "pirate", lora_adapter)).json()
    (first_load,) = engine.load_requests

    taken = await upload(client, "pirate", other_lora_adapter)
    assert_admin_error(taken, 409, param="name", code="adapter_exists")
    assert len(engine.load_requests) == 1
    assert (await client.get(f"{ADMIN}/pirate", headers=AUTH)).json() == first

    replaced = await upload(client, "pirate", other_lora_adapter, replace="true")
    assert replaced.status_code == 201, replaced.text
    second = replaced.json()
    assert second["sha256"] == sha256_of(other_lora_adapter / WEIGHTS_FILE) != first["sha256"]
    assert second["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    _, second_load = engine.load_requests
    # Swapped in place, from a new version directory (vLLM must not reuse the old one's cache).
    assert second_load["load_inplace"] is True
    assert second_load["lora_path"] != first_load["lora_path"]
    assert Path(second_load["lora_path"]).parent == store_dir / VERSIONS_DIR
    assert engine.loras == {"pirate": second_load["lora_path"]}
    assert (await client.get(f"{ADMIN}/pirate", headers=AUTH)).json() == second
    # The superseded version stays on disk for the requests still running on it.
    versions = sorted(Path(load["lora_path"]).name for load in (first_load, second_load))
    assert store_entries(store_dir) == (["pirate"], versions)
    assert (await chat_with(client, engine, "pirate")).status_code == 200


async def test_replace_of_an_unknown_name_registers_it(
    client: httpx.AsyncClient, engine: FakeEngine, lora_adapter: Path
) -> None:
    response = await upload(client, "pirate", lora_adapter, replace="true")
    assert response.status_code == 201, response.text
    (load,) = engine.load_requests
    assert load["load_inplace"] is False
    assert set(engine.loras) == {"pirate"}


async def test_delete_unloads_forgets_and_stops_serving(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    assert (await upload(client, "pirate", lora_adapter)).status_code == 201

    deleted = await client.delete(f"{ADMIN}/pirate", headers=AUTH)
    assert deleted.status_code == 204
    assert deleted.content == b""

    assert engine.unload_requests == [{"lora_name": "pirate"}]
    assert engine.loras == {}
    shown = await client.get(f"{ADMIN}/pirate", headers=AUTH)
    assert_admin_error(shown, 404, param="name", code="adapter_not_found")
    assert (await client.get(ADMIN, headers=AUTH)).json()["data"] == []
    assert store_entries(store_dir) == ([], [])
    models = (await client.get("/v1/models")).json()["data"]
    assert [card["id"] for card in models] == [BASE_ID, "auto"]
    response = await client.post(CHAT, json=chat_body(model="pirate"))
    assert_error(response, 404, param="model", code="model_not_found")
    assert engine.chat_requests == []

    again = await client.delete(f"{ADMIN}/pirate", headers=AUTH)
    assert_admin_error(again, 404, param="name", code="adapter_not_found")
    # The name is free again.
    assert (await upload(client, "pirate", lora_adapter)).status_code == 201


@pytest.mark.parametrize("name", ["nobody", "Bad Name", "auto", "x" * 65])
async def test_delete_of_an_unknown_name_is_404(
    client: httpx.AsyncClient, engine: FakeEngine, name: str
) -> None:
    response = await client.delete(f"{ADMIN}/{name}", headers=AUTH)
    assert_admin_error(response, 404, param="name", code="adapter_not_found")
    assert engine.unload_requests == []


# ---------------------------------------------------------------------------- the engine refuses


async def test_an_adapter_the_engine_refuses_is_not_kept(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    engine.fail_next_load = (500, "Loading lora pirate failed: CUDA out of memory")
    response = await upload(client, "pirate", lora_adapter)

    error = assert_admin_error(response, 502, param=None, code="engine_error")
    assert "CUDA out of memory" in error["message"]
    assert len(engine.load_requests) == 1
    engine.requests.clear()
    await assert_nothing_registered(client, engine, store_dir)
    response = await client.post(CHAT, json=chat_body(model="pirate"))
    assert_error(response, 404, param="model", code="model_not_found")
    # Nothing half-registered blocks a retry.
    assert (await upload(client, "pirate", lora_adapter)).status_code == 201
    assert set(engine.loras) == {"pirate"}


async def test_a_replacement_the_engine_refuses_leaves_the_old_version(
    client: httpx.AsyncClient, engine: FakeEngine, lora_adapter: Path, other_lora_adapter: Path
) -> None:
    first = (await upload(client, "pirate", lora_adapter)).json()
    engine.fail_next_load = (500, "Loading lora pirate failed")
    response = await upload(client, "pirate", other_lora_adapter, replace="true")
    assert_admin_error(response, 502, param=None, code="engine_error")
    # The engine still serves the first version: the store must say so too.
    assert (await client.get(f"{ADMIN}/pirate", headers=AUTH)).json() == first
