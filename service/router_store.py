"""The durable store of fitted routers, kept beside the adapters (``<adapter store>/.router``) so
that every gateway sharing the adapter store serves the same router.

Layout::

    <root>/versions/000001/  router.json (metadata), head.safetensors (named arrays),
                             fit_data.jsonl (the labelled rows it was fitted on, one per line)
    <root>/current           symlink -> versions/<NNNNNN> (relative: mounts differ per host)
    <root>/.lock             the publishers' flock
    <root>/.tmp-<hex>        a write (or a removal) in progress

The recipe is the adapter store's (:mod:`adapters.store`): a version directory is written once
(each file fsynced, then the directory), renamed into ``versions`` and never changed again, and
is published by renaming a new ``current`` link over the old one. A reader that resolves the link
once therefore reads one whole version, and a crash at any step leaves the previous current
version in place. Publishers serialise with :meth:`RouterStore.locked`, an exclusive ``flock``
(on NFS, Linux maps it onto POSIX byte-range locks, which the server arbitrates).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import safetensors.numpy
from safetensors import SafetensorError

from adapters.durable import SCRATCH_PREFIX, fsync_dir, remove_tree, write_file_durably

logger = logging.getLogger(__name__)

META_FILE = "router.json"
HEAD_FILE = "head.safetensors"
FIT_DATA_FILE = "fit_data.jsonl"
VERSIONS_DIR = "versions"
CURRENT_LINK = "current"
LOCK_FILE = ".lock"
_ARRAY_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.int64)})
_VERSION_NAME = re.compile(r"[0-9]{6,}")
_READ_ATTEMPTS = 10


class RouterStoreError(Exception):
    """A version directory (or the ``current`` link) that does not parse; the message names it."""


@dataclass(frozen=True)
class StoredRouter:
    """One published router version, read whole from its directory."""

    version: int
    path: Path
    meta: dict[str, Any]
    arrays: dict[str, npt.NDArray[Any]]  # float32, int32 or int64, dtype as published
    fit_rows: tuple[tuple[str, str], ...]  # (text, label)


class RouterStore:
    """Router versions under ``root``; see the module docstring for the layout and guarantees.

    ``keep``: how many versions survive a publish (the newest ones, and always the current one).
    ``stale_after_s``: how old a ``.tmp-*`` leftover must be before the start-up sweep removes it.
    """

    def __init__(self, root: Path, *, keep: int = 10, stale_after_s: float = 600.0) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self.root = root
        self.keep = keep
        self._versions = root / VERSIONS_DIR
        self._versions.mkdir(parents=True, exist_ok=True)
        # Guards publish() against a caller that forgot locked(); the flock itself does the work.
        self._holders = 0
        self._holders_guard = threading.Lock()
        self._sweep(stale_after_s)

    # -- reading

    def current_version(self) -> int | None:
        """The version ``current`` points to (one readlink), or None when none was published."""
        link = self.root / CURRENT_LINK
        try:
            target = Path(os.readlink(link))
        except FileNotFoundError:
            return None
        except OSError as exc:  # EINVAL: a plain file or directory sits where the link should be
            raise RouterStoreError(f"{link} is not a symlink: {exc}") from exc
        if target.parent != Path(VERSIONS_DIR) or not _VERSION_NAME.fullmatch(target.name):
            raise RouterStoreError(f"{link} points to {target}, not to a version under {VERSIONS_DIR}/")
        return int(target.name)

    def current(self) -> StoredRouter | None:
        """The current version, or None when none was published; RouterStoreError when the link
        points to a missing or unparseable version."""
        version = self.current_version()
        for _ in range(_READ_ATTEMPTS):
            if version is None:
                return None
            try:
                return self._read(version)
            except FileNotFoundError as exc:
                # A publish may have swapped the link and pruned this version since we resolved
                # it: follow the link again. If it still points here, the version is really gone.
                latest = self.current_version()
                if latest == version:
                    raise RouterStoreError(
                        f"{self.root / CURRENT_LINK} points to {self._directory(version)}, "
                        f"which is missing or incomplete: {exc}"
                    ) from exc
                version = latest
        raise RouterStoreError(f"{self.root / CURRENT_LINK} kept changing while being read; try again")

    def read(self, version: int) -> StoredRouter:
        """That version; RouterStoreError when it is missing or does not parse."""
        try:
            return self._read(version)
        except FileNotFoundError as exc:
            raise RouterStoreError(f"{self._directory(version)} is missing or incomplete: {exc}") from exc

    # -- writing

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's exclusive lock, across processes and hosts, so that "read current,
        decide, publish" is atomic. Blocks: run it in a thread. Not reentrant."""
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self._holders_guard:
                self._holders += 1
            try:
                yield
            finally:
                with self._holders_guard:
                    self._holders -= 1
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def publish(
        self,
        meta: Mapping[str, Any],
        arrays: Mapping[str, npt.NDArray[Any]],
        fit_rows: Sequence[tuple[str, str]],
    ) -> StoredRouter:
        """Write a new version and make it current in one atomic swap; call it inside
        :meth:`locked`. ``meta`` must be JSON; ``version`` and ``created_at`` are set here."""
        with self._holders_guard:
            if self._holders == 0:
                raise RuntimeError("RouterStore.publish must be called inside RouterStore.locked()")
        version = self._next_version()
        created_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        meta_bytes = _encode_meta({**meta, "version": version, "created_at": created_at})
        head_bytes = _encode_arrays(arrays)
        rows_bytes = _encode_rows(fit_rows)

        scratch = self.root / f"{SCRATCH_PREFIX}{uuid.uuid4().hex}"
        scratch.mkdir()
        directory = self._directory(version)
        try:
            write_file_durably(scratch / META_FILE, meta_bytes)
            write_file_durably(scratch / HEAD_FILE, head_bytes)
            write_file_durably(scratch / FIT_DATA_FILE, rows_bytes)
            fsync_dir(scratch)
            os.rename(scratch, directory)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        fsync_dir(self._versions)
        staged = self.root / f"{SCRATCH_PREFIX}{uuid.uuid4().hex}"
        os.symlink(f"{VERSIONS_DIR}/{directory.name}", staged)
        os.replace(staged, self.root / CURRENT_LINK)  # the one moment readers switch
        fsync_dir(self.root)
        self._prune(current=version)
        # Parse what was written, so the caller holds exactly what a reader will see.
        return StoredRouter(
            version=version,
            path=directory,
            meta=json.loads(meta_bytes),
            arrays=dict(safetensors.numpy.load(head_bytes)),
            fit_rows=_decode_rows(rows_bytes, directory / FIT_DATA_FILE),
        )

    # -- internals

    def _directory(self, version: int) -> Path:
        return self._versions / f"{version:06d}"

    def _version_numbers(self) -> list[int]:
        return sorted(int(p.name) for p in self._versions.iterdir() if _VERSION_NAME.fullmatch(p.name))

    def _next_version(self) -> int:
        # Past the highest directory too: a crashed publish may have renamed its version in
        # without linking it, and a number once written is never reused (readers may hold it).
        return max([self.current_version() or 0, *self._version_numbers()]) + 1

    def _read(self, version: int) -> StoredRouter:
        """Parse one version directory; FileNotFoundError when it (or a file of it) is gone."""
        directory = self._directory(version)
        meta_bytes = (directory / META_FILE).read_bytes()
        head_bytes = (directory / HEAD_FILE).read_bytes()
        rows_bytes = (directory / FIT_DATA_FILE).read_bytes()
        try:
            meta = json.loads(meta_bytes)
        except ValueError as exc:  # bad JSON and bad UTF-8 alike
            raise RouterStoreError(f"{directory / META_FILE} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("version") != version:
            raise RouterStoreError(f"{directory / META_FILE} is not the metadata of version {version}")
        try:
            arrays = safetensors.numpy.load(head_bytes)
        except SafetensorError as exc:
            raise RouterStoreError(f"{directory / HEAD_FILE} is not a safetensors file: {exc}") from exc
        for name, array in arrays.items():
            if array.dtype not in _ARRAY_DTYPES:
                raise RouterStoreError(f"{directory / HEAD_FILE}: {name!r} has dtype {array.dtype}")
        fit_rows = _decode_rows(rows_bytes, directory / FIT_DATA_FILE)
        return StoredRouter(version, directory, meta, dict(arrays), fit_rows)

    def _prune(self, *, current: int) -> None:
        numbers = self._version_numbers()
        doomed = [n for n in numbers[: -self.keep] if n != current]
        for number in doomed:
            remove_tree(self._directory(number), self.root)

    def _sweep(self, stale_after_s: float) -> None:
        """Remove scratch entries left by interrupted writes, once old enough that no live
        publish (another gateway's, on shared storage) can still own them."""
        cutoff = time.time() - stale_after_s
        for entry in self.root.iterdir():
            if entry.name.startswith(SCRATCH_PREFIX) and _age_stamp(entry) <= cutoff:
                logger.info("removing %s, left by an interrupted write", entry)
                remove_tree(entry, None)


def _encode_meta(meta: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(meta, ensure_ascii=False, allow_nan=False, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"router metadata is not JSON-serialisable: {exc}") from exc
    return (text + "\n").encode()


def _encode_arrays(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    for name, array in arrays.items():
        if not isinstance(array, np.ndarray) or array.dtype not in _ARRAY_DTYPES:
            kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise ValueError(f"router array {name!r} must be float32, int32 or int64, not {kind}")
    # safetensors wants contiguous buffers; a transposed view is a valid thing to hand us.
    return safetensors.numpy.save({name: np.ascontiguousarray(a) for name, a in arrays.items()})


def _encode_rows(rows: Sequence[tuple[str, str]]) -> bytes:
    lines = []
    for text, label in rows:
        if not isinstance(text, str) or not isinstance(label, str):
            raise ValueError(f"a fit row must be (text, label) strings, not {(text, label)!r}")
        lines.append(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    return "".join(lines).encode()


def _decode_rows(data: bytes, path: Path) -> tuple[tuple[str, str], ...]:
    rows: list[tuple[str, str]] = []
    try:
        # Split on "\n" only: splitlines() would also cut at U+2028, which json.dumps leaves raw.
        for number, line in enumerate(data.decode().split("\n"), start=1):
            if not line:
                continue
            row = json.loads(line)
            if not (
                isinstance(row, dict)
                and isinstance(row.get("text"), str)
                and isinstance(row.get("label"), str)
            ):
                raise RouterStoreError(f"{path}, line {number}: not a {{'text', 'label'}} object")
            rows.append((row["text"], row["label"]))
    except ValueError as exc:
        raise RouterStoreError(f"{path} is not valid JSON lines: {exc}") from exc
    return tuple(rows)


def _age_stamp(path: Path) -> float:
    """The latest of modification and change time: a rename counts as a change."""
    stat = path.lstat()
    return max(stat.st_mtime, stat.st_ctime)
