"""The ONNX Runtime embedder against the PyTorch one, on the real bundled model: the same
vectors, tokens and name; the export made once, verified, and rebuilt when damaged."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from adapters.durable import CHECKSUM_FILE
from index.embedder import SentenceTransformerEmbedder, bundled_embedder_path, load_embedder
from index.onnx_embedder import OnnxEmbedder, ensure_onnx_model
from index.st_layout import UnsupportedModelError, read_layout

SHORT = [
    "how do i say hello in japanese",
    "What's my balance?",
    "",
    "Café naïve résumé, 東京 and an emoji 🙂",
    "  leading and trailing spaces  ",
]
LONG = "The parcel tracking page updates every few hours, and carriers sometimes scan late. " * 30


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx(cache_dir: Path) -> OnnxEmbedder:
    """Exported once for the module (a few seconds)."""
    return OnnxEmbedder(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def torch_embedder() -> SentenceTransformerEmbedder:
    embedder = load_embedder(backend="torch")
    assert isinstance(embedder, SentenceTransformerEmbedder)
    return embedder


def assert_same_vectors(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert float(np.min(np.sum(got * expected, axis=1))) > 0.9999


def test_short_texts_embed_as_with_torch(
    onnx: OnnxEmbedder, torch_embedder: SentenceTransformerEmbedder
) -> None:
    for text in SHORT:
        assert_same_vectors(onnx.embed([text]), torch_embedder.embed([text]))


def test_a_long_text_is_truncated_as_with_torch(
    onnx: OnnxEmbedder, torch_embedder: SentenceTransformerEmbedder
) -> None:
    assert onnx.count_tokens(LONG) > 256
    assert_same_vectors(onnx.embed([LONG]), torch_embedder.embed([LONG]))
    # Past the limit, more text changes nothing.
    assert_same_vectors(onnx.embed([LONG + " Entirely different words at the end."]), onnx.embed([LONG]))


def test_a_mixed_batch_comes_back_in_input_order(
    onnx: OnnxEmbedder, torch_embedder: SentenceTransformerEmbedder, cache_dir: Path
) -> None:
    texts = [LONG, *SHORT, LONG[:300], "x", *SHORT[::-1]]
    small_batches = OnnxEmbedder(batch_size=3, cache_dir=cache_dir)
    expected = torch_embedder.embed(texts)
    assert_same_vectors(onnx.embed(texts), expected)
    assert_same_vectors(small_batches.embed(texts), expected)
    # Each text's vector does not depend on the company it is embedded in.
    assert_same_vectors(onnx.embed(texts), np.concatenate([onnx.embed([text]) for text in texts]))


def test_several_threads_at_once(onnx: OnnxEmbedder) -> None:
    texts = [*SHORT, LONG]
    expected = onnx.embed(texts), [onnx.split_tokens(text) for text in texts]

    def work(_: int) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
        return onnx.embed(texts), [onnx.split_tokens(text) for text in texts]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(8)))
    for vectors, spans in results:
        np.testing.assert_allclose(vectors, expected[0], atol=1e-6)
        assert spans == expected[1]


def test_nothing_to_embed(onnx: OnnxEmbedder) -> None:
    vectors = onnx.embed([])
    assert vectors.shape == (0, onnx.dimension)
    assert vectors.dtype == np.float32


def test_tokens_name_and_sizes_match_torch(
    onnx: OnnxEmbedder, torch_embedder: SentenceTransformerEmbedder
) -> None:
    for text in [*SHORT, LONG, "tabs\tand\nnewlines, [CLS] look-alikes and ##pieces"]:
        assert onnx.split_tokens(text) == torch_embedder.split_tokens(text)
        assert onnx.count_tokens(text) == torch_embedder.count_tokens(text)
    assert (onnx.name, onnx.dimension, onnx.max_tokens) == ("all-MiniLM-L6-v2", 384, 254)
    assert (onnx.name, onnx.dimension, onnx.max_tokens) == (
        torch_embedder.name,
        torch_embedder.dimension,
        torch_embedder.max_tokens,
    )


def test_a_corrupt_export_is_rebuilt(onnx: OnnxEmbedder, cache_dir: Path) -> None:
    model_file = ensure_onnx_model(bundled_embedder_path(), cache_dir)
    assert model_file.parent.parent == cache_dir
    assert model_file.parent.name.startswith("onnx-all-MiniLM-L6-v2-")
    assert (model_file.parent / CHECKSUM_FILE).is_file()
    size = model_file.stat().st_size
    with model_file.open("r+b") as file:
        file.truncate(size // 2)

    assert ensure_onnx_model(bundled_embedder_path(), cache_dir) == model_file
    assert model_file.stat().st_size == size
    assert not list(cache_dir.glob(".build-*"))  # no scratch directory left behind
    assert_same_vectors(OnnxEmbedder(cache_dir=cache_dir).embed(SHORT), onnx.embed(SHORT))


def copy_of_the_model(tmp_path: Path) -> Path:
    """The small files of the bundled model; the weights are linked, not copied."""
    source, copy = bundled_embedder_path(), tmp_path / "model"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    (copy / "model.safetensors").symlink_to(source / "model.safetensors")
    return copy


def test_an_unsupported_pooling_is_refused(tmp_path: Path) -> None:
    model = copy_of_the_model(tmp_path)
    pooling = model / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    pooling.write_text(
        json.dumps(config | {"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True})
    )

    with pytest.raises(ValueError, match="pooling max"):
        read_layout(model)
    with pytest.raises(ValueError, match="pooling max"):
        ensure_onnx_model(model, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_an_unsupported_module_is_refused(tmp_path: Path) -> None:
    model = copy_of_the_model(tmp_path)
    modules = json.loads((model / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))

    with pytest.raises(UnsupportedModelError, match="Transformer -> Pooling"):
        read_layout(model)


def test_load_embedder_falls_back_to_torch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = copy_of_the_model(tmp_path)
    # Lower-casing outside the tokenizer: sentence-transformers does it, the ONNX backend does not.
    (model / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 256, "do_lower_case": True})
    )

    embedder = load_embedder(model, cache_dir=tmp_path / "cache")

    assert isinstance(embedder, SentenceTransformerEmbedder)
    assert "embedding with torch instead" in caplog.text
    assert embedder.name == "model"
