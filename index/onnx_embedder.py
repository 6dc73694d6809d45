"""The embedder on ONNX Runtime: the same sentence-transformers model, exported once to ONNX.

A short query embeds about three times faster than through PyTorch, and serving needs neither
torch nor transformers: only ``onnxruntime`` and ``tokenizers``. The vectors are the same (the
export is checked against the torch model when it is made), so an index built by one backend is
served by the other, and the embedder keeps its name.

Only the plain layout is supported: a Transformer module, mean or CLS pooling, and optionally
Normalize (vectors are normalised either way). Anything else raises :class:`UnsupportedModelError`
and the caller uses the torch backend.

The export is made once per cache directory, in a scratch directory renamed into place (an
interrupted export never looks finished), and verified by a checksum file on later calls. Making
it needs torch, transformers and onnx (the ``model`` extra): an install without them (the
gateway's Docker image) serves an export made elsewhere into the same cache directory, and says
how to make one when there is none. Exporting the bundled embedder also copies its files there
(``index/bundled_embedder.py``), for an install without the package that ships them.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from adapters.durable import sha256_file, verify_checksums, write_checksums
from adapters.extras import require
from adapters.model_files import check_model_dir
from index import bundled_embedder
from index.embedder import Vectors, bundled_embedder_path, default_cache_dir, embedder_name
from index.st_layout import ModelLayout, Pooling, UnsupportedModelError, read_layout

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
SOURCE_FILE = "hybrid-serve-source.json"
OPSET = 17
_FORMAT_VERSION = 1  # bump when the export changes, so old caches are rebuilt
_TOLERANCE = 1e-4  # largest difference allowed between a torch vector and an ONNX one at export


def ensure_onnx_model(model_dir: Path, cache_dir: Path, *, copy_bundled: bool = True) -> Path:
    """Return the ONNX export of the sentence-transformers model in ``model_dir`` (the
    ``model.onnx`` file, under ``cache_dir``), exporting it first if it is missing or fails its
    checksum. Raises :class:`UnsupportedModelError` for a model this backend cannot reproduce,
    ``UnsafeModelError`` for a directory holding code or pickles (never exported), and
    ``MissingExtraError`` when an export is needed and torch is not installed.

    With ``copy_bundled``, the bundled embedder's package files are also copied under
    ``cache_dir`` (once), for a gateway that shares the cache but not the package."""
    check_model_dir(model_dir, what="embedder")
    layout = read_layout(model_dir)
    digest = sha256_file(layout.weights)
    target = cache_dir / f"onnx-{embedder_name(model_dir)}-{digest[:12]}"
    if copy_bundled and model_dir == bundled_embedder.package_dir():
        bundled_embedder.ensure_copy(model_dir, cache_dir)
    if _verify(target):
        return target / MODEL_FILE
    require(
        "model",
        f"exporting the embedder to ONNX (there is no export in {cache_dir}: `hybrid-serve model` makes it)",
        "torch",
        "transformers",
        "onnx",
    )
    if target.exists():
        logger.warning("ONNX export at %s is incomplete or corrupt; rebuilding", target)
        shutil.rmtree(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("exporting the embedder %s to ONNX (once) into %s", model_dir, target)
    # Build beside the target and rename: an interrupted export never looks finished.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as scratch:
        out = Path(scratch) / "model"
        out.mkdir()
        versions = _export(layout, out / MODEL_FILE)
        source = {"model_dir": str(model_dir), "weights_sha256": digest, "opset": OPSET, **versions}
        (out / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True))
        _write_checksums(out)
        try:
            os.replace(out, target)
        except OSError:
            # Another process finished the same export first: theirs is as good as ours.
            if not _verify(target):
                raise
    logger.info("ONNX embedder ready at %s", target)
    return target / MODEL_FILE


def _export(layout: ModelLayout, path: Path) -> dict[str, str]:
    """Trace the Hugging Face model to ONNX, then check it against torch on inputs of other
    shapes than the traced ones. Returns the versions that made it."""
    # Heavy imports stay local: serving from an existing export needs neither torch nor transformers.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import onnx
    import torch
    import transformers
    from torch.jit._trace import TracerWarning
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        str(layout.transformer_dir),
        local_files_only=True,
        dtype=torch.float32,
        trust_remote_code=False,
        use_safetensors=True,
    ).eval()
    with_types = "token_type_ids" in inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            hidden: torch.Tensor = self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state
            return hidden

    tokenizer = _tokenizer(layout)
    # Traced on a padded batch, so the graph keeps the attention mask (transformers may skip an
    # all-ones mask while tracing, which would bake "no padding" into the graph).
    traced = _encode(tokenizer, ["a traced sample sentence with padding", "short"], with_types)
    # eval() on the wrapper itself: the exporter restores the wrapper's mode when it is done,
    # recursively, and a new module is in training mode (dropout on).
    wrapper = LastHiddenState().eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated (and chatty) but the one that exports this
        # model with dynamic axes in one second; the tracer's warnings are checked below.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(
            wrapper,
            tuple(torch.from_numpy(traced[name]) for name in names),
            str(path),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]},
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))

    session = _session(path, threads=None)
    probes = [
        ["one query, no padding"],
        ["three texts", "of quite different lengths, so that two of them are padded", "x " * 400],
    ]
    for texts in probes:
        feeds = _encode(tokenizer, texts, with_types)
        with torch.no_grad():
            expected = wrapper(*(torch.from_numpy(feeds[name]) for name in names)).numpy()
        (got,) = session.run(["last_hidden_state"], feeds)
        mask = feeds["attention_mask"]
        difference = np.abs(
            _pool(expected, mask, layout.pooling) - _pool(np.asarray(got), mask, layout.pooling)
        ).max()
        if not difference <= _TOLERANCE:
            raise UnsupportedModelError(
                f"the ONNX export of {layout.transformer_dir} differs from torch by {difference:.2g}"
            )
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _tokenizer(layout: ModelLayout, *, truncate: bool = True) -> Any:
    """The model's fast tokenizer, configured here rather than by tokenizer.json (which may carry
    its own truncation and padding: all-MiniLM-L6-v2's pads everything to 128)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(layout.transformer_dir / "tokenizer.json"))
    tokenizer.no_padding()
    if truncate:
        tokenizer.enable_truncation(max_length=layout.max_seq_length, strategy="longest_first")
    else:
        tokenizer.no_truncation()
    return tokenizer


