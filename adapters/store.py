"""The durable adapter store: a directory the engine reads adapters from by name.

Layout::

    <root>/<name>                   symlink -> .versions/<name>-<hex>  (relative: the store may
                                    be mounted at different paths on different hosts)
    <root>/.versions/<name>-<hex>/  adapter_config.json, adapter_model.safetensors, manifest.json
    <root>/.tmp-<hex>               a write (or a removal) in progress
    <root>/.router/                 the fitted routers (:mod:`service.router_store`): not ours

Why this shape: a version directory is written once (each file fsynced, then the directory),
renamed into ``.versions`` and never changed again. Registration then publishes it by creating
the ``<name>`` link; replacement by renaming a new link over the old one (``os.replace``, atomic
on POSIX). A reader that resolves the link once (``get``, ``path``) therefore finds the old
complete version or the new complete one, never a mix and never nothing, and a crash at any
step leaves at worst an unreferenced ``.tmp-*`` or version, swept up by a later start. Renaming
a directory over a non-empty directory is not possible, which is why the swap is done on a
link. :meth:`AdapterStore.path` returns the version directory itself, so one engine load reads
config and weights of the same version; the version a replace superseded is kept until the
next replace of that name (or a later start's sweep), so that requests still running on it can
finish even if the engine re-reads it from disk (vLLM does, for an adapter that fell out of its
CPU cache). Delete removes every version.

Concurrency: operations on different names never touch the same files. Operations on one name
must be serialised by the caller (the gateway holds one lock per name). Leftovers are swept only
once they are ``stale_after_s`` old, so a gateway starting on shared storage does not sweep
another gateway's write in progress.
"""

from __future__ import annotations

import builtins
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from adapters.durable import SCRATCH_PREFIX, copy_file_durably, fsync_dir, remove_tree, write_file_durably
from adapters.errors import AdapterExistsError, AdapterStoreError, AdapterValidationError
from adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, AdapterManifest, ManifestError
from adapters.validation import NAME_PATTERN

logger = logging.getLogger(__name__)

VERSIONS_DIR = ".versions"
ROUTER_DIR = ".router"  # the router store's, kept here so gateways sharing adapters share it
TMP_PREFIX = SCRATCH_PREFIX
_HEX = 32  # uuid4().hex


@dataclass(frozen=True)
class AdapterRecord:
    """A registered adapter: its manifest and the directory the engine loads it from."""

    manifest: AdapterManifest
    path: Path

    @property
    def name(self) -> str:
        return self.manifest.name


