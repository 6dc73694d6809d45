"""File-system steps that survive a crash or a power cut: written data is fsynced before it is
published, and a directory is fsynced after an entry in it is created, renamed or removed
(otherwise the rename itself may be lost). Removal renames first, so that an interrupted
removal leaves one scratch entry for the next sweep instead of a half-deleted directory under
its old name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

SCRATCH_PREFIX = ".tmp-"
_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_file_durably(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it (the caller fsyncs the directory)."""
    with path.open("xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def copy_file_durably(src: Path, dst: Path) -> str:
    """Copy ``src`` to a new ``dst``, fsync it, and return the sha256 of the bytes written, so
    the caller can check it against what was validated."""
    digest = hashlib.sha256()
    with src.open("rb") as source, dst.open("xb") as target:
        for block in iter(lambda: source.read(_BLOCK), b""):
            digest.update(block)
            target.write(block)
        target.flush()
        os.fsync(target.fileno())
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path, scratch_root: Path | None) -> None:
    """Remove a file, link or directory tree. With ``scratch_root``, first rename it to a
    scratch name there in one step, so that its old name is gone even if removal is cut short."""
    if scratch_root is not None:
        doomed = scratch_root / f"{SCRATCH_PREFIX}{uuid.uuid4().hex}"
        os.rename(path, doomed)
        fsync_dir(path.parent)
        path = doomed
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


CHECKSUM_FILE = "hybrid-serve-checksums.json"


def write_checksums(directory: Path, version: int) -> None:
    """Record the SHA-256 of every file of ``directory`` (a built cache: the bundled model, an
    ONNX export) in its checksum file, with the format ``version`` of what built it."""
    sums = {p.name: sha256_file(p) for p in _checksummed_files(directory)}
    payload = {"format": version, "files": sums}
    (directory / CHECKSUM_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))


def verify_checksums(directory: Path, version: int, *, required: tuple[str, ...] = ()) -> bool:
    """True when the checksum file exists, was written for ``version``, lists at least one file
    (``required`` among them) and matches every file exactly. Anything unreadable counts as a
    mismatch: the caller rebuilds."""
    checksum_path = directory / CHECKSUM_FILE
    if not checksum_path.is_file():
        return False
    try:
        recorded = json.loads(checksum_path.read_text())
    except (OSError, ValueError):  # ValueError covers bad JSON and bad UTF-8
        return False
    if not isinstance(recorded, dict) or recorded.get("format") != version:
        return False
    expected = recorded.get("files")
    if not isinstance(expected, dict) or not expected or not set(required) <= set(expected):
        return False
    if set(expected) != {p.name for p in _checksummed_files(directory)}:
        return False
    return all(sha256_file(directory / name) == digest for name, digest in expected.items())


def _checksummed_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name != CHECKSUM_FILE)
