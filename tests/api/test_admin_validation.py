"""Every adapter the gateway must refuse is a 400 that names what to fix, and leaves no trace:
nothing loaded into the engine, nothing listed, nothing in the store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE
from tests.adapter_factory import make_lora_adapter
from tests.api.admin_support import (  # noqa: F401 (fixtures, under their pytest names)
    ADMIN,
    AUTH,
    BASE_ID,
    MAX_RANK,
    assert_admin_error,
    assert_nothing_registered,
    base_dir_fixture,
    edited_config,
    engine_fixture,
    import_dir_fixture,
    settings_fixture,
    store_dir_fixture,
    upload,
)
from tests.fakes import FakeEngine


@pytest.fixture(scope="module")
def rank_32_adapter(tmp_path_factory: pytest.TempPathFactory, base_dir: Path) -> Path:
    """A real adapter of rank 32, above the gateway's maximum of 16."""
    return make_lora_adapter(tmp_path_factory.mktemp("lora-r32") / "adapter", base_dir=base_dir, rank=32)


@dataclass(frozen=True)
class Refusal:
    """An upload that must be refused: what is sent instead of the good adapter's files."""

    param: str
    config: Callable[[Path], bytes] | None = None
    weights: bytes | None = None
    weights_filename: str = WEIGHTS_FILE
    says: str = ""
    """Part of the message, so the operator knows what to fix."""


REFUSALS = {
    "bin-weights": Refusal("adapter_model", weights_filename="adapter_model.bin", says="safetensors"),
    "pt-weights": Refusal("adapter_model", weights_filename="adapter.pt", says="pickle"),
    "not-safetensors": Refusal("weights", weights=b"these are not tensors at all", says="safetensors"),
    "torch-save-zip": Refusal("weights", weights=b"PK\x03\x04" + b"\x00" * 64, says="pickled"),
    "pickle-protocol": Refusal("weights", weights=b"\x80\x04\x95" + b"\x00" * 64, says="pickled"),
    "empty-weights": Refusal("weights", weights=b"", says="safetensors"),
    "bad-json": Refusal("config", config=lambda _: b'{"r": 8,', says="JSON"),
    "not-utf8": Refusal("config", config=lambda _: b"\xff\xfe{}", says="JSON"),
    "json-list": Refusal("config", config=lambda _: b"[]", says="object"),
    "not-lora": Refusal("config.peft_type", config=lambda a: edited_config(a, peft_type="IA3")),
    "use-dora": Refusal("config.use_dora", config=lambda a: edited_config(a, use_dora=True), says="DoRA"),
    "bias-all": Refusal("config.bias", config=lambda a: edited_config(a, bias="all"), says="bias"),
    "bias-lora-only": Refusal("config.bias", config=lambda a: edited_config(a, bias="lora_only")),
    "modules-to-save": Refusal(
        "config.modules_to_save", config=lambda a: edited_config(a, modules_to_save=["lm_head"])
    ),
    "auto-map": Refusal(
        "config.auto_map",
        config=lambda a: edited_config(a, auto_map={"AutoModel": "evil.Model"}),
        says="custom code",
    ),
    "unknown-target-module": Refusal(
        "config.target_modules",
        config=lambda a: edited_config(a, target_modules=["q_proj", "v_proj", "fancy_proj"]),
        says="fancy_proj",
    ),
    "other-base-model": Refusal(
        "config.base_model_name_or_path",
        config=lambda a: edited_config(a, base_model_name_or_path="meta-llama/Llama-3.1-8B"),
        says=BASE_ID,
    ),
    "no-base-model": Refusal(
        "config.base_model_name_or_path", config=lambda a: edited_config(a, base_model_name_or_path=None)
    ),
    "config-rank-mismatch": Refusal("weights", config=lambda a: edited_config(a, r=4), says="r=4"),
}


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=REFUSALS.keys())
async def test_an_invalid_adapter_is_400_and_leaves_no_trace(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path, refusal: Refusal
) -> None:
    response = await upload(
        client,
        "pirate",
        lora_adapter,
        config=refusal.config(lora_adapter) if refusal.config else None,
        weights=refusal.weights,
        weights_filename=refusal.weights_filename,
    )
    error = assert_admin_error(response, 400, param=refusal.param, code="invalid_adapter")
    assert refusal.says in error["message"]
    await assert_nothing_registered(client, engine, store_dir)


async def test_a_rank_above_the_maximum_is_400(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, rank_32_adapter: Path
) -> None:
    response = await upload(client, "pirate", rank_32_adapter)
    error = assert_admin_error(response, 400, param="config.r", code="invalid_adapter")
    assert "32" in error["message"]
    assert str(MAX_RANK) in error["message"]
    await assert_nothing_registered(client, engine, store_dir)


NAMES_REFUSED = {
    "spaces-and-capitals": "Bad Name",
    "capitals": "Pirate",
    "auto": "auto",
    "base-model-id": BASE_ID,
    "base-model-id-lower-case": BASE_ID.lower(),
    "65-chars": "a" * 65,
    "empty": "",
    "leading-dot": ".hidden",
    "slash": "team/pirate",
    "dot-dot": "..",
    "nul": "pirate\x00",
    "non-ascii": "piràte",
}


@pytest.mark.parametrize("name", NAMES_REFUSED.values(), ids=NAMES_REFUSED.keys())
async def test_an_invalid_name_is_400_and_leaves_no_trace(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path, name: str
) -> None:
    response = await upload(client, name, lora_adapter)
    assert_admin_error(response, 400, param="name", code="invalid_adapter")
    await assert_nothing_registered(client, engine, store_dir)


async def test_a_64_char_name_is_accepted(
    client: httpx.AsyncClient, engine: FakeEngine, lora_adapter: Path
) -> None:
    name = "a" * 64
    assert (await upload(client, name, lora_adapter)).status_code == 201
    assert set(engine.loras) == {name}


FORM_REFUSALS = {
    "examples-not-json": ({"examples": "[not json"}, None),
    "examples-not-a-list": ({"examples": '"one"'}, "examples"),
    "threshold-not-a-number": ({"threshold": "high"}, None),
    "threshold-out-of-range": ({"threshold": "2"}, "threshold"),
    "unknown-field": ({"temperature": "0.2"}, "temperature"),
}


@pytest.mark.parametrize(("fields", "param"), FORM_REFUSALS.values(), ids=FORM_REFUSALS.keys())
async def test_a_malformed_form_field_is_400_and_leaves_no_trace(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    store_dir: Path,
    lora_adapter: Path,
    fields: dict[str, Any],
    param: str | None,
) -> None:
    response = await upload(client, "pirate", lora_adapter, **fields)
    assert_admin_error(response, 400, param=param, code=None)
    await assert_nothing_registered(client, engine, store_dir)


async def test_an_upload_missing_a_file_is_400(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    files = {"adapter_config": (CONFIG_FILE, (lora_adapter / CONFIG_FILE).read_bytes(), "application/json")}
    response = await client.post(ADMIN, data={"name": "pirate"}, files=files, headers=AUTH)
    assert_admin_error(response, 400, param="adapter_model", code=None)
    await assert_nothing_registered(client, engine, store_dir)
