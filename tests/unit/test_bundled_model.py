"""The bundled model's checksum file, which decides whether the conversion runs again, and the
real converted model that ``make model`` leaves in the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adapters.durable import CHECKSUM_FILE
from service.bundled_model import (
    HF_ID,
    SERVED_NAME,
    _verify,
    _write_checksums,
    default_cache_dir,
    ensure_bundled_model,
    model_dir,
)

_FAKE_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer.json": b'{"version": "1.0"}',
}


def _fake_model(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name, content in _FAKE_FILES.items():
        (directory / name).write_bytes(content)
    _write_checksums(directory)
    return directory


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    return _fake_model(tmp_path / "model")


def test_checksums_record_every_file(fake_model: Path) -> None:
    recorded = json.loads((fake_model / CHECKSUM_FILE).read_text())
    assert recorded["format"] == 1
    assert sorted(recorded["files"]) == sorted(_FAKE_FILES)
    assert all(len(digest) == 64 for digest in recorded["files"].values())
    assert _verify(fake_model)


def test_changed_byte_fails(fake_model: Path) -> None:
    weights = fake_model / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[1000] ^= 0x01  # same size, one bit off
    weights.write_bytes(bytes(content))
    assert not _verify(fake_model)


def test_missing_file_fails(fake_model: Path) -> None:
    (fake_model / "tokenizer.json").unlink()
    assert not _verify(fake_model)


def test_unexpected_file_fails(fake_model: Path) -> None:
    (fake_model / "stray.bin").write_bytes(b"left over from an interrupted build")
    assert not _verify(fake_model)


def test_missing_checksum_file_fails(fake_model: Path) -> None:
    (fake_model / CHECKSUM_FILE).unlink()
    assert not _verify(fake_model)


def test_missing_directory_fails(tmp_path: Path) -> None:
    assert not _verify(tmp_path / "absent")


def test_empty_directory_with_checksums_fails(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _write_checksums(empty)
    assert not _verify(empty)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'{"format": 1, "files": {"config.json": "ab', id="truncated"),
        pytest.param(b"[]", id="json-list"),
        pytest.param(b"null", id="json-null"),
        pytest.param(b'"checksums"', id="json-string"),
        pytest.param(
            b'{"format": 1, "files": ["config.json", "model.safetensors", "tokenizer.json"]}',
            id="files-not-an-object",
        ),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
    ],
)
def test_corrupt_checksum_file_fails(fake_model: Path, content: bytes) -> None:
    """A damaged checksum file means "rebuild", never a crash of the gateway's start."""
    (fake_model / CHECKSUM_FILE).write_bytes(content)
    assert not _verify(fake_model)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_other_format_version_fails(fake_model: Path, version: object) -> None:
    checksum_path = fake_model / CHECKSUM_FILE
    recorded = json.loads(checksum_path.read_text())
    recorded["format"] = version
    checksum_path.write_text(json.dumps(recorded))
    assert not _verify(fake_model)


def test_missing_format_version_fails(fake_model: Path) -> None:
    checksum_path = fake_model / CHECKSUM_FILE
    recorded = json.loads(checksum_path.read_text())
    del recorded["format"]
    checksum_path.write_text(json.dumps(recorded))
    assert not _verify(fake_model)


def test_ensure_keeps_a_verified_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Should a conversion start after all, it fails at once instead of reaching the registry.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    cache = tmp_path / "cache"
    target = _fake_model(model_dir(cache))
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}

    model = ensure_bundled_model(cache)

    assert model.path == target
    assert (model.hf_id, model.served_name) == (HF_ID, SERVED_NAME)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    assert [p.name for p in cache.iterdir()] == [target.name]  # no build scratch left behind
    assert _verify(target)


def test_real_bundled_model() -> None:
    """What `make model` built (every make target builds it before the tests run)."""
    cache = Path(os.environ.get("HYBRID_CACHE_DIR") or default_cache_dir())
    target = model_dir(cache)
    if not target.is_dir():
        pytest.fail(f"the bundled model is missing at {target}: run `make model`")

    assert _verify(target), f"{target} fails its checksums: delete it and run `make model`"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (target / name).is_file(), name
    tokenizer_config = target / "tokenizer_config.json"
    has_template = (target / "chat_template.jinja").is_file() or (
        tokenizer_config.is_file() and "chat_template" in json.loads(tokenizer_config.read_text())
    )
    assert has_template, "the bundled model has no chat template"
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config  # a plain checkpoint, not a GGUF-quantised one