class AdapterStore:
    """Adapters under ``root``; see the module docstring for the layout and its guarantees.

    ``stale_after_s``: how old a leftover (scratch entry, unreferenced version) must be before
    the start-up sweep removes it; 0 is right when no other process writes to ``root``.
    """

    def __init__(self, root: Path, *, stale_after_s: float = 600.0) -> None:
        self.root = root
        self._versions = root / VERSIONS_DIR
        self._versions.mkdir(parents=True, exist_ok=True)
        self._sweep(stale_after_s)

    # -- reading

    def get(self, name: str) -> AdapterRecord | None:
        """The adapter of that name, or None; never one that is half written."""
        if not NAME_PATTERN.fullmatch(name):
            return None
        # A concurrent replace may prune the version we resolved between two reads: resolve again.
        for _ in range(3):
            try:
                return self._read(name)
            except FileNotFoundError:
                continue
        return None

    def list(self) -> list[AdapterRecord]:
        """Every readable adapter, sorted by name."""
        records = (self.get(entry.name) for entry in sorted(self.root.iterdir(), key=lambda p: p.name))
        return [record for record in records if record is not None]

    def path(self, name: str) -> Path:
        """The directory the engine loads ``name`` from: one version, never changed once written
        (KeyError when unknown). ``<root>/<name>`` is the stable alias of the current one."""
        record = self.get(name)
        if record is None:
            raise KeyError(name)
        return record.path

    # -- writing

    def put(
        self,
        name: str,
        config_bytes: bytes,
        weights_src: Path,
        manifest: AdapterManifest,
        *,
        replace: bool,
    ) -> AdapterRecord:
        """Store a validated adapter under ``name`` durably, or swap it in atomically when
        ``replace``; raise :class:`AdapterExistsError` when it exists and ``replace`` is false."""
        if not NAME_PATTERN.fullmatch(name) or manifest.name != name:
            raise AdapterStoreError(f"invalid adapter name {name!r} (or a manifest for another name)")
        link = self.root / name
        if not replace and os.path.lexists(link):
            raise AdapterExistsError(name)
        if link.is_dir() and not link.is_symlink():
            raise AdapterStoreError(f"{link} is a plain directory the store did not write; delete it first")
        version = self._write_version(name, config_bytes, weights_src, manifest)
        target = f"{VERSIONS_DIR}/{version.name}"
        previous = os.readlink(link) if link.is_symlink() else None
        try:
            if replace:
                staged = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
                os.symlink(target, staged)
                os.replace(staged, link)  # the one moment the name changes meaning
            else:
                os.symlink(target, link)  # fails if a concurrent put won: never overwrites
        except FileExistsError:
            remove_tree(version, self.root)
            raise AdapterExistsError(name) from None
        fsync_dir(self.root)
        self._prune(name, keep={version.name, Path(previous or "").name})
        return AdapterRecord(manifest, version)

    def revert(self, name: str, to: AdapterRecord) -> None:
        """Point ``name`` back at an earlier version still on disk (one atomic rename), and drop
        the others: a replacement the engine refused must not stay the stored truth."""
        version = to.path
        if version.parent != self._versions or not version.is_dir():
            raise AdapterStoreError(f"version {version.name} of {name!r} is no longer on disk")
        staged = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        os.symlink(f"{VERSIONS_DIR}/{version.name}", staged)
        os.replace(staged, self.root / name)
        fsync_dir(self.root)
        self._prune(name, keep={version.name})

    def delete(self, name: str) -> bool:
        """Remove the adapter and its versions; False when there was none."""
        link = self.root / name
        if not NAME_PATTERN.fullmatch(name) or not os.path.lexists(link):
            return False
        # Rename away first: the name disappears in one step, whatever the removal below meets.
        doomed = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        os.rename(link, doomed)
        fsync_dir(self.root)
        if doomed.is_symlink():
            doomed.unlink()
            self._prune(name, keep=set())
        else:
            remove_tree(doomed, self.root)
        return True

    # -- internals

    def _read(self, name: str, *, log: int = logging.DEBUG) -> AdapterRecord | None:
        """The record behind ``<root>/<name>``, None when it is not a complete adapter; raises
        FileNotFoundError when a link's version vanished (a concurrent prune: resolve again)."""
        link = self.root / name
        if link.is_symlink():
            directory = self.root / os.readlink(link)
            if directory.parent.resolve() != self._versions.resolve():
                logger.log(log, "ignoring %s: it points outside %s", link, self._versions)
                return None
        elif link.is_dir():
            directory = link  # copied in by hand: served as is, but never swapped in place
        else:
            logger.log(log, "ignoring %s: neither a link nor a directory", link)
            return None
        try:
            manifest = AdapterManifest.from_json((directory / MANIFEST_FILE).read_bytes())
        except FileNotFoundError:
            if directory is not link:
                raise
            manifest = None
        except ManifestError as exc:
            logger.log(log, "ignoring %s: invalid manifest (%s)", link, exc)
            return None
        complete = all((directory / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE))
        if manifest is None or manifest.name != name or not complete:
            logger.log(log, "ignoring %s: no manifest for %r, or a PEFT file is missing", link, name)
            return None
        return AdapterRecord(manifest, directory)

    def _write_version(
        self, name: str, config_bytes: bytes, weights_src: Path, manifest: AdapterManifest
    ) -> Path:
        scratch = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        scratch.mkdir()
        try:
            digest = copy_file_durably(weights_src, scratch / WEIGHTS_FILE)
            if digest != manifest.sha256:
                # The source changed after validation (an import path is someone else's file).
                raise AdapterValidationError(
                    "the adapter weights changed while being registered; try again", "weights"
                )
            write_file_durably(scratch / CONFIG_FILE, config_bytes)
            write_file_durably(scratch / MANIFEST_FILE, manifest.to_json())
            fsync_dir(scratch)
            version = self._versions / f"{name}-{uuid.uuid4().hex}"
            os.rename(scratch, version)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        fsync_dir(self._versions)
        fsync_dir(self.root)
        return version

    def _versions_of(self, name: str) -> builtins.list[Path]:
        return [
            entry
            for entry in self._versions.iterdir()
            if len(entry.name) == len(name) + 1 + _HEX and entry.name.startswith(f"{name}-")
        ]

    def _prune(self, name: str, *, keep: set[str]) -> None:
        for version in self._versions_of(name):
            if version.name not in keep:
                remove_tree(version, self.root)

    def _sweep(self, stale_after_s: float) -> None:
        """Remove what crashed writes left behind: scratch entries and unreferenced versions."""
        cutoff = time.time() - stale_after_s
        referenced: set[str] = set()
        for entry in self.root.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                if _age_stamp(entry) <= cutoff:
                    logger.info("removing %s, left by an interrupted write", entry)
                    remove_tree(entry, None)
                continue
            if entry.is_symlink():
                referenced.add(Path(os.readlink(entry)).name)
            if entry.name in (VERSIONS_DIR, ROUTER_DIR):
                continue
            if not NAME_PATTERN.fullmatch(entry.name):
                logger.warning("ignoring %s: not an adapter name", entry)
                continue
            try:
                self._read(entry.name, log=logging.WARNING)
            except FileNotFoundError:
                logger.warning("ignoring %s: the version it points to is missing", entry)
        for version in self._versions.iterdir():
            if version.name not in referenced and _age_stamp(version) <= cutoff:
                logger.info("removing %s, a version no name refers to", version)
                remove_tree(version, self.root)


def _age_stamp(path: Path) -> float:
    """The latest of modification and change time: a rename counts as a change."""
    stat = path.lstat()
    return max(stat.st_mtime, stat.st_ctime)
