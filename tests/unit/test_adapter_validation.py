"""Adapter validation against real PEFT adapters made on the bundled model, each rule broken on
purpose in a copy; names; and server-side import paths."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, save_file

from adapters.config import rebase_config
from adapters.errors import AdapterValidationError
from adapters.validation import (
    AdapterSpec,
    BaseModelInfo,
    resolve_import_path,
    validate_adapter,
    validate_name,
)
from service.bundled_model import HF_ID, SERVED_NAME
from tests.adapter_factory import make_lora_adapter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers.0.self_attn"
MAX_RANK = 16


@pytest.fixture(scope="module")
def base(bundled_base_dir: Path) -> BaseModelInfo:
    return BaseModelInfo.from_model_dir(bundled_base_dir, SERVED_NAME, HF_ID)


@pytest.fixture
def adapter(tmp_path: Path, lora_adapter: Path) -> Path:
    """A private copy of the real adapter, free to break."""
    return Path(shutil.copytree(lora_adapter, tmp_path / "adapter"))


def validate(adapter: Path, base: BaseModelInfo, *, max_rank: int = MAX_RANK) -> AdapterSpec:
    return validate_adapter((adapter / CONFIG).read_bytes(), adapter / WEIGHTS, base=base, max_rank=max_rank)


def edit_config(adapter: Path, change: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((adapter / CONFIG).read_text())
    change(config)
    (adapter / CONFIG).write_text(json.dumps(config))


def set_key(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(config: dict[str, Any]) -> None:
        config[key] = value

    return change


def edit_tensors(adapter: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load((adapter / WEIGHTS).read_bytes())  # not mmapped: the file is rewritten
    change(tensors)
    save_file(tensors, adapter / WEIGHTS)


def refused(
    adapter: Path, base: BaseModelInfo, param: str, *fragments: str, max_rank: int = MAX_RANK
) -> None:
    with pytest.raises(AdapterValidationError) as caught:
        validate(adapter, base, max_rank=max_rank)
    assert caught.value.param == param, caught.value.message
    for fragment in fragments:
        assert fragment in caught.value.message


# ---------------------------------------------------------------------------- the base model


def test_base_model_info_from_the_header(base: BaseModelInfo, bundled_base_dir: Path) -> None:
    assert base.served_id == SERVED_NAME
    assert base.aliases == {SERVED_NAME, HF_ID, str(bundled_base_dir.resolve())}
    assert base.module_names == frozenset(
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"}
    )
    assert base.weight_shapes["model.layers.0.self_attn.k_proj"] == (192, 576)


def test_base_model_without_weights_has_unknown_modules(tmp_path: Path) -> None:
    info = BaseModelInfo.from_model_dir(tmp_path, "m", None)
    assert info.module_names is None
    assert info.aliases == {"m", str(tmp_path.resolve())}


def test_unreadable_base_weights_turn_module_checks_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with caplog.at_level(logging.WARNING):
        info = BaseModelInfo.from_model_dir(tmp_path, "m", "org/m")
    assert info.module_names is None
    assert "module checks off" in caplog.text


# ---------------------------------------------------------------------------- accepted adapters


def test_real_adapter_passes(adapter: Path, base: BaseModelInfo) -> None:
    spec = validate(adapter, base)
    assert spec == AdapterSpec(
        rank=8,
        alpha=16.0,
        target_modules=("q_proj", "v_proj"),
        base_model_name_or_path=HF_ID,
        sha256=hashlib.sha256((adapter / WEIGHTS).read_bytes()).hexdigest(),
    )


def test_wider_adapter_passes(other_lora_adapter: Path, base: BaseModelInfo) -> None:
    assert validate(other_lora_adapter, base).target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")


@pytest.mark.parametrize("alias", ["served", "hf", "hf-lower", "dir", "dir-link"])
def test_base_model_named_any_way(
    adapter: Path, base: BaseModelInfo, bundled_base_dir: Path, tmp_path: Path, alias: str
) -> None:
    link = tmp_path / "base-link"
    link.symlink_to(bundled_base_dir)
    value = {
        "served": SERVED_NAME,
        "hf": HF_ID,
        "hf-lower": HF_ID.lower(),
        "dir": str(bundled_base_dir),
        "dir-link": str(link),  # compared after resolving
    }[alias]
    edit_config(adapter, set_key("base_model_name_or_path", value))
    assert validate(adapter, base).base_model_name_or_path == value


def test_regex_target_modules_are_checked_on_the_weights(adapter: Path, base: BaseModelInfo) -> None:
    edit_config(adapter, set_key("target_modules", r".*\.(q_proj|v_proj)"))
    assert validate(adapter, base).target_modules == ("q_proj", "v_proj")


def test_dotted_target_modules_and_empty_extras_pass(adapter: Path, base: BaseModelInfo) -> None:
    def change(config: dict[str, Any]) -> None:
        config.update(target_modules=["self_attn.q_proj", "v_proj"], modules_to_save=[], use_dora=False)
        config.update(bias="none", auto_map=None, rank_pattern={}, future_peft_key={"x": 1})
        config.update(init_lora_weights="gaussian", layer_replication=None, use_qalora=False)

    edit_config(adapter, change)
    assert validate(adapter, base).rank == 8


def test_rank_at_the_limit_passes(tmp_path: Path, bundled_base_dir: Path, base: BaseModelInfo) -> None:
    wide = make_lora_adapter(tmp_path / "r16", base_dir=bundled_base_dir, rank=16, target_modules=["v_proj"])
    assert validate(wide, base, max_rank=16).rank == 16
    refused(wide, base, "config.r", "maximum LoRA rank 8", "r <= 8", max_rank=8)


def test_rebased_config_names_the_served_id(adapter: Path, base: BaseModelInfo) -> None:
    """What vLLM's filesystem resolver demands, and still the same adapter."""
    original = json.loads((adapter / CONFIG).read_text())
    rebased = rebase_config((adapter / CONFIG).read_bytes(), SERVED_NAME)
    config = json.loads(rebased)
    assert config.pop("base_model_name_or_path") == SERVED_NAME
    assert original.pop("base_model_name_or_path") == HF_ID
    assert config == original
    spec = validate_adapter(rebased, adapter / WEIGHTS, base=base, max_rank=MAX_RANK)
    assert spec.base_model_name_or_path == SERVED_NAME


