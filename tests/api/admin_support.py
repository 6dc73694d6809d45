"""What the admin API tests share: a gateway with an admin token in front of a fake engine that
serves the bundled model's id, real PEFT adapters, and the helpers that upload them and check
that a refused registration left nothing behind.

The fixtures are declared under their pytest names (``settings``, ``engine``, ...) and imported
by the test modules, where they override the API tier's defaults from ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, AdapterManifest
from adapters.store import ROUTER_DIR, VERSIONS_DIR, AdapterRecord, AdapterStore
from adapters.validation import BaseModelInfo, validate_adapter
from service.app import build_app
from service.bundled_model import HF_ID, SERVED_NAME
from service.settings import Settings
from tests.api.conftest import GATEWAY_URL, assert_error, make_settings
from tests.fakes import FakeEngine
from tests.vllm_bodies import model_card

TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE_ID = SERVED_NAME
"""The fake engine serves the bundled model's id, so that real adapters made on it validate."""
ADMIN = "/admin/adapters"
MAX_RANK = 16

_ERROR_TYPES = {401: "authentication_error"}


def admin_settings(*, base_dir: Path, import_dir: Path | None, **overrides: Any) -> Settings:
    """Settings of a gateway whose admin API is on, checking adapters against the bundled model."""
    return make_settings(
        **{
            "admin_token": TOKEN,
            "adapter_import_dir": import_dir,
            "base_model_dir": base_dir,
            "base_model_hf_id": HF_ID,
            "max_lora_rank": MAX_RANK,
            **overrides,
        }
    )


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session", name="base_dir")
def base_dir_fixture(bundled_base_dir: Path) -> Path:
    """The admin tests' name for the bundled base model (tests/conftest.py provides it)."""
    return bundled_base_dir


@pytest.fixture(name="import_dir")
def import_dir_fixture(tmp_path: Path) -> Path:
    path = tmp_path / "import"
    path.mkdir()
    return path


@pytest.fixture(name="settings")
def settings_fixture(base_dir: Path, import_dir: Path) -> Settings:
    return admin_settings(base_dir=base_dir, import_dir=import_dir)


@pytest.fixture(name="engine")
async def engine_fixture() -> AsyncIterator[FakeEngine]:
    engine = FakeEngine(models=[model_card(BASE_ID)])
    await engine.start()
    yield engine
    await engine.stop()
    assert engine.pending == 0, f"{engine.pending} enqueued engine replies were never used"
    assert engine.unexpected == 0, "the engine got a chat request with no reply enqueued"


@pytest.fixture(name="store_dir")
def store_dir_fixture(tmp_path: Path) -> Path:
    """The adapter store of the ``app`` fixture's gateway (its data directory is ``tmp_path``)."""
    return tmp_path / "adapters"


@asynccontextmanager
async def running_gateway(
    settings: Settings, engine: FakeEngine, data_dir: Path, *, reconciled: bool = True
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """Like the ``app`` and ``client`` fixtures, for a test that prepares things before the start
    (the engine's requests are not cleared: start-up reconciliation is visible). With
    ``reconciled=False`` the test runs while the start-up reconciliation may still be going on."""
    app = build_app(settings.model_copy(update={"engine_url": engine.url, "data_dir": data_dir}))
    async with app.router.lifespan_context(app):
        if reconciled:
            await asyncio.wait_for(app.state.adapters.wait_reconciled(), timeout=5)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=GATEWAY_URL) as client:
            yield app, client


# ---------------------------------------------------------------------------- requests


async def upload(
    client: httpx.AsyncClient,
    name: str,
    adapter: Path,
    *,
    config: bytes | None = None,
    weights: bytes | None = None,
    weights_filename: str = WEIGHTS_FILE,
    headers: Mapping[str, str] | Mapping[bytes, bytes] | None = None,
    **fields: str,
) -> httpx.Response:
    """Register by multipart upload: the two PEFT files of ``adapter`` (or the bytes given), the
    name and any other form ``fields``."""
    files = {
        "adapter_config": (
            CONFIG_FILE,
            config if config is not None else (adapter / CONFIG_FILE).read_bytes(),
            "application/json",
        ),
        "adapter_model": (
            weights_filename,
            weights if weights is not None else (adapter / WEIGHTS_FILE).read_bytes(),
            "application/octet-stream",
        ),
    }
    return await client.post(
        ADMIN, data={"name": name, **fields}, files=files, headers=AUTH if headers is None else headers
    )


def edited_config(adapter: Path, **changes: Any) -> bytes:
    """The adapter's ``adapter_config.json`` with some keys changed."""
    config = json.loads((adapter / CONFIG_FILE).read_bytes())
    config.update(changes)
    return json.dumps(config).encode()


def store_adapter(store: AdapterStore, name: str, adapter: Path, base_dir: Path) -> AdapterRecord:
    """Put a validated adapter into a store directly, as an earlier gateway run would have."""
    base = BaseModelInfo.from_model_dir(base_dir, BASE_ID, HF_ID)
    config = (adapter / CONFIG_FILE).read_bytes()
    spec = validate_adapter(config, adapter / WEIGHTS_FILE, base=base, max_rank=MAX_RANK)
    manifest = AdapterManifest.from_spec(name, spec, description=f"{name} adapter", examples=("Hi?",))
    return store.put(name, config, adapter / WEIGHTS_FILE, manifest, replace=False)


# ---------------------------------------------------------------------------- assertions


def assert_admin_error(
    response: httpx.Response, status: int, *, param: str | None, code: str | None
) -> dict[str, Any]:
    """``status`` with exactly the one error envelope (401 has its own type)."""
    return assert_error(response, status, param=param, code=code, error_type=_ERROR_TYPES.get(status))


async def assert_nothing_registered(client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path) -> None:
    """No adapter listed, none loaded into the engine, and nothing left in the store: no name, no
    version, no scratch directory."""
    listed = await client.get(ADMIN, headers=AUTH)
    assert listed.status_code == 200
    assert listed.json() == {"object": "list", "data": []}
    assert engine.load_requests == []
    assert engine.loras == {}
    assert store_entries(store_dir) == ([], [])


def store_entries(store_dir: Path) -> tuple[list[str], list[str]]:
    """The names in the store (links, scratch entries) and its versions, ``.versions`` and the
    router's directory aside."""
    names = sorted(
        entry.name for entry in store_dir.iterdir() if entry.name not in (VERSIONS_DIR, ROUTER_DIR)
    )
    return names, sorted(entry.name for entry in (store_dir / VERSIONS_DIR).iterdir())
