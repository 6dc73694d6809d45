"""Retrieval-augmented requests: fit the router's passages into the context window and say what
was done in the :class:`~service.protocol.RouteDecision`.

Sources are trimmed from the end (the weakest first) until the prompt, with the room asked for
the answer (``max_tokens``, else ``HYBRID_RAG_ANSWER_TOKENS``), fits the model's context
window; token counts come from the engine's own tokenizer and chat template.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from index.retrieval import Passage
from service.context_block import defuse, with_sources
from service.engine import Engine
from service.protocol import RagRoute, RouteDecision, RouteScores, RouteSource
from service.router import Decision

logger = logging.getLogger(__name__)


class Augmenter:
    def __init__(self, engine: Engine, *, answer_tokens: int) -> None:
        self._engine = engine
        self._answer_tokens = answer_tokens

    async def apply(self, decision: Decision, payload: dict[str, Any], base_model: str) -> RouteDecision:
        """Add the context block of ``decision``'s passages to ``payload``. Prompts are measured
        with ``base_model``'s tokenizer, which its adapters share."""
        if not decision.passages:
            return route_of(decision, [], decision.reason)
        budget = payload.get("max_tokens") or self._answer_tokens
        fitted, messages = await self._fit(base_model, payload["messages"], decision.passages, budget)
        if not fitted:
            return route_of(decision, [], f"{decision.reason}; no source fits the context window")
        payload["messages"] = messages
        trimmed = len(decision.passages) - len(fitted)
        reason = f"{decision.reason}, {trimmed} trimmed to fit" if trimmed else decision.reason
        return route_of(decision, fitted, reason)

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


def route_of(decision: Decision, passages: Sequence[Passage], reason: str) -> RouteDecision:
    """The public form of a decision, with the passages the model was given."""
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
            heading=passage.heading,
            page=passage.page,
        )
        for number, passage in enumerate(passages, start=1)
    ]
    return RouteDecision(
        adapter=decision.adapter,
        rag=RagRoute(used=bool(sources), sources=sources),
        scores=RouteScores(
            adapters=decision.adapter_scores, base=decision.base_score, retrieval=decision.retrieval_score
        ),
        reason=reason,
    )
