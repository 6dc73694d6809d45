"""Reading a sentence-transformers model directory: which modules it chains, its pooling, its
dimension and its longest input, for the backends that reproduce it outside sentence-transformers
(the ONNX embedder). Only the plain layout is understood: a Transformer module, mean or CLS
pooling, and optionally Normalize; anything else raises :class:`UnsupportedModelError`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

_WEIGHT_FILES = ("model.safetensors",)  # never a pickle (pytorch_model.bin): see adapters/model_files.py

# modules.json names each module by class: the classic names, and the module paths that
# sentence-transformers 6 writes.
_TRANSFORMER = {"sentence_transformers.models.Transformer", "sentence_transformers.base.modules.transformer"}
_POOLING = {
    "sentence_transformers.models.Pooling",
    "sentence_transformers.sentence_transformer.modules.pooling",
}
_NORMALIZE = {"sentence_transformers.models.Normalize", "sentence_transformers.base.modules.normalize"}
_LEGACY_POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

Pooling = Literal["mean", "cls"]


class UnsupportedModelError(ValueError):
    """The sentence-transformers directory is not one this backend reproduces exactly."""


@dataclass(frozen=True)
class ModelLayout:
    """What the ONNX backend needs to know about a sentence-transformers directory."""

    transformer_dir: Path
    """The Hugging Face model (weights, config.json, tokenizer.json) inside the directory."""
    pooling: Pooling
    dimension: int
    max_seq_length: int
    """Longest input in tokens, special tokens included."""

    @property
    def weights(self) -> Path:
        for name in _WEIGHT_FILES:
            if (self.transformer_dir / name).is_file():
                return self.transformer_dir / name
        raise UnsupportedModelError(
            f"{self.transformer_dir} has no single weights file ({' or '.join(_WEIGHT_FILES)})"
        )


def read_layout(model_dir: Path) -> ModelLayout:
    """Read modules.json, the pooling config and sentence_bert_config.json; raise
    :class:`UnsupportedModelError` for anything but Transformer + Pooling (mean or CLS) +
    optional Normalize."""
    modules = _read_json(model_dir / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise UnsupportedModelError(f"{model_dir}/modules.json is not a list of modules")
    modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
    types = [str(m.get("type")) for m in modules]
    shape_ok = (
        len(types) in (2, 3)
        and types[0] in _TRANSFORMER
        and types[1] in _POOLING
        and (len(types) == 2 or types[2] in _NORMALIZE)
    )
    if not shape_ok:
        raise UnsupportedModelError(
            f"{model_dir} is {' -> '.join(types)}; the ONNX backend supports Transformer -> Pooling "
            "(-> Normalize) only"
        )
    transformer_dir = model_dir / str(modules[0].get("path", ""))
    pooling, dimension = _read_pooling(model_dir / str(modules[1].get("path", "")) / "config.json")

    st_config = _read_json(transformer_dir / "sentence_bert_config.json")
    if not isinstance(st_config, dict) or set(st_config) - {"max_seq_length", "do_lower_case"}:
        raise UnsupportedModelError(
            f"{transformer_dir}/sentence_bert_config.json has settings the ONNX backend does not "
            "reproduce (only max_seq_length and do_lower_case are understood)"
        )
    if st_config.get("do_lower_case"):
        raise UnsupportedModelError(f"{transformer_dir} lower-cases its input outside its tokenizer")
    max_seq_length = st_config.get("max_seq_length")
    if not isinstance(max_seq_length, int) or max_seq_length < 3:
        raise UnsupportedModelError(f"{transformer_dir}/sentence_bert_config.json declares no max_seq_length")
    if not (transformer_dir / "tokenizer.json").is_file():
        raise UnsupportedModelError(f"{transformer_dir} has no tokenizer.json (a fast tokenizer)")
    return ModelLayout(transformer_dir, pooling, dimension, max_seq_length)


def _read_pooling(path: Path) -> tuple[Pooling, int]:
    config = _read_json(path)
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{path} is not a pooling config")
    if "pooling_mode" in config:  # sentence-transformers 6
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [name for key, name in _LEGACY_POOLING_MODES.items() if config.get(key)]
    dimension = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if modes not in (["mean"], ["cls"]):
        raise UnsupportedModelError(
            f"{path}: pooling {'+'.join(modes) or 'none'}; the ONNX backend supports mean or cls"
        )
    if not isinstance(dimension, int) or dimension < 1:
        raise UnsupportedModelError(f"{path} declares no embedding dimension")
    pooling: Pooling = "mean" if modes == ["mean"] else "cls"
    return pooling, dimension


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UnsupportedModelError(f"{path} is missing") from None
