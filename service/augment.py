"""Retrieval-augmented requests: retrieve, fit the sources into the context window, and say
what was done in a :class:`~service.protocol.Route`.

Sources are trimmed from the end (the weakest first) until the prompt, with the room asked for
the answer (``max_tokens``, else ``HYBRID_RAG_ANSWER_TOKENS``), fits the model's context
window; token counts come from the engine's own tokenizer and chat template.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from index.retrieval import Passage
from service.context_block import defuse, query_text, with_sources
from service.engine import Engine
from service.knowledge import Knowledge
from service.protocol import ChatCompletionRequest, RagRoute, Route, RouteSource

logger = logging.getLogger(__name__)


class Augmenter:
    def __init__(self, knowledge: Knowledge, engine: Engine, *, top_k: int, answer_tokens: int) -> None:
        self._knowledge = knowledge
        self._engine = engine
        self._top_k = top_k
        self._answer_tokens = answer_tokens

    async def apply(
        self, request: ChatCompletionRequest, payload: dict[str, Any], adapter: str | None, base_model: str
    ) -> Route:
        """Add the context block to ``payload`` when the request asks for retrieval. Prompts are
        measured with ``base_model``'s tokenizer, which its adapters share."""
        if request.rag != "on":
            why = "rag=off" if request.rag == "off" else "rag=auto: no retrieval unless rag=on"
            return _route(adapter, [], f"{_model_reason(adapter)}; {why}")
        query = query_text(payload["messages"])
        passages = await self._knowledge.retrieve(query, self._top_k) if query.strip() else []
        if not passages:
            return _route(adapter, [], f"{_model_reason(adapter)}; rag=on: no passage matched")
        budget = payload.get("max_tokens") or self._answer_tokens
        fitted, messages = await self._fit(base_model, payload["messages"], passages, budget)
        if not fitted:
            return _route(adapter, [], f"{_model_reason(adapter)}; rag=on: no source fits the context window")
        payload["messages"] = messages
        trimmed = f", {len(passages) - len(fitted)} trimmed to fit" if len(fitted) < len(passages) else ""
        return _route(adapter, fitted, f"{_model_reason(adapter)}; rag=on: {len(fitted)} sources{trimmed}")

    async def _fit(
        self, model: str, messages: list[dict[str, Any]], passages: Sequence[Passage], answer_tokens: int
    ) -> tuple[list[Passage], list[dict[str, Any]]]:
        """The passages kept, and the messages with their block (the ones that were measured)."""
        kept = list(passages)
        while kept:
            augmented = with_sources(messages, kept)
            size = await self._engine.count_prompt_tokens(model, augmented)
            if size.max_model_len is None or size.count + answer_tokens <= size.max_model_len:
                return kept, augmented
            kept.pop()
        return kept, messages


def _route(adapter: str | None, passages: Sequence[Passage], reason: str) -> Route:
    sources = [
        RouteSource(
            id=number,
            source=passage.source,
            title=passage.title,
            score=passage.score,
            text=defuse(passage.text),
            collection=passage.collection,
            chunk_id=passage.id,
            volatile=passage.volatile,
        )
        for number, passage in enumerate(passages, start=1)
    ]
    return Route(adapter=adapter, rag=RagRoute(used=bool(sources), sources=sources), reason=reason)


def _model_reason(adapter: str | None) -> str:
    return f"model names adapter {adapter!r}" if adapter else "base model"
