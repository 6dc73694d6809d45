"""Refuse a model directory whose files could run code when loaded, before anything loads it.

A model directory runs code on load in two ways: Python files that a config's ``auto_map``
points at (transformers' and sentence-transformers' ``trust_remote_code``), and weights in a
pickle format (``torch.load`` unpickles, and unpickling calls whatever the file names). So a
directory is accepted only when it holds no Python, no config asking for custom code, no
pickle-based (or other code-carrying) weights and at least one safetensors file. The check reads
names and small JSON configs only; it never imports, unpickles or loads anything.

Symbolic links are followed by the loaders, so a link counts as what it points at: a link to a
directory outside the checked one is refused (its files would escape the check), and a link
whose target is a refused kind of file is refused under either name. A link to an ordinary file
elsewhere is fine: that is how a Hugging Face cache snapshot points into its blobs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

_CODE = "could run on load (trust_remote_code); nothing in a model directory is ever executed"
_PICKLE = (
    "unpickling it can run arbitrary code, so it is never loaded; keep only safetensors weights "
    "(save_pretrained(..., safe_serialization=True))"
)
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib"})
"""Weights files in a pickle-based format (``torch.save``, joblib): never loaded, by any path."""
_REFUSED_SUFFIXES = {
    **dict.fromkeys((".py", ".pyc", ".pyo"), f"is Python code, which {_CODE}"),
    **dict.fromkeys(PICKLE_SUFFIXES, f"is a pickle-based checkpoint: {_PICKLE}"),
    **dict.fromkeys(
        (".h5", ".keras"),
        "is a Keras/HDF5 model, which can carry serialised Python code; keep only safetensors weights",
    ),
    ".gguf": "is a GGUF file: the engine loads safetensors only (--load-format safetensors); "
    "convert it to a safetensors directory",
}
"""Kinds of file that are refused wherever they are. ``.npy``/``.npz`` are not: numpy refuses
pickled arrays unless asked, and no loader here reads them."""

_REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
_ST_MODULE_PREFIX = "sentence_transformers."
_MAX_CONFIG_BYTES = 16 * 1024 * 1024
_MAX_ENTRIES = 10_000
_LISTED = 5  # problems spelt out in an error message; the rest are counted


@dataclass(frozen=True)
class FileProblem:
    """One reason to refuse a directory: the file (relative, ``.`` for the directory) and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"it {self.reason}" if self.path == "." else f"'{self.path}' {self.reason}"


class UnsafeModelError(ValueError):
    """A model or adapter directory holds something that could run code when loaded."""

    def __init__(self, directory: Path, problems: Sequence[FileProblem], *, what: str = "model") -> None:
        listed = "; ".join(str(p) for p in problems[:_LISTED])
        more = f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
        super().__init__(f"refusing to load the {what} in {directory}: {listed}{more}")
        self.directory = directory
        self.problems = tuple(problems)


def check_model_dir(directory: Path, *, what: str = "model", require_safetensors: bool = True) -> None:
    """Raise :class:`UnsafeModelError` naming every refused file of ``directory``."""
    problems = find_problems(directory, require_safetensors=require_safetensors)
    if problems:
        raise UnsafeModelError(directory, problems, what=what)


def find_problems(directory: Path, *, require_safetensors: bool = True) -> list[FileProblem]:
    """Every reason to refuse ``directory`` (walked recursively), in path order; empty when it
    may be loaded."""
    if not directory.is_dir():
        return [FileProblem(".", "is not a directory")]
    root = directory.resolve()
    problems: list[FileProblem] = []
    has_safetensors = False
    seen = 0

    def unreadable(error: OSError) -> None:
        problems.append(FileProblem(_relative(Path(error.filename or root), root), "cannot be read"))

    for current, dirs, files in os.walk(root, onerror=unreadable):
        dirs.sort()
        here = Path(current)
        for name in dirs:
            entry = here / name
            if entry.is_symlink():
                problems += _link_problems(entry, root)
        for name in sorted(files):
            seen += 1
            if seen > _MAX_ENTRIES:
                problems.append(FileProblem(".", f"holds over {_MAX_ENTRIES} files: not a model directory"))
                return problems
            entry = here / name
            rel = _relative(entry, root)
            if entry.is_symlink():
                link_problems = _link_problems(entry, root)
                problems += link_problems
                if link_problems:
                    continue
            reason = refused_file_reason(name)
            if reason is None and not entry.is_file():
                reason = "is not a regular file"  # a pipe or a device: never model data
            if reason is not None:
                problems.append(FileProblem(rel, reason))
                continue
            has_safetensors = has_safetensors or name.lower().endswith(".safetensors")
            problems += _config_problems(entry, rel)
    if require_safetensors and not has_safetensors:
        problems.append(
            FileProblem(
                ".", "holds no *.safetensors weights: only safetensors are loaded (pickles can run code)"
            )
        )
    return problems


def refused_file_reason(name: str) -> str | None:
    """Why a file called ``name`` is never accepted in a model directory, or None."""
    return _REFUSED_SUFFIXES.get(PurePath(name).suffix.lower())


def remote_code_keys(config: object) -> list[str]:
    """Dotted paths of the keys in a JSON config that ask for custom code: ``auto_map`` and
    ``custom_pipelines`` (at any depth) and a true ``trust_remote_code``."""
    found: list[str] = []
    stack: list[tuple[str, object]] = [("", config)]
    while stack:
        prefix, value = stack.pop()
        items = (
            value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        )
        for key, child in items:
            path = f"{prefix}{key}"
            if (key in _REMOTE_CODE_KEYS and child is not None) or (key == "trust_remote_code" and child):
                found.append(path)
            elif isinstance(child, dict | list):
                stack.append((f"{path}.", child))
    return sorted(found)


def _link_problems(link: Path, root: Path) -> list[FileProblem]:
    rel = _relative(link, root)
    target = link.resolve()
    if not target.exists():
        return [FileProblem(rel, "is a symbolic link to nothing")]
    if target.is_dir() and not target.is_relative_to(root):
        return [
            FileProblem(
                rel,
                f"is a symbolic link to {target}, a directory outside, whose files would escape this check",
            )
        ]
    reason = refused_file_reason(target.name) if target.is_file() else None
    return [FileProblem(rel, f"is a symbolic link to {target.name}, which {reason}")] if reason else []


def _config_problems(path: Path, rel: str) -> list[FileProblem]:
    name = path.name.lower()
    if not name.endswith(".json") or ("config" not in name and name != "modules.json"):
        return []
    try:
        size = path.stat().st_size
        if size > _MAX_CONFIG_BYTES:
            return [FileProblem(rel, f"is {size} bytes, too large for a config file to be inspected")]
        config = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return []  # unreadable or not JSON: the loader fails on it, and nothing here ran
    problems = [
        FileProblem(rel, f"sets {key}, which asks for custom code that {_CODE}")
        for key in remote_code_keys(config)
    ]
    if name == "modules.json" and isinstance(config, list):
        for module in config:
            kind = module.get("type") if isinstance(module, dict) else None
            if isinstance(kind, str) and not kind.startswith(_ST_MODULE_PREFIX):
                problems.append(
                    FileProblem(rel, f"names the module class {kind!r}, custom code that {_CODE}")
                )
    return problems


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