# ---------------------------------------------------------------------------- the weights file


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "weights.PTH", "model.ckpt"])
def test_pickle_file_names_refused(adapter: Path, base: BaseModelInfo, name: str) -> None:
    target = adapter / name
    (adapter / WEIGHTS).rename(target)
    with pytest.raises(AdapterValidationError) as caught:
        validate_adapter((adapter / CONFIG).read_bytes(), target, base=base, max_rank=MAX_RANK)
    assert caught.value.param == "weights"
    assert "safe_serialization=True" in caught.value.message
    assert name in caught.value.message


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "legacy-pickle"])
def test_pickled_checkpoint_under_a_safetensors_name_refused(
    adapter: Path, base: BaseModelInfo, zip_format: bool
) -> None:
    tensors = load((adapter / WEIGHTS).read_bytes())  # not mmapped: the file is rewritten
    torch.save(tensors, adapter / WEIGHTS, _use_new_zipfile_serialization=zip_format)
    refused(adapter, base, "weights", "pickled PyTorch checkpoint", "safe_serialization=True")


def test_plain_pickle_refused(adapter: Path, base: BaseModelInfo) -> None:
    (adapter / WEIGHTS).write_bytes(pickle.dumps({"lora_A": [1.0]}, protocol=4))
    refused(adapter, base, "weights", "pickled", "safe_serialization=True")


def test_truncated_weights_refused(adapter: Path, base: BaseModelInfo) -> None:
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[: len(data) // 2])
    refused(adapter, base, "weights", "not a valid safetensors file", "fill the file exactly")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(b"", "too short", id="empty"),
        pytest.param(struct.pack("<Q", 200 * 1024 * 1024) + b"{}", "over the", id="header-over-100MB"),
        pytest.param(struct.pack("<Q", 64) + b"{}", "the file has 10", id="header-past-the-end"),
        pytest.param(struct.pack("<Q", 4) + b"[1] ", "invalid JSON in header", id="header-not-object"),
        pytest.param(struct.pack("<Q", 3) + b"{x}", "invalid JSON in header", id="header-not-json"),
    ],
)
def test_malformed_safetensors_refused(
    adapter: Path, base: BaseModelInfo, content: bytes, fragment: str
) -> None:
    (adapter / WEIGHTS).write_bytes(content)
    refused(adapter, base, "weights", fragment)


