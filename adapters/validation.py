"""Everything an adapter must pass before it is stored or reaches the engine.

The engine would refuse most bad adapters too, but late (after the store has them) and with
messages an operator cannot act on; some it would not refuse at all (pickled weights run code on
load). So each rule here fails early with :class:`AdapterValidationError`, whose message says
what to change. Weights are only ever inspected through safetensors' own parser, which checks
the file's whole layout but reads only its header: no pickle, no torch, no engine.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from adapters.config import LoraSettings, parse_lora_config
from adapters.durable import sha256_file
from adapters.errors import AdapterValidationError
from adapters.model_files import PICKLE_SUFFIXES, UnsafeModelError, check_model_dir
from adapters.safetensors_header import SafetensorsHeaderError, TensorInfo, read_header

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
ALWAYS_RESERVED = frozenset({"auto"})
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2; torch.save's zip archive
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_SAVE_HINT = "save it with save_pretrained(..., safe_serialization=True)"
# PEFT writes "base_model.model.<module path>.lora_A.weight"; embeddings use lora_embedding_A.
_LORA_TENSOR = re.compile(
    r"(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight"
    r"|lora_embedding_A|lora_embedding_B)"
)


@dataclass(frozen=True)
class BaseModelInfo:
    """What adapters are checked against: the names the base model answers to and its modules."""

    served_id: str
    aliases: frozenset[str]
    module_names: frozenset[str] | None = None
    """Last path component of every 2-D weight (q_proj, ..., embed_tokens); None when unknown."""
    weight_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)
    """Module path (``model.layers.0.self_attn.q_proj``) -> its weight's shape, for shape checks."""
    engine_model: str | None = None
    """What the engine was started with (``--model``; the base's ``root`` in /v1/models)."""

    @classmethod
    def from_model_dir(cls, path: Path, served_id: str, hf_id: str | None) -> BaseModelInfo:
        """Read the names and shapes from the safetensors headers of a Hugging Face directory."""
        resolved = path.resolve()
        aliases = {served_id, str(resolved)} | ({hf_id} if hf_id else set())
        shapes: dict[str, tuple[int, ...]] = {}
        files = sorted(resolved.glob("*.safetensors"))
        try:
            for weights in files:
                for name, info in read_header(weights).items():
                    if name.endswith(".weight") and len(info.shape) == 2:
                        shapes[name.removesuffix(".weight")] = info.shape
        except (OSError, SafetensorsHeaderError) as exc:
            # An odd base model must not stop the gateway; adapters just get fewer checks.
            logger.warning("cannot read the base model's weights in %s (%s); module checks off", path, exc)
            files, shapes = [], {}
        modules = frozenset(p.rsplit(".", 1)[-1] for p in shapes) if files else None
        return cls(served_id, frozenset(aliases), modules, shapes)

    def names(self, value: str) -> bool:
        """True when ``value`` (an id, a Hugging Face id or a directory) names this model."""
        if value.casefold() in {a.casefold() for a in self.aliases}:
            return True
        candidate = Path(value).expanduser()
        return candidate.is_absolute() and str(candidate.resolve()) in self.aliases