def _encode(tokenizer: Any, texts: Sequence[str], with_types: bool) -> dict[str, npt.NDArray[np.int64]]:
    """Right-padded model inputs for ``texts``, in order."""
    encodings = tokenizer.encode_batch(list(texts))
    return _pad([encoding.ids for encoding in encodings], with_types)


def _pad(rows: Sequence[Sequence[int]], with_types: bool) -> dict[str, npt.NDArray[np.int64]]:
    # The pad id does not matter: padded positions are masked out of attention and pooling.
    ids = np.zeros((len(rows), max(len(row) for row in rows)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    if with_types:
        feeds["token_type_ids"] = np.zeros_like(ids)
    return feeds


def _pool(hidden: npt.NDArray[Any], mask: npt.NDArray[np.int64], pooling: Pooling) -> Vectors:
    """sentence-transformers' pooling then L2 normalisation, in numpy."""
    hidden = hidden.astype(np.float32, copy=False)
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return np.asarray(pooled / np.maximum(norms, 1e-12), dtype=np.float32)


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: one per physical core
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    # Idle intra-op threads sleep instead of spinning: the CPU is shared with the engine and
    # the gateway's event loop, and a query embeds in milliseconds then waits.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _write_checksums(directory: Path) -> None:
    write_checksums(directory, _FORMAT_VERSION)


def _verify(directory: Path) -> bool:
    return verify_checksums(directory, _FORMAT_VERSION, required=(MODEL_FILE,))


class OnnxEmbedder:
    """A sentence-transformers model run by ONNX Runtime on CPU (see the module docstring)."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        batch_size: int = 32,
        threads: int | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        cache = cache_dir or default_cache_dir()
        self._path = path or bundled_embedder_path(cache)
        # First: it refuses an unsafe directory (rather than leave it to the torch fallback)
        # before reading anything from it. No copy of the bundled files at each start: the
        # export step (`hybrid-serve model`) makes it.
        model_file = ensure_onnx_model(self._path, cache, copy_bundled=False)
        self._layout = read_layout(self._path)
        self._session = _session(model_file, threads)
        self._inputs = [node.name for node in self._session.get_inputs()]
        width = self._session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != self._layout.dimension:
            raise UnsupportedModelError(
                f"{self._path}: the model outputs {width} dimensions, its pooling config says "
                f"{self._layout.dimension}"
            )
        self._batch_size = batch_size
        # Two tokenizers, each configured once and never changed, so that encoding (a shared
        # borrow in the Rust binding) is safe from any thread: one truncates at the model's
        # limit, for embedding; the other does not, for chunking.
        self._tokenizer = _tokenizer(self._layout)
        self._splitter = _tokenizer(self._layout, truncate=False)
        # Forward passes are serialised, one batch at a time (each already uses every thread it
        # is given); a query waits for at most one batch of a long ingestion, not all of it.
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return embedder_name(self._path)

    @property
    def dimension(self) -> int:
        return self._layout.dimension

    @property
    def max_tokens(self) -> int:
        # The model adds [CLS] and [SEP] inside its own limit.
        return self._layout.max_seq_length - 2

    def count_tokens(self, text: str) -> int:
        return len(self._splitter.encode(text, add_special_tokens=False).ids)

    def split_tokens(self, text: str) -> list[tuple[int, int]]:
        encoding = self._splitter.encode(text, add_special_tokens=False)
        return [(int(start), int(end)) for start, end in encoding.offsets]

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), self._layout.dimension), dtype=np.float32)
        if not texts:
            return out
        rows = [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]
        # Sorted by length, so that each batch pads little.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        with_types = "token_type_ids" in self._inputs
        for start in range(0, len(order), self._batch_size):
            batch = order[start : start + self._batch_size]
            feeds = _pad([rows[i] for i in batch], with_types)
            with self._lock:
                (hidden,) = self._session.run(["last_hidden_state"], feeds)
            out[batch] = _pool(np.asarray(hidden), feeds["attention_mask"], self._layout.pooling)
        return out