def test_extra_full_weight_refused(adapter: Path, base: BaseModelInfo) -> None:
    edit_tensors(adapter, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(4, 4)}))
    refused(adapter, base, "weights", "'base_model.model.lm_head.weight' is not a LoRA matrix")


def test_lora_bias_tensor_refused(adapter: Path, base: BaseModelInfo) -> None:
    edit_tensors(adapter, lambda t: t.update({f"{PREFIX}.q_proj.lora_B.bias": torch.zeros(576)}))
    refused(adapter, base, "weights", "not a LoRA matrix")


def test_missing_lora_b_refused(adapter: Path, base: BaseModelInfo) -> None:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[f"{PREFIX}.q_proj.lora_B.weight"]

    edit_tensors(adapter, change)
    refused(adapter, base, "weights", "lacks its lora_A or lora_B")


def test_integer_weights_refused(adapter: Path, base: BaseModelInfo) -> None:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        key = f"{PREFIX}.q_proj.lora_A.weight"
        tensors[key] = tensors[key].to(torch.int32)

    edit_tensors(adapter, change)
    refused(adapter, base, "weights", "is I32")


def test_no_lora_tensors_refused(adapter: Path, base: BaseModelInfo) -> None:
    edit_tensors(adapter, lambda t: t.clear())
    refused(adapter, base, "weights", "no LoRA tensors")


def test_weights_of_another_rank_refused(adapter: Path, base: BaseModelInfo) -> None:
    edit_config(adapter, set_key("r", 4))
    refused(adapter, base, "weights", "has rank 8", "r=4")


def test_inconsistent_a_and_b_refused(adapter: Path, base: BaseModelInfo) -> None:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{PREFIX}.q_proj.lora_B.weight"] = torch.zeros(576, 4)

    edit_tensors(adapter, change)
    refused(adapter, base, "weights", "are not [r, in] and [out, r]")


def test_weights_for_another_model_refused(adapter: Path, base: BaseModelInfo) -> None:
    def change(tensors: dict[str, torch.Tensor]) -> None:  # SmolLM2-360M's width: 960
        tensors[f"{PREFIX}.q_proj.lora_A.weight"] = torch.zeros(8, 960)
        tensors[f"{PREFIX}.q_proj.lora_B.weight"] = torch.zeros(960, 8)

    edit_tensors(adapter, change)
    refused(adapter, base, "weights", "trained on another model", "576 -> 576")


def test_weights_for_an_unlisted_module_refused(adapter: Path, base: BaseModelInfo) -> None:
    edit_config(adapter, set_key("target_modules", ["q_proj"]))
    refused(adapter, base, "weights", "v_proj", "target_modules does not list")


def test_weights_for_a_module_the_base_lacks_refused(adapter: Path, base: BaseModelInfo) -> None:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{PREFIX}.qkv_proj.lora_A.weight"] = torch.zeros(8, 576)
        tensors[f"{PREFIX}.qkv_proj.lora_B.weight"] = torch.zeros(576, 8)

    edit_tensors(adapter, change)
    edit_config(adapter, set_key("target_modules", ".*proj"))
    refused(adapter, base, "weights", "has no 'qkv_proj' module")


# ---------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe\x00", b"", b'{"peft_type": "LORA"'],
    ids=["syntax", "utf8", "empty", "cut"],
)
def test_config_not_json_refused(adapter: Path, base: BaseModelInfo, content: bytes) -> None:
    (adapter / CONFIG).write_bytes(content)
    refused(adapter, base, "config", "not valid JSON")


@pytest.mark.parametrize("content", [b"[]", b"null", b'"LORA"', b"8"])
def test_config_not_an_object_refused(adapter: Path, base: BaseModelInfo, content: bytes) -> None:
    (adapter / CONFIG).write_bytes(content)
    refused(adapter, base, "config", "JSON object")


@pytest.mark.parametrize("peft_type", ["LOHA", "LOKR", "IA3", "lora", None])
def test_other_peft_types_refused(adapter: Path, base: BaseModelInfo, peft_type: str | None) -> None:
    edit_config(adapter, set_key("peft_type", peft_type))
    refused(adapter, base, "config.peft_type", 'only LoRA adapters (peft_type "LORA")')


