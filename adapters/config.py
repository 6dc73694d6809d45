"""Parse a PEFT ``adapter_config.json`` into the few settings that decide whether the engine can
serve it, refusing the features it cannot (or must not) serve.

Only keys that change what the weights mean are judged. Unknown keys pass: PEFT adds new ones
in most releases, and a config written by a newer PEFT is still a plain LoRA when none of the
refused features below is on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeGuard

from adapters.errors import AdapterValidationError
from adapters.model_files import remote_code_keys

_DEFAULT_ALPHA = 8.0  # peft.LoraConfig's default, for configs that leave it out


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    ranks: frozenset[int]
    """``r`` and every rank of ``rank_pattern``: the ranks a module's matrices may have."""
    listed_modules: frozenset[str] | None
    """Last component of each listed target module; None for a regex (checked on the weights)."""
    base_model: str


def parse_lora_config(config_bytes: bytes, *, max_rank: int) -> LoraSettings:
    """Check the config's JSON and LoRA settings; raise :class:`AdapterValidationError` otherwise."""
    config = _json_object(config_bytes)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterValidationError(
            f'peft_type is {peft_type!r}: only LoRA adapters (peft_type "LORA") can be served',
            "config.peft_type",
        )
    rank = config.get("r")
    if not _positive_int(rank):
        raise AdapterValidationError("r (the LoRA rank) must be an integer of at least 1", "config.r")
    ranks = {rank, *_rank_pattern(config.get("rank_pattern"))}
    if max(ranks) > max_rank:
        raise AdapterValidationError(
            f"rank {max(ranks)} is above the engine's maximum LoRA rank {max_rank}: retrain with "
            f"r <= {max_rank}, or raise HYBRID_MAX_LORA_RANK",
            "config.r",
        )
    alpha = config.get("lora_alpha", _DEFAULT_ALPHA)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterValidationError("lora_alpha must be a positive number", "config.lora_alpha")
    _refuse_unsupported(config)
    base_model = config.get("base_model_name_or_path")
    if not isinstance(base_model, str) or not base_model:
        raise AdapterValidationError(
            "base_model_name_or_path is missing: set it to the served base model's id",
            "config.base_model_name_or_path",
        )
    return LoraSettings(
        rank, float(alpha), frozenset(ranks), _target_modules(config.get("target_modules")), base_model
    )


def _json_object(config_bytes: bytes) -> dict[str, Any]:
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except ValueError as exc:  # bad UTF-8 or bad JSON
        raise AdapterValidationError(
            f"adapter_config.json is not valid JSON ({exc}): send the file PEFT's save_pretrained wrote",
            "config",
        ) from None
    if not isinstance(config, dict):
        raise AdapterValidationError("adapter_config.json must hold a JSON object", "config")
    return config


_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora: true)",
    "lora_bias": "a trained LoRA bias (lora_bias: true)",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "use_qalora": "QALoRA (use_qalora)",
}
# Inits that only choose the starting weights; the others (PiSSA, OLoRA, LoftQ...) change the base
# model's weights when PEFT loads the adapter, which the engine cannot do.
_PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})


def _refuse_unsupported(config: dict[str, Any]) -> None:
    """The features of a PEFT LoRA that the engine cannot serve, or that would run code."""
    for key, feature in _UNSUPPORTED_FLAGS.items():
        if config.get(key):
            raise AdapterValidationError(
                f"{feature} is not supported by the engine: retrain without it", f"config.{key}"
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterValidationError(
            f'bias is {bias!r}: only bias "none" is supported; retrain with bias="none"', "config.bias"
        )
    if config.get("modules_to_save"):
        raise AdapterValidationError(
            "modules_to_save is not supported (the engine serves only LoRA matrices): retrain "
            "without fully trained modules, e.g. without a classification head",
            "config.modules_to_save",
        )
    remote_code = remote_code_keys(config)  # auto_map, custom_pipelines, trust_remote_code: true
    if remote_code:
        raise AdapterValidationError(
            f"{remote_code[0]} points at custom code, which is never run: remove it from the config",
            f"config.{remote_code[0]}",
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        raise AdapterValidationError(
            f"init_lora_weights={init!r} changes the base model's weights when loaded: convert the "
            "adapter to a plain LoRA (PEFT's path_initial_model_for_weight_conversion)",
            "config.init_lora_weights",
        )


def rebase_config(config_bytes: bytes, engine_model: str) -> bytes:
    """The same (validated) config naming ``engine_model`` as its base model: vLLM's filesystem
    resolver loads an adapter only when ``base_model_name_or_path`` equals the model the engine
    was started with (its ``--model``: a hub id or a directory)."""
    config = _json_object(config_bytes)
    config["base_model_name_or_path"] = engine_model
    return json.dumps(config, indent=2).encode()


def _rank_pattern(pattern: object) -> list[int]:
    if pattern is None:
        return []
    if not isinstance(pattern, dict) or not all(_positive_int(v) for v in pattern.values()):
        raise AdapterValidationError(
            "rank_pattern must map module patterns to positive ranks", "config.rank_pattern"
        )
    return list(pattern.values())


def _target_modules(value: object) -> frozenset[str] | None:
    if isinstance(value, str) and value:
        return None  # a regex over module paths, or PEFT's "all-linear"
    if isinstance(value, list) and value and all(isinstance(item, str) and item.strip(".") for item in value):
        # PEFT matches list entries as suffixes of module paths ("self_attn.q_proj" or "q_proj").
        return frozenset(item.rsplit(".", 1)[-1] for item in value)
    raise AdapterValidationError(
        'target_modules must be a non-empty list of module names (e.g. ["q_proj", "v_proj"]) '
        "or a regex string",
        "config.target_modules",
    )


def _positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
