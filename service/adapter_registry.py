"""Registered adapters: validate, store durably, load into the engine, and keep the engine's
adapter set equal to the store's (on start and after every engine restart).

No HTTP here: the admin routes parse and call one method. Blocking work (hashing, copying,
fsync) runs in a thread; one lock per name serialises operations on a name while different
names proceed in parallel.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from adapters.config import rebase_config
from adapters.errors import AdapterExistsError, AdapterValidationError
from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, AdapterManifest
from adapters.store import AdapterRecord, AdapterStore
from adapters.validation import BaseModelInfo, validate_adapter, validate_name
from service.catalog import AUTO
from service.engine import Engine
from service.errors import (
    APIError,
    ConflictError,
    EngineUnavailableError,
    InvalidRequestError,
    NotFoundError,
    UpstreamError,
)

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
    allow_retrieval: bool = True
    replace: bool = False
    training_prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoutingUpdate:
    """New values for the routing fields of a manifest; None leaves a field as it is (a
    threshold is cleared with ``clear_threshold``)."""

    description: str | None = None
    examples: tuple[str, ...] | None = None
    threshold: float | None = None
    clear_threshold: bool = False
    allow_retrieval: bool | None = None
    training_prompts: tuple[str, ...] | None = None

    def apply(self, manifest: AdapterManifest) -> AdapterManifest:
        threshold = (
            None
            if self.clear_threshold
            else (manifest.threshold if self.threshold is None else self.threshold)
        )
        return dataclasses.replace(
            manifest,
            description=manifest.description if self.description is None else self.description,
            examples=manifest.examples if self.examples is None else self.examples,
            threshold=threshold,
            allow_retrieval=manifest.allow_retrieval
            if self.allow_retrieval is None
            else self.allow_retrieval,
            training_prompts=manifest.training_prompts
            if self.training_prompts is None
            else self.training_prompts,
        )


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        engine: Engine,
        *,
        base_model: Callable[[], BaseModelInfo | None],
        max_rank: int,
        retry_after_s: int,
        resolver: bool = False,
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
        self._generation = 0
        self._resolver = resolver
        self._engine_ids: dict[str, str] = {}
        """With the resolver: name -> the id of its stored version (absent: the name itself)."""

    # -- what chat requests ask

    def is_registered(self, name: str) -> bool:
        return name in self._names

    def check_servable(self, name: str) -> None:
        """503 while the engine (re)loads a registered adapter, rather than a misleading 404."""
        if not self.is_servable(name):
            raise EngineUnavailableError(
                f"The adapter '{name}' is being loaded into the engine; retry shortly.",
                retry_after_s=self._retry_after_s,
            )

    def is_servable(self, name: str) -> bool:
        return self._reconciled.is_set() and name in self._loaded

    def servable(self) -> builtins.list[str]:
        """The adapters a request may name now, sorted."""
        return sorted(self._loaded) if self._reconciled.is_set() else []

    def engine_id(self, name: str) -> str:
        """The model id the engine serves ``name`` under: the name itself when the gateway loads
        adapters into the engine; with the filesystem resolver, the stored version's directory
        name, so that a replaced adapter is a new id and no replica keeps its old weights."""
        return self._engine_ids.get(name, name)

    @property
    def generation(self) -> int:
        """Changes whenever an adapter or its manifest may have changed (the router rebuilds
        its view then)."""
        return self._generation

    @property
    def reconciled(self) -> bool:
        """The engine's adapters equal the store's since its last (re)start."""
        return self._reconciled.is_set()

    async def wait_reconciled(self) -> None:
        await self._reconciled.wait()

    def engine_lost(self) -> None:
        """The engine restarted: nothing is loaded until the next :meth:`reconcile` (with the
        resolver, the engine finds adapters in the store again by itself)."""
        if self._resolver:
            return
        self._reconciled.clear()
        self._loaded.clear()

    # -- the admin operations

    def list(self) -> list[AdapterRecord]:
        return self._store.list()

    def manifests(self) -> builtins.list[AdapterManifest]:
        return [record.manifest for record in self._store.list()]

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
            allow_retrieval=registration.allow_retrieval,
            training_prompts=registration.training_prompts,
        )
        # vLLM's filesystem resolver (many replicas) loads an adapter only when its config
        # names the model the engine was started with, whichever alias it was made with.
        config = rebase_config(source.config_bytes, base.engine_model or base.served_id)
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
                await self._publish(name, record)
            except APIError:
                # Not acknowledged, so not kept: the store goes back to what the engine serves.
                if previous is None:
                    await asyncio.to_thread(self._store.delete, name)
                else:
                    await asyncio.to_thread(self._store.revert, name, previous)
                raise
            self._names = self._names | {name}
            self._generation += 1
            logger.info("adapter %s %s (rank %d)", name, "replaced" if previous else "registered", spec.rank)
            return record

    async def delete(self, name: str) -> None:
        async with self._locks[name]:
            if not await asyncio.to_thread(self._store.delete, name):
                raise NotFoundError(f"No adapter named '{name}'.", param="name", code="adapter_not_found")
            self._names = self._names - {name}
            self._loaded.discard(name)
            self._generation += 1
            self._engine_ids.pop(name, None)
            if self._resolver:
                return  # its version's id is never asked for again; the replicas' caches drop it
            # Gone from the store: if the engine is down, the next reconciliation will not load it.
            with contextlib.suppress(EngineUnavailableError):
                await self._engine.unload_adapter(name)
            logger.info("adapter %s deleted", name)

    async def update(self, name: str, update: RoutingUpdate) -> AdapterRecord:
        """Change the routing fields of an adapter's manifest (``router fit`` stores thresholds
        this way). Stored versions are never edited: the same weights and config are stored
        again with the new manifest and swapped in, like a replacement."""
        async with self._locks[name]:
            current = self.get(name)
            manifest = update.apply(current.manifest)
            if manifest == current.manifest:
                return current
            config = await asyncio.to_thread((current.path / CONFIG_FILE).read_bytes)
            record = await asyncio.to_thread(
                self._store.put, name, config, current.path / WEIGHTS_FILE, manifest, replace=True
            )
            try:
                # The engine loads by version directory, and the superseded one is pruned by
                # the next change: point the engine at the new one now.
                await self._publish(name, record)
            except APIError:
                await asyncio.to_thread(self._store.revert, name, current)
                raise
            self._generation += 1
            logger.info("adapter %s: routing fields updated (threshold %s)", name, manifest.threshold)
            return record

    async def reconcile(self) -> None:
        """Make the engine's adapters equal to the store's: load the missing, reload those it
        holds from another version, unload the rest. Registrations and deletions may run
        meanwhile: each name is handled under its lock against the store as it is then.

        With the resolver there is nothing to load: the store is read, and the engine finds
        each adapter there on first use."""
        if self._resolver:
            await self.sync()
            self._reconciled.set()
            return
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
        self._generation += 1
        self._reconciled.set()
        logger.info("engine reconciled with the store: %d adapters loaded", len(self._loaded))

    async def sync(self) -> None:
        """With the resolver: take the store as it is now, adapters other gateways registered
        or removed included (several gateways share the store, and only it is authoritative)."""
        records = await asyncio.to_thread(self._store.list)
        ids = {record.name: record.path.name for record in records}
        if ids == self._engine_ids:
            return
        # An adapter another gateway is still probing may be seen a moment before that
        # registration is acknowledged; if the engine refuses it, that gateway removes it
        # and the next sync drops it here too.
        self._engine_ids = ids
        self._names = frozenset(ids)
        self._loaded = set(ids)
        self._generation += 1

    async def _publish(self, name: str, record: AdapterRecord) -> None:
        """Make the engine serve ``record`` as ``name``: load it (the gateway's own engine), or
        with the resolver ask for its version once, which makes a replica find it in the
        store and proves it loads (a one-token generation)."""
        if self._resolver:
            engine_id = record.path.name
            try:
                await self._engine.chat(
                    {"model": engine_id, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
                )
            except NotFoundError:
                raise UpstreamError(
                    f"The engine did not find the adapter '{name}' in its resolver directory: each "
                    "replica needs VLLM_PLUGINS=lora_filesystem_resolver and "
                    "VLLM_LORA_RESOLVER_CACHE_DIR set to this store's .versions directory."
                ) from None
            self._engine_ids[name] = engine_id
        else:
            await self._engine.load_adapter(name, str(record.path), replace=name in self._loaded)
        self._loaded.add(name)

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