@pytest.mark.parametrize("rank", [0, -8, "8", 8.0, True, None])
def test_bad_rank_refused(adapter: Path, base: BaseModelInfo, rank: object) -> None:
    edit_config(adapter, set_key("r", rank))
    refused(adapter, base, "config.r", "integer of at least 1")


def test_rank_above_the_engine_limit_refused(
    tmp_path: Path, bundled_base_dir: Path, base: BaseModelInfo
) -> None:
    big = make_lora_adapter(tmp_path / "r32", base_dir=bundled_base_dir, rank=32, target_modules=["q_proj"])
    refused(
        big, base, "config.r", "rank 32 is above the engine's maximum LoRA rank 16", "HYBRID_MAX_LORA_RANK"
    )


def test_rank_pattern_above_the_limit_refused(adapter: Path, base: BaseModelInfo) -> None:
    edit_config(adapter, set_key("rank_pattern", {"q_proj": 64}))
    refused(adapter, base, "config.r", "rank 64")


@pytest.mark.parametrize(
    ("key", "value", "param", "fragment"),
    [
        pytest.param("use_dora", True, "config.use_dora", "DoRA", id="dora"),
        pytest.param("bias", "all", "config.bias", 'retrain with bias="none"', id="bias-all"),
        pytest.param("bias", "lora_only", "config.bias", "'lora_only'", id="bias-lora-only"),
        pytest.param("lora_bias", True, "config.lora_bias", "lora_bias", id="lora-bias"),
        pytest.param("use_qalora", True, "config.use_qalora", "QALoRA", id="qalora"),
        pytest.param("layer_replication", [[0, 4]], "config.layer_replication", "retrain", id="layers"),
        pytest.param("alora_invocation_tokens", [1], "config.alora_invocation_tokens", "Activ", id="alora"),
        pytest.param("init_lora_weights", "pissa", "config.init_lora_weights", "plain LoRA", id="pissa"),
        pytest.param("modules_to_save", ["lm_head"], "config.modules_to_save", "modules_to_save", id="mts"),
        pytest.param(
            "auto_map", {"AutoModel": "evil.Model"}, "config.auto_map", "custom code", id="auto-map"
        ),
        pytest.param("lora_alpha", "16", "config.lora_alpha", "positive number", id="alpha-string"),
    ],
)
def test_unsupported_features_refused(
    adapter: Path, base: BaseModelInfo, key: str, value: object, param: str, fragment: str
) -> None:
    edit_config(adapter, set_key(key, value))
    refused(adapter, base, param, fragment)


@pytest.mark.parametrize("targets", [[], "", 5, [1], [""], None], ids=str)
def test_malformed_target_modules_refused(adapter: Path, base: BaseModelInfo, targets: object) -> None:
    edit_config(adapter, set_key("target_modules", targets))
    refused(adapter, base, "config.target_modules", "non-empty list")


def test_unknown_target_module_refused(adapter: Path, base: BaseModelInfo) -> None:
    edit_config(adapter, set_key("target_modules", ["q_proj", "v_proj", "c_attn"]))
    refused(adapter, base, "config.target_modules", "['c_attn'] do not exist", "gate_proj")


def test_unknown_modules_pass_when_the_base_is_unknown(adapter: Path) -> None:
    edit_config(adapter, set_key("target_modules", ["q_proj", "v_proj", "c_attn"]))
    unknown = BaseModelInfo(SERVED_NAME, frozenset({SERVED_NAME, HF_ID}))
    assert validate(adapter, unknown).target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    "value",
    ["HuggingFaceTB/SmolLM2-360M-Instruct", "meta-llama/Llama-3.2-1B", "/models/other", "smollm2", "", None],
)
def test_wrong_base_model_refused(adapter: Path, base: BaseModelInfo, value: str | None) -> None:
    edit_config(adapter, set_key("base_model_name_or_path", value))
    fragment = SERVED_NAME if value else "missing"
    refused(adapter, base, "config.base_model_name_or_path", fragment)