@dataclass(frozen=True)
class AdapterSpec:
    """What validation learned about an adapter: recorded in its manifest."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    """Module names the weights actually adapt, sorted."""
    base_model_name_or_path: str
    sha256: str


def validate_adapter(
    config_bytes: bytes, weights_path: Path, *, base: BaseModelInfo, max_rank: int
) -> AdapterSpec:
    """Check a PEFT LoRA adapter (its ``adapter_config.json`` bytes and its weights file)."""
    _refuse_pickle_name(weights_path)
    lora = parse_lora_config(config_bytes, max_rank=max_rank)
    if not base.names(lora.base_model):
        others = sorted(a for a in base.aliases if not Path(a).is_absolute())
        raise AdapterValidationError(
            f"base_model_name_or_path is {lora.base_model!r}, but this server serves "
            f"{base.served_id!r}: set it to one of {others} or the model's directory, "
            "or train the adapter on this base model",
            "config.base_model_name_or_path",
        )
    if base.module_names is not None and lora.listed_modules is not None:
        unknown = sorted(set(lora.listed_modules) - base.module_names)
        if unknown:
            raise AdapterValidationError(
                f"target_modules {unknown} do not exist in {base.served_id}; "
                f"its modules are {sorted(base.module_names)}",
                "config.target_modules",
            )
    tensors = _read_weights(weights_path)
    modules = _check_tensors(tensors, lora, base)
    return AdapterSpec(lora.rank, lora.alpha, modules, lora.base_model, sha256_file(weights_path))


def _refuse_pickle_name(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterValidationError(
            f"adapter weights must be a safetensors file, not {path.name!r} (a pickle, which is "
            f"never loaded because it can run code); {_SAVE_HINT}",
            "weights",
        )


def _read_weights(path: Path) -> dict[str, TensorInfo]:
    try:
        return read_header(path)
    except SafetensorsHeaderError as exc:
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic.startswith(_PICKLE_MAGIC):
            message = "adapter weights are a pickled PyTorch checkpoint (torch.save), never loaded"
        else:
            message = f"adapter weights are not a valid safetensors file: {exc}"
        raise AdapterValidationError(f"{message}; {_SAVE_HINT}", "weights") from None
    except OSError as exc:
        raise AdapterValidationError(f"cannot read the adapter weights: {exc.strerror}", "weights") from None


def _check_tensors(
    tensors: Mapping[str, TensorInfo], lora: LoraSettings, base: BaseModelInfo
) -> tuple[str, ...]:
    """Every tensor is a LoRA A or B matrix of an allowed module, with consistent ranks and shapes;
    returns the adapted module names."""
    pairs: dict[str, dict[str, TensorInfo]] = {}
    embeddings: set[str] = set()
    for name, info in tensors.items():
        match = _LORA_TENSOR.fullmatch(name)
        if match is None:
            raise AdapterValidationError(
                f"tensor {name!r} is not a LoRA matrix (expected '<module>.lora_A.weight' and "
                "'<module>.lora_B.weight'); extra trained modules or biases are not supported",
                "weights",
            )
        if info.dtype not in _FLOAT_DTYPES:
            raise AdapterValidationError(
                f"tensor {name!r} is {info.dtype}; LoRA weights must be F32, F16 or BF16", "weights"
            )
        kind = match["kind"]  # the letter names the matrix; "embedding" flips the base shape
        letter = "A" if kind in ("lora_A.weight", "lora_embedding_A") else "B"
        pairs.setdefault(match["module"], {})[letter] = info
        if kind.startswith("lora_embedding"):
            embeddings.add(match["module"])
    if not pairs:
        raise AdapterValidationError("the adapter weights hold no LoRA tensors", "weights")
    names = set()
    for path, pair in sorted(pairs.items()):
        module = path.rsplit(".", 1)[-1]
        _check_module(path, module, pair, lora, base, embedding=path in embeddings)
        names.add(module)
    return tuple(sorted(names))


def _check_module(
    path: str,
    module: str,
    pair: Mapping[str, TensorInfo],
    lora: LoraSettings,
    base: BaseModelInfo,
    *,
    embedding: bool,
) -> None:
    if base.module_names is not None and module not in base.module_names:
        raise AdapterValidationError(
            f"the weights adapt {path!r}, but {base.served_id} has no {module!r} module", "weights"
        )
    if lora.listed_modules is not None and module not in lora.listed_modules:
        raise AdapterValidationError(
            f"the weights adapt {path!r}, which target_modules does not list", "weights"
        )
    if set(pair) != {"A", "B"}:
        raise AdapterValidationError(f"module {path!r} lacks its lora_A or lora_B matrix", "weights")
    a, b = pair["A"].shape, pair["B"].shape
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise AdapterValidationError(
            f"module {path!r}: lora_A {list(a)} and lora_B {list(b)} are not [r, in] and [out, r]",
            "weights",
        )
    if a[0] not in lora.ranks:
        raise AdapterValidationError(
            f"module {path!r} has rank {a[0]}, but the config says r={lora.rank}; "
            "upload the config saved with these weights",
            "weights",
        )
    expected = base.weight_shapes.get(path)
    # A Linear weight is [out, in]; an embedding's is [vocab, dim] and its LoRA runs the other way.
    if expected is not None and embedding:
        expected = expected[::-1]
    if expected is not None and (b[0], a[1]) != tuple(expected):
        raise AdapterValidationError(
            f"module {path!r} maps {a[1]} -> {b[0]} features, but the base model's is "
            f"{expected[1]} -> {expected[0]}: the adapter was trained on another model",
            "weights",
        )


def validate_name(name: str, *, reserved: set[str]) -> str:
    """An adapter name is a lower-case slug that shadows neither ``auto`` nor a served model."""
    if not NAME_PATTERN.fullmatch(name):
        raise AdapterValidationError(
            f"adapter name {name!r} is invalid: use 1-64 characters of a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or a digit",
            "name",
        )
    if name in ALWAYS_RESERVED:
        raise AdapterValidationError(f"{name!r} is reserved: it asks the router to choose", "name")
    if name.casefold() in {r.casefold() for r in reserved}:
        raise AdapterValidationError(
            f"{name!r} would shadow the served model of that name; choose another name", "name"
        )
    return name


def resolve_import_path(raw: str, import_root: Path | None) -> Path:
    """The real path of a server-side adapter source, which must lie inside the import root."""
    if import_root is None:
        raise AdapterValidationError(
            "only uploads are accepted: no import directory is configured (HYBRID_ADAPTER_IMPORT_DIR)",
            "path",
        )
    if not raw or "\x00" in raw:
        raise AdapterValidationError("path is empty or holds a NUL byte", "path")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", raw) or raw.startswith(("//", "\\\\")):
        raise AdapterValidationError(
            f"{raw!r} is a URL; URLs are never fetched: give a path inside the import directory "
            "or upload the files",
            "path",
        )
    if ".." in re.split(r"[/\\]", raw):
        raise AdapterValidationError("path may not contain '..' segments", "path")
    root = import_root.resolve()
    candidate = Path(raw)
    if candidate.is_absolute() and not (
        candidate.is_relative_to(import_root) or candidate.is_relative_to(root)
    ):
        raise AdapterValidationError("an absolute path must lie inside the import directory", "path")
    real = (root / candidate).resolve()  # an absolute candidate replaces root here
    if not real.is_relative_to(root):
        raise AdapterValidationError(
            "path leads outside the import directory (through a symbolic link); copy the adapter in",
            "path",
        )
    if not real.exists():
        raise AdapterValidationError(f"{raw!r} does not exist in the import directory", "path")
    if real.is_dir():
        # Only the two PEFT files are copied out, but a directory carrying code or pickles is
        # not one to take anything from. (The missing-safetensors case has its own message.)
        try:
            check_model_dir(real, what="adapter", require_safetensors=False)
        except UnsafeModelError as exc:
            raise AdapterValidationError(str(exc), "path") from None
    return real
