"""Every adapter the gateway must refuse is a 400 that names what to fix, and leaves no trace:
nothing loaded into the engine, nothing listed, nothing in the store."""

from __future__ import annotations

import json
import shutil
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
from tests.safetensors_layout import LAYOUTS, MESSAGES, rewritten


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
    "trust-remote-code": Refusal(
        "config.trust_remote_code",
        config=lambda a: edited_config(a, trust_remote_code=True),
        says="custom code",
    ),
    "python-as-weights": Refusal(
        "weights",
        weights=b"import os\nos.system('echo pwned')\n",
        weights_filename="modeling_lora.py",
        says="safetensors",
    ),
    "ckpt-weights": Refusal(
        "weights", weights=b"\x80\x04\x95" + b"\x00" * 64, weights_filename="adapter.ckpt", says="pickled"
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


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_weights_with_a_broken_layout_are_400_and_leave_no_trace(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path, layout: str
) -> None:
    """Gapped, overlapping, cut or over-long tensor data: refused here, not later by vLLM."""
    weights = rewritten(lora_adapter / WEIGHTS_FILE, LAYOUTS[layout])
    response = await upload(client, "pirate", lora_adapter, weights=weights)
    error = assert_admin_error(response, 400, param="weights", code="invalid_adapter")
    assert "not a valid safetensors file" in error["message"]
    assert MESSAGES[layout] in error["message"]
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
    "training-prompts-not-json": ({"training_prompts": "[not json"}, None),
    "training-prompts-not-a-list": ({"training_prompts": '"one"'}, "training_prompts"),
    "training-prompt-blank": ({"training_prompts": '["Ahoy?", " "]'}, "training_prompts[1]"),
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


# ---------------------------------------------------------------------------- import directories


def _with_python(adapter: Path) -> str:
    (adapter / "modeling_lora.py").write_text("import os\nos.system('echo pwned')\n")
    return "modeling_lora.py"


def _with_auto_map(adapter: Path) -> str:
    config = json.loads((adapter / CONFIG_FILE).read_text())
    (adapter / CONFIG_FILE).write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))
    return CONFIG_FILE


def _with_training_args(adapter: Path) -> str:
    (adapter / "training_args.bin").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    return "training_args.bin"


def _with_a_checkpoint(adapter: Path) -> str:
    (adapter / "checkpoint-10").mkdir()
    (adapter / "checkpoint-10" / "optimizer.pt").write_bytes(b"PK\x03\x04")
    return "checkpoint-10/optimizer.pt"


def _with_a_link_outside(adapter: Path) -> str:
    outside = adapter.parent.parent / "elsewhere"
    outside.mkdir()
    (adapter / "code").symlink_to(outside, target_is_directory=True)
    return "code"


IMPORTS_REFUSED = {
    "python-file": (_with_python, "Python code"),
    "auto-map": (_with_auto_map, "auto_map"),
    "pickle-beside-safetensors": (_with_training_args, "pickle"),
    "pickle-in-a-subdirectory": (_with_a_checkpoint, "pickle"),
    "link-to-a-directory-outside": (_with_a_link_outside, "outside"),
}


@pytest.mark.parametrize(("spoil", "says"), IMPORTS_REFUSED.values(), ids=IMPORTS_REFUSED.keys())
async def test_an_import_dir_carrying_code_or_pickles_is_400_naming_the_file(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    import_dir: Path,
    store_dir: Path,
    lora_adapter: Path,
    spoil: Callable[[Path], str],
    says: str,
) -> None:
    """Only the two PEFT files would be copied, but a directory carrying code or pickles is refused
    whole, with the file named, before anything is read from it."""
    source = import_dir / "pirate"
    shutil.copytree(lora_adapter, source)
    offending = spoil(source)
    response = await client.post(ADMIN, json={"name": "pirate", "path": "pirate"}, headers=AUTH)
    error = assert_admin_error(response, 400, param="path", code="invalid_adapter")
    assert f"'{offending}'" in error["message"]
    assert says in error["message"]
    await assert_nothing_registered(client, engine, store_dir)


async def test_an_import_dir_with_a_training_runs_files_is_accepted(
    client: httpx.AsyncClient, engine: FakeEngine, import_dir: Path, lora_adapter: Path
) -> None:
    """What ``hybrid-serve adapters train`` leaves beside the weights is data, not code."""
    source = import_dir / "pirate"
    shutil.copytree(lora_adapter, source)
    (source / "README.md").write_text("# pirate\n")
    (source / "report.json").write_text('{"verdict": "better"}')
    (source / "loss_curve.png").write_bytes(b"\x89PNG\r\n")
    response = await client.post(ADMIN, json={"name": "pirate", "path": "pirate"}, headers=AUTH)
    assert response.status_code == 201, response.text
    assert set(engine.loras) == {"pirate"}


async def test_an_upload_with_a_third_file_is_400(
    client: httpx.AsyncClient, engine: FakeEngine, store_dir: Path, lora_adapter: Path
) -> None:
    """Code shipped beside the two PEFT files (a ``modeling_*.py``) is refused, not ignored."""
    files = [
        ("adapter_config", (CONFIG_FILE, (lora_adapter / CONFIG_FILE).read_bytes(), "application/json")),
        (
            "adapter_model",
            (WEIGHTS_FILE, (lora_adapter / WEIGHTS_FILE).read_bytes(), "application/octet-stream"),
        ),
        ("modeling", ("modeling_lora.py", b"import os\nos.system('echo pwned')\n", "text/x-python")),
    ]
    response = await client.post(ADMIN, data={"name": "pirate"}, files=files, headers=AUTH)
    error = assert_admin_error(response, 400, param=None, code=None)
    assert "Too many files" in error["message"]
    await assert_nothing_registered(client, engine, store_dir)