def test_wrong_base_model_message_hides_the_directory(adapter: Path, base: BaseModelInfo) -> None:
    edit_config(adapter, set_key("base_model_name_or_path", "other/model"))
    with pytest.raises(AdapterValidationError) as caught:
        validate(adapter, base)
    assert HF_ID in caught.value.message
    assert not any(alias in caught.value.message for alias in base.aliases if alias.startswith("/"))


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "0", "legal-v2", "x.y_z", "a" * 64, "smollm2-135m"])
def test_valid_names(name: str) -> None:
    assert validate_name(name, reserved={SERVED_NAME}) == name


@pytest.mark.parametrize(
    "name", ["", "A", "Legal", "-a", ".a", "_a", "a/b", "../a", "a b", "a" * 65, "ünï", "a\n", "a:b"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(AdapterValidationError, match="1-64 characters") as caught:
        validate_name(name, reserved=set())
    assert caught.value.param == "name"


def test_auto_is_reserved() -> None:
    with pytest.raises(AdapterValidationError, match="router"):
        validate_name("auto", reserved=set())


@pytest.mark.parametrize("reserved", [SERVED_NAME, SERVED_NAME.lower()])
def test_base_model_id_cannot_be_shadowed(reserved: str) -> None:
    with pytest.raises(AdapterValidationError, match="shadow"):
        validate_name(SERVED_NAME.lower(), reserved={reserved})


# ---------------------------------------------------------------------------- import paths


@pytest.fixture
def import_root(tmp_path: Path) -> Path:
    root = tmp_path / "imports"
    (root / "team" / "legal").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return root


def path_refused(raw: str, root: Path | None, fragment: str) -> None:
    with pytest.raises(AdapterValidationError, match=fragment) as caught:
        resolve_import_path(raw, root)
    assert caught.value.param == "path"


def test_relative_and_absolute_paths_inside_the_root(import_root: Path) -> None:
    expected = (import_root / "team" / "legal").resolve()
    assert resolve_import_path("team/legal", import_root) == expected
    assert resolve_import_path("./team/legal/", import_root) == expected
    assert resolve_import_path(str(import_root / "team" / "legal"), import_root) == expected


def test_without_a_root_only_uploads(import_root: Path) -> None:
    path_refused("team/legal", None, "only uploads are accepted")


@pytest.mark.parametrize(
    "raw",
    [
        "http://example.com/a",
        "https://hf.co/x/y",
        "file:///etc/passwd",
        "FILE:team/legal",
        "s3://b/k",
        "//host/share",
    ],
)
def test_urls_refused(import_root: Path, raw: str) -> None:
    path_refused(raw, import_root, "never fetched")


@pytest.mark.parametrize("raw", ["../outside", "team/../../outside", "team/..", "..\\outside", ".."])
def test_dot_dot_refused(import_root: Path, raw: str) -> None:
    path_refused(raw, import_root, r"'\.\.'")


def test_absolute_path_outside_refused(import_root: Path, tmp_path: Path) -> None:
    path_refused(str(tmp_path / "outside"), import_root, "inside the import directory")
    path_refused("/etc", import_root, "inside the import directory")


def test_symlink_escaping_the_root_refused(import_root: Path, tmp_path: Path) -> None:
    (import_root / "escape").symlink_to(tmp_path / "outside")
    (import_root / "team" / "up").symlink_to("../..")
    path_refused("escape", import_root, "outside the import directory")
    path_refused("team/up/outside", import_root, "outside the import directory")


def test_symlink_inside_the_root_followed(import_root: Path) -> None:
    (import_root / "current").symlink_to(import_root / "team" / "legal")
    assert resolve_import_path("current", import_root) == (import_root / "team" / "legal").resolve()


def test_root_behind_a_symlink(import_root: Path, tmp_path: Path) -> None:
    link = tmp_path / "imports-link"
    link.symlink_to(import_root)
    expected = (import_root / "team" / "legal").resolve()
    assert resolve_import_path(str(link / "team" / "legal"), link) == expected
    assert resolve_import_path(str(import_root / "team" / "legal"), link) == expected


def test_missing_path_refused(import_root: Path) -> None:
    path_refused("team/absent", import_root, "does not exist")


@pytest.mark.parametrize("raw", ["", "team\x00/legal"])
def test_empty_or_nul_refused(import_root: Path, raw: str) -> None:
    path_refused(raw, import_root, "empty or holds a NUL")
