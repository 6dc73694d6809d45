"""Keeps the router's classifier in line with what it learns from: the adapters' prompts, the
operator's labelled prompts and the bundled general-chat prompts.

The fitted router is stored in the :class:`~service.router_store.RouterStore` beside the
adapters, one write-once version per fit, so a restart reloads it without fitting and gateways
sharing the store share it. A version records the fingerprint of its inputs: when the adapters
change (registered, replaced, deleted, new examples), the inputs no longer match and a new
version is fitted in the background while requests keep the previous one; when they still
match (another gateway fitted first, or nothing routing-relevant changed), the stored version
is taken as it is. Fits hold the store's lock, so two gateways never publish the same change
twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from adapters.manifest import AdapterManifest
from index.embedder import Embedder, Vectors
from service.route_model import BASE, RouteModel
from service.route_training import FitSettings, FittedRoute, LabelledText, NothingToFitError, fit_route_model
from service.router_store import RouterStore, RouterStoreError, StoredRouter

logger = logging.getLogger(__name__)

FORMAT = 1
Manifests = Callable[[], Sequence[AdapterManifest]]


@dataclass(frozen=True)
class ActiveRoute:
    """The classifier in force and what describes it (``version`` None: not stored, a dry run)."""

    model: RouteModel
    version: int | None
    meta: dict[str, Any]


def routing_rows(
    manifests: Sequence[AdapterManifest], fit_rows: Sequence[tuple[str, str]], general: Sequence[str]
) -> list[LabelledText]:
    """Everything the classifier learns from, labelled. Labelled prompts naming an adapter that
    is no longer registered are left out."""
    rows: list[LabelledText] = []
    names = {m.name for m in manifests}
    for manifest in sorted(manifests, key=lambda m: m.name):
        rows += [LabelledText(text, manifest.name, "example") for text in manifest.examples]
        if manifest.description.strip():
            rows.append(LabelledText(manifest.description.strip(), manifest.name, "description"))
        rows += [LabelledText(text, manifest.name, "training") for text in manifest.training_prompts]
    rows += [LabelledText(text, label, "fit") for text, label in fit_rows if label == BASE or label in names]
    rows += [LabelledText(text, BASE, "general") for text in general]
    return [row for row in rows if row.text.strip()]


def fingerprint(rows: Sequence[LabelledText], embedder: str, settings: FitSettings) -> str:
    """Identifies a fit's inputs: same fingerprint, same model."""
    payload = {
        "format": FORMAT,
        "embedder": embedder,
        "settings": settings.key(),
        "rows": [[row.text, row.label, row.origin] for row in rows],
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


class RouteLearner:
    def __init__(
        self,
        embedder: Embedder,
        store: RouterStore | None,
        general: Sequence[str],
        settings: FitSettings | None = None,
    ) -> None:
        self._embedder = embedder
        self._store = store
        self._general = tuple(general)
        self.settings = settings or FitSettings()
        self._active: ActiveRoute | None = None
        self._vectors: dict[str, Vectors] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self.error: str | None = None
        """Why the last fit failed (None: it did not)."""

    @property
    def active(self) -> ActiveRoute | None:
        """The classifier in force (None: no adapter has a prompt to route on)."""
        return self._active

    @property
    def fitting(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- following the inputs

    async def load(self) -> None:
        """Take the store's current version as it is (on start: no fit)."""
        stored = await asyncio.to_thread(self._read_current)
        if stored is None:
            return
        try:
            self._active = _active(stored)
        except ValueError as exc:  # not a version this code wrote: the next refresh refits
            logger.error("stored router version %d unreadable, refitting: %s", stored.version, exc)

    def schedule(self, manifests: Manifests) -> None:
        """Bring the classifier in line with the adapters in the background; calls made while a
        refresh runs are folded into one more refresh after it."""
        if self.fitting:
            self._again = True
            return
        self._task = asyncio.create_task(self._refresh_loop(manifests))

    async def settled(self) -> None:
        """Wait for the background refresh, if any (tests, and the admin API)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def refresh(self, manifests: Manifests) -> ActiveRoute | None:
        """Refit now if the inputs changed; the active route after it."""
        async with self._lock:
            try:
                active = await asyncio.to_thread(self._refresh, manifests, None, False)
            except (OSError, RouterStoreError, ValueError) as exc:
                self.error = str(exc)
                logger.error("router not refitted: %s", exc)
                return self._active
            self.error = None
            self._active = active
            return active

    async def fit(
        self, manifests: Manifests, fit_rows: Sequence[tuple[str, str]], *, dry_run: bool
    ) -> ActiveRoute:
        """An operator's labelled prompts: fit with them (they replace the stored ones), store
        and activate the result unless ``dry_run``. NothingToFitError when no adapter has prompts."""
        async with self._lock:
            active = await asyncio.to_thread(self._refresh, manifests, tuple(fit_rows), dry_run)
            if active is None:
                raise NothingToFitError("no adapter has a prompt to route on")
            if not dry_run:
                self._active = active
            return active

    async def follow(self, manifests: Manifests) -> None:
        """Take a version another gateway published (shared storage)."""
        if self._store is None or self.fitting:
            return
        version = await asyncio.to_thread(self._store.current_version)
        current = self._active.version if self._active else None
        if version is not None and version != current:
            await self.load()
            self.schedule(manifests)

    async def _refresh_loop(self, manifests: Manifests) -> None:
        while True:
            self._again = False
            await self.refresh(manifests)
            if not self._again:
                return

    # -- blocking work (a thread)

    def _refresh(
        self, manifests: Manifests, fit_rows: tuple[tuple[str, str], ...] | None, dry_run: bool
    ) -> ActiveRoute | None:
        if self._store is None:
            return self._fit(list(manifests()), fit_rows or (), None, dry_run=True)
        with self._store.locked():
            stored = self._read_current()
            adapters = list(manifests())
            rows = fit_rows if fit_rows is not None else (stored.fit_rows if stored else ())
            return self._fit(adapters, rows, stored, dry_run=dry_run, force=fit_rows is not None)

    def _fit(
        self,
        manifests: list[AdapterManifest],
        fit_rows: Sequence[tuple[str, str]],
        stored: StoredRouter | None,
        *,
        dry_run: bool,
        force: bool = False,
    ) -> ActiveRoute | None:
        rows = routing_rows(manifests, fit_rows, self._general)
        key = fingerprint(rows, self._embedder.name, self.settings)
        if stored is not None and not force and stored.meta.get("fingerprint") == key:
            return _active(stored)
        if not any(row.label != BASE for row in rows):
            return None
        started = time.perf_counter()
        fitted = fit_route_model(rows, self._embed([row.text for row in rows]), self.settings)
        seconds = round(time.perf_counter() - started, 2)
        meta = _describe(fitted, key, self._embedder.name, self.settings, len(fit_rows), seconds)
        logger.info(
            "router fitted on %d prompts in %.1f s: %s", len(rows), seconds, json.dumps(meta["validation"])
        )
        if dry_run or self._store is None:
            return ActiveRoute(fitted.model, None, meta)
        published = self._store.publish(meta, fitted.model.arrays(), list(fit_rows))
        return _active(published)

    def _embed(self, texts: Sequence[str]) -> Vectors:
        missing = [text for text in dict.fromkeys(texts) if text not in self._vectors]
        if missing:
            for text, vector in zip(missing, self._embedder.embed(missing), strict=True):
                self._vectors[text] = vector
        wanted = set(texts)
        # Only what the current inputs use is kept: the cache follows the adapters.
        self._vectors = {text: v for text, v in self._vectors.items() if text in wanted}
        return np.vstack([self._vectors[text] for text in texts])

    def _read_current(self) -> StoredRouter | None:
        if self._store is None:
            return None
        try:
            return self._store.current()
        except RouterStoreError as exc:
            logger.error("stored router unreadable, refitting: %s", exc)
            return None


def _describe(
    fitted: FittedRoute, key: str, embedder: str, settings: FitSettings, fit_rows: int, seconds: float
) -> dict[str, Any]:
    return {
        **fitted.model.meta(),
        "format": FORMAT,
        "fingerprint": key,
        "embedder": embedder,
        "settings": settings.key(),
        "data": fitted.counts,
        "fit_rows": fit_rows,
        "general_dropped": fitted.general_dropped,
        "validation": asdict(fitted.validation),
        "fit_seconds": seconds,
    }


def _active(stored: StoredRouter) -> ActiveRoute:
    return ActiveRoute(RouteModel.from_stored(stored.meta, stored.arrays), stored.version, stored.meta)
