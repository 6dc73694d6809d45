"""Which model names a request may use, and what each means to the engine."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from service.engine import Engine
from service.errors import EngineUnavailableError, NotFoundError
from service.protocol import ModelCard, ModelList

AUTO = "auto"
"""The router's name: the service picks the treatment (for now, always the base model)."""


class ModelCatalog:
    """The engine's base model(s) as it reports them, plus ``auto``.

    The base model id is learnt from the engine (the entry without a parent) and cached, so a
    chat request resolves its model without a round trip."""

    def __init__(self, engine: Engine, *, retry_after_s: int) -> None:
        self._engine = engine
        self._retry_after_s = retry_after_s
        self._base_ids: tuple[str, ...] = ()
        self._base_root: str | None = None
        self._lock = asyncio.Lock()

    @property
    def base_model(self) -> str | None:
        return self._base_ids[0] if self._base_ids else None

    @property
    def base_root(self) -> str | None:
        """What the engine loaded its base model from (its ``--model``), if it said."""
        return self._base_root

    async def refresh(self) -> list[ModelCard]:
        """Ask the engine what it serves; remember its base model ids."""
        cards = await self._engine.list_models()
        bases = [card for card in cards if card.parent is None]
        self._base_ids = tuple(card.id for card in bases)
        self._base_root = bases[0].root if bases else None
        return cards

    def forget(self) -> None:
        """Drop what was learnt: the engine said it does not serve a model we resolved to (it
        restarted with another model), so the next request asks it again."""
        self._base_ids = ()

    async def resolve(self, requested: str) -> str:
        """The engine model id for a request's ``model``; 404 when there is no such model."""
        if not self._base_ids:
            async with self._lock:
                if not self._base_ids:
                    await self.refresh()
        if not self._base_ids:
            raise EngineUnavailableError(
                "The model engine has not loaded its model yet.", retry_after_s=self._retry_after_s
            )
        if requested == AUTO:
            return self._base_ids[0]
        if requested in self._base_ids:
            return requested
        raise NotFoundError(
            f"The model '{requested}' does not exist. Available: {', '.join((AUTO, *self._base_ids))}.",
            param="model",
            code="model_not_found",
        )

    async def list(self, adapters: Sequence[str]) -> ModelList:
        """The engine's base model(s), then ``adapters`` (the registered ones a request may
        name; the engine's own list may hold other ids, or only what one replica has
        loaded), then ``auto``."""
        bases = [card for card in await self.refresh() if card.parent is None]
        if not bases:
            return ModelList(data=[])
        base = bases[0]
        loras = [
            ModelCard(id=name, created=base.created, owned_by=base.owned_by, parent=base.id)
            for name in adapters
        ]
        auto = ModelCard(id=AUTO, created=base.created, owned_by="hybrid-serve")
        return ModelList(data=[*bases, *loras, auto])
