"""The one settings class: defaults, the HYBRID_ environment prefix and its validation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from service.settings import Settings, get_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Nothing from the developer's shell (a HYBRID_ENGINE_URL, say) leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("HYBRID_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_defaults() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.engine_host == "127.0.0.1"
    assert settings.engine_port == 8001
    assert settings.engine_url is None
    assert settings.engine_api_key is None
    assert settings.max_model_len is None
    assert settings.engine_extra_args == []
    assert settings.cache_dir == Path.home() / ".cache" / "hybrid-serve"
    assert settings.engine_log_file == settings.data_dir / "logs" / "engine.log"


def test_environment_prefix(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HYBRID_PORT", "9000")
    clean_env.setenv("HYBRID_HOST", "0.0.0.0")
    clean_env.setenv("HYBRID_ENGINE_PORT", "9001")
    clean_env.setenv("HYBRID_MAX_LORAS", "2")
    clean_env.setenv("HYBRID_ENGINE_API_KEY", "engine-s3cret")
    clean_env.setenv("HYBRID_CACHE_DIR", "/tmp/hybrid-cache")
    settings = Settings()

    assert (settings.port, settings.host, settings.engine_port) == (9000, "0.0.0.0", 9001)
    assert settings.max_loras == 2
    assert isinstance(settings.engine_api_key, SecretStr)
    assert settings.engine_api_key.get_secret_value() == "engine-s3cret"
    assert "engine-s3cret" not in repr(settings)
    assert settings.cache_dir == Path("/tmp/hybrid-cache")


def test_unprefixed_variables_are_ignored(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PORT", "1234")
    clean_env.setenv("ENGINE_URL", "http://elsewhere:1")
    settings = Settings()
    assert settings.port == 8000
    assert settings.engine_url is None


def test_environment_values_are_validated(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HYBRID_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        Settings()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://vllm:8000", "http://vllm:8000"),
        ("http://vllm:8000/", "http://vllm:8000"),
        ("https://engine.example/v1//", "https://engine.example/v1"),
        ("", None),
        ("   ", None),
    ],
)
def test_engine_url_normalised(given: str, expected: str | None) -> None:
    assert Settings(engine_url=given).engine_url == expected


@pytest.mark.parametrize("given", ["ftp://vllm:8000", "vllm:8000", "localhost:8001", "ws://vllm"])
def test_engine_url_needs_http(given: str) -> None:
    with pytest.raises(ValidationError, match="http:// or https://"):
        Settings(engine_url=given)


def test_engine_url_from_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HYBRID_ENGINE_URL", "http://vllm:8000/")
    assert Settings().engine_url == "http://vllm:8000"
    clean_env.setenv("HYBRID_ENGINE_URL", "")
    assert Settings().engine_url is None


def test_local_engine_when_no_url() -> None:
    settings = Settings(engine_host="127.0.0.5", engine_port=9301)
    assert settings.manages_engine
    assert settings.engine_base_url == "http://127.0.0.5:9301"


def test_external_engine_when_url() -> None:
    settings = Settings(engine_url="https://vllm.internal:8443/", engine_port=9301)
    assert not settings.manages_engine
    assert settings.engine_base_url == "https://vllm.internal:8443"


def test_extra_args_as_json_list(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HYBRID_ENGINE_EXTRA_ARGS", '["--dtype", "bfloat16", "--enforce-eager"]')
    assert Settings().engine_extra_args == ["--dtype", "bfloat16", "--enforce-eager"]


def test_extra_args_not_json_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HYBRID_ENGINE_EXTRA_ARGS", "--dtype bfloat16")
    with pytest.raises(SettingsError):
        Settings()


CODE_LOADING_ARGS = {
    "trust-remote-code": (["--trust-remote-code"], "--trust-remote-code"),
    "underscores": (["--dtype", "bfloat16", "--trust_remote_code"], "--trust-remote-code"),
    "with-a-value": (["--trust-remote-code=true"], "--trust-remote-code"),
    # vLLM's parser takes any unambiguous prefix of an option.
    "abbreviated": (["--trust-rem"], "--trust-remote-code"),
    "pickle-format": (["--load-format", "pt"], "safetensors only"),
    "auto-format": (["--load-format=auto"], "safetensors only"),
    "format-abbreviated": (["--load-f", "npcache"], "safetensors only"),
    "format-without-value": (["--load-format"], "safetensors only"),
    "config-file": (["--config", "engine.yaml"], "--config"),
    "another-model": (["--model", "/elsewhere"], "HYBRID_MODEL_DIR"),
}


@pytest.mark.parametrize(("args", "says"), CODE_LOADING_ARGS.values(), ids=CODE_LOADING_ARGS.keys())
def test_extra_args_that_would_load_code_are_refused(args: list[str], says: str) -> None:
    with pytest.raises(ValidationError, match="engine_extra_args") as refused:
        Settings(engine_extra_args=args)
    assert says in str(refused.value)


def test_extra_args_refused_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HYBRID_ENGINE_EXTRA_ARGS", '["--enforce-eager", "--trust-remote-code"]')
    with pytest.raises(ValidationError, match="--trust-remote-code"):
        Settings()


def test_safe_look_alike_extra_args_are_accepted() -> None:
    args = ["--load-format", "safetensors", "--no-trust-remote-code", "--tokenizer-mode", "auto", "--", "x"]
    assert Settings(engine_extra_args=args).engine_extra_args == args


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 9000  # type: ignore[misc]


def test_get_settings_is_cached(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HYBRID_PORT", "9100")
    first = get_settings()
    clean_env.setenv("HYBRID_PORT", "9200")
    assert get_settings() is first
    assert first.port == 9100


def test_chunk_overlap_must_stay_under_half_a_chunk() -> None:
    assert Settings(chunk_tokens=200, chunk_overlap_tokens=99).chunk_overlap_tokens == 99
    with pytest.raises(ValidationError, match="under half"):
        Settings(chunk_tokens=200, chunk_overlap_tokens=100)


@pytest.mark.parametrize("given", ["chroma:8000", "ftp://chroma"])
def test_chroma_url_needs_http(given: str) -> None:
    with pytest.raises(ValidationError, match="http"):
        Settings(chroma_url=given)


# -- exposure: API keys and the listen address


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "localhost"])
def test_loopback_needs_no_keys(host: str) -> None:
    assert Settings(host=host).exposure_problem is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "gateway.internal"])
def test_other_addresses_need_keys_or_an_explicit_waiver(host: str) -> None:
    problem = Settings(host=host).exposure_problem
    assert problem is not None
    assert "HYBRID_API_KEYS" in problem
    assert "HYBRID_ALLOW_UNAUTHENTICATED" in problem
    assert Settings(host=host, api_keys=SecretStr("k")).exposure_problem is None
    assert Settings(host=host, allow_unauthenticated=True).exposure_problem is None


def test_serve_refuses_an_open_public_address(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    # It returns before building the app: nothing listens, nothing starts.
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in capsys.readouterr().err


def test_api_keys_are_a_comma_separated_set(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HYBRID_API_KEYS", " alpha, beta ,,alpha")
    assert Settings().api_key_set == frozenset({"alpha", "beta"})
    assert Settings(api_keys=None).api_key_set == frozenset()


@pytest.mark.parametrize("given", ["", " , ,"])
def test_api_keys_must_name_a_key(given: str) -> None:
    with pytest.raises(ValidationError, match="at least one key"):
        Settings(api_keys=SecretStr(given))


def test_secrets_come_from_files_and_the_environment_wins(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import service.settings

    (tmp_path / "hybrid_admin_token").write_text("from-a-file\n")
    (tmp_path / "hybrid_api_keys").write_text("k1,k2")
    clean_env.setattr(service.settings, "SECRETS_DIR", tmp_path)
    settings = service.settings.load_settings()
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "from-a-file"
    assert settings.api_key_set == frozenset({"k1", "k2"})
    clean_env.setenv("HYBRID_ADMIN_TOKEN", "from-the-environment")
    token = service.settings.load_settings().admin_token
    assert token is not None
    assert token.get_secret_value() == "from-the-environment"


def test_without_a_secrets_directory_nothing_is_read(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import service.settings

    clean_env.setattr(service.settings, "SECRETS_DIR", tmp_path / "absent")
    assert service.settings.load_settings().admin_token is None
