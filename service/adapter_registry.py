"""Registered adapters: validate, store durably, load into the engine, and keep the engine's
adapter set equal to the store's (on start and after every engine restart).

No HTTP here: the admin routes parse and call one method. Blocking work (hashing, copying,
fsync) runs in a thread; one lock per name serialises operations on a name while different
names proceed in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from adapters.config import rebase_config
from adapters.errors import AdapterExistsError, AdapterValidationError
from adapters.manifest import AdapterManifest
from adapters.store import AdapterRecord, AdapterStore
from adapters.validation import BaseModelInfo, validate_adapter, validate_name
from service.catalog import AUTO
from service.engine import Engine
from service.errors import APIError, ConflictError, EngineUnavailableError, InvalidRequestError, NotFoundError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class AdapterSource:
    """The two PEFT files of a registration, already on the gateway's disk (an upload or a
    copy of an import-directory source)."""

    config_bytes: bytes
    weights_path: Path


@dataclass(frozen=True)
class Registration:
    name: str
    description: str = ""
    examples: tuple[str, ...] = ()
    threshold: float | None = None
    replace: bool = False


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        engine: Engine,
        *,
        base_model: Callable[[], BaseModelInfo | None],
        max_rank: int,
        retry_after_s: int,
    ) -> None:
        self._store = store
        self._engine = engine
        self._base_model = base_model
        self._max_rank = max_rank
        self._retry_after_s = retry_after_s
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._names: frozenset[str] = frozenset(r.name for r in store.list())
        self._loaded: set[str] = set()
        self._reconciled = asyncio.Event()

    # -- what chat requests ask

    def is_registered(self, name: str) -> bool:
        return name in self._names

    def check_servable(self, name: str) -> None:
        """503 while the engine (re)loads a registered adapter, rather than a misleading 404."""
        if not self._reconciled.is_set() or name not in self._loaded:
            raise EngineUnavailableError(
                f"The adapter '{name}' is being loaded into the engine; retry shortly.",
                retry_after_s=self._retry_after_s,
            )

    @property
    def reconciled(self) -> bool:
        """The engine's adapters equal the store's since its last (re)start."""
        return self._reconciled.is_set()

    async def wait_reconciled(self) -> None:
        await self._reconciled.wait()

    def engine_lost(self) -> None:
        """The engine restarted: nothing is loaded until the next :meth:`reconcile`."""
        self._reconciled.clear()
        self._loaded.clear()

    # -- the admin operations

    def list(self) -> list[AdapterRecord]:
        return self._store.list()

    def get(self, name: str) -> AdapterRecord:
        record = self._store.get(name)
        if record is None:
            raise NotFoundError(f"No adapter named '{name}'.", param="name", code="adapter_not_found")
        return record

    async def register(self, registration: Registration, source: AdapterSource) -> AdapterRecord:
        base = self._require_base()
        name = _as_request_error(lambda: validate_name(registration.name, reserved={base.served_id, AUTO}))
        spec = await asyncio.to_thread(
            _as_request_error,
            lambda: validate_adapter(
                source.config_bytes, source.weights_path, base=base, max_rank=self._max_rank
            ),
        )
        manifest = AdapterManifest.from_spec(
            name,
            spec,
            description=registration.description,
            examples=registration.examples,
            threshold=registration.threshold,
        )
        # vLLM's filesystem resolver (many replicas) loads an adapter only when its config
        # names the served id, whichever alias it was made with.
        config = rebase_config(source.config_bytes, base.served_id)
        async with self._locks[name]:
            previous = self._store.get(name)
            if previous is not None and not registration.replace:
                raise ConflictError(
                    f"An adapter named '{name}' exists; pass replace=true to swap it.",
                    param="name",
                    code="adapter_exists",
                )
            try:
                record = await asyncio.to_thread(
                    self._store.put, name, config, source.weights_path, manifest, replace=previous is not None
                )
            except AdapterExistsError as exc:  # another gateway on shared storage won the race
                raise ConflictError(str(exc), param="name", code="adapter_exists") from exc
            try:
                await self._engine.load_adapter(name, str(record.path), replace=name in self._loaded)
            except APIError:
                # Not acknowledged, so not kept: the store goes back to what the engine serves.
                if previous is None:
                    await asyncio.to_thread(self._store.delete, name)
                else:
                    await asyncio.to_thread(self._store.revert, name, previous)
                raise
            self._loaded.add(name)
            self._names = self._names | {name}
            logger.info("adapter %s %s (rank %d)", name, "replaced" if previous else "registered", spec.rank)
            return record

    async def delete(self, name: str) -> None:
        async with self._locks[name]:
            if not await asyncio.to_thread(self._store.delete, name):
                raise NotFoundError(f"No adapter named '{name}'.", param="name", code="adapter_not_found")
            self._names = self._names - {name}
            self._loaded.discard(name)
            # Gone from the store: if the engine is down, the next reconciliation will not load it.
            with contextlib.suppress(EngineUnavailableError):
                await self._engine.unload_adapter(name)
            logger.info("adapter %s deleted", name)

    async def reconcile(self) -> None:
        """Make the engine's adapters equal to the store's: load the missing, reload those it
        holds from another version, unload the rest. Registrations and deletions may run
        meanwhile: each name is handled under its lock against the store as it is then."""
        cards = await self._engine.list_models()
        in_engine = {card.id: card.root for card in cards if card.parent is not None}
        stored = {record.name for record in await asyncio.to_thread(self._store.list)}
        for name in sorted(set(in_engine) | stored):
            async with self._locks[name]:
                record = await asyncio.to_thread(self._store.get, name)
                try:
                    if record is None:
                        self._loaded.discard(name)
                        await self._engine.unload_adapter(name)
                    elif in_engine.get(name, "") != str(record.path):
                        await self._engine.load_adapter(name, str(record.path), replace=name in in_engine)
                        self._loaded.add(name)
                    else:
                        self._loaded.add(name)
                except APIError as exc:
                    logger.error("adapter %s could not be reconciled: %s", name, exc.message)
        self._names = frozenset(record.name for record in await asyncio.to_thread(self._store.list))
        self._reconciled.set()
        logger.info("engine reconciled with the store: %d adapters loaded", len(self._loaded))

    def _require_base(self) -> BaseModelInfo:
        base = self._base_model()
        if base is None:
            raise EngineUnavailableError(
                "The engine has not reported its base model yet; retry shortly.",
                retry_after_s=self._retry_after_s,
            )
        return base


def _as_request_error(call: Callable[[], _T]) -> _T:
    try:
        return call()
    except AdapterValidationError as exc:
        raise InvalidRequestError(exc.message, param=exc.param, code="invalid_adapter") from exc
