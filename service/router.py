"""The router: for each request, which adapter (if any) and which retrieved passages (if any),
and why.

The query is embedded once; that one vector gives both signals and the retrieval itself:

- domain: each adapter's similarity to the query is its best cosine similarity to one of its
  example prompts or its description (nearest neighbour, chosen over centroids by
  ``hybrid-serve router eval``). The best adapter wins only at or above its threshold (fitted,
  else ``HYBRID_ROUTER_THRESHOLD``); otherwise the base model answers.
- knowledge: the retrieved passages' similarity to the query. With ``rag: auto``, passages at
  or above ``HYBRID_RAG_THRESHOLD`` are added for the base model; for an adapter only those of
  volatile collections (its trained knowledge is stale by definition), unless its manifest
  forbids retrieval.

Overrides: a request naming an adapter (or the base model) pins it; ``rag: on|off`` forces
retrieval; under ``rag: on`` adapters that forbid retrieval are not chosen automatically. When
the index fails, an ``auto`` request falls back to the base model without retrieval, with the
reason in the decision (``rag: on`` still fails: retrieval was required).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from adapters.manifest import AdapterManifest
from index.embedder import Embedder, Vectors
from index.errors import IndexUnavailable
from index.retrieval import Passage, Retriever
from service.context_block import message_text
from service.errors import InvalidRequestError
from service.knowledge import IndexUnavailableError

logger = logging.getLogger(__name__)

RagMode = Literal["auto", "on", "off"]
FOLLOW_UP_WORDS = 6
"""A last user message shorter than this is taken as a follow-up ("and in June?"): the end of
the previous one joins the query so it keeps its subject. A full question stands alone (the
previous topic would pull retrieval back to it)."""
CONTEXT_CHARS = 256


class AdapterView(Protocol):
    """What the router reads of the registered adapters (the gateway's AdapterRegistry; the
    evaluation's fixed set)."""

    @property
    def generation(self) -> int: ...

    def manifests(self) -> list[AdapterManifest]: ...

    def is_servable(self, name: str) -> bool: ...


@dataclass(frozen=True)
class Pin:
    """What the request's ``model`` fixed: nothing (``auto``), or the adapter to use (None: the
    base model)."""

    adapter: str | None


@dataclass(frozen=True)
class Decision:
    """The router's choice, before the passages are fitted into the context window."""

    adapter: str | None
    passages: list[Passage]
    adapter_scores: dict[str, float]
    retrieval_score: float | None
    reason: str


@dataclass(frozen=True)
class DomainProfile:
    """An adapter as the router sees it."""

    name: str
    vectors: Vectors
    """One normalised row per example prompt, and one for the description."""
    threshold: float | None
    """Fitted or given; None: the default."""
    allow_retrieval: bool


class DomainSignal:
    """Every adapter's similarity to a query, from one matrix product. Built once per change of
    the adapters, then only read."""

    def __init__(self, profiles: Sequence[DomainProfile] = ()) -> None:
        self.profiles = {p.name: p for p in profiles}
        rows = [p for p in profiles if len(p.vectors)]
        self._names = [p.name for p in rows]
        self._matrix = np.vstack([p.vectors for p in rows]) if rows else np.zeros((0, 0), dtype=np.float32)
        self._owner = np.repeat(np.arange(len(rows)), [len(p.vectors) for p in rows])

    def scores(self, vector: Vectors) -> dict[str, float]:
        """Best cosine similarity of ``vector`` to each adapter's rows (adapters without
        examples or description have no score: only a request naming them reaches them)."""
        if not self._names:
            return {}
        best = np.full(len(self._names), -1.0, dtype=np.float32)
        np.maximum.at(best, self._owner, self._matrix @ vector)
        return {name: float(score) for name, score in zip(self._names, best, strict=True)}


def profile_texts(manifest: AdapterManifest) -> tuple[str, ...]:
    """What an adapter is recognised by: its example prompts and its description."""
    description = manifest.description.strip()
    return (*manifest.examples, *((description,) if description else ()))


def routing_query(messages: Sequence[dict[str, Any]]) -> str:
    """The last user message; a short follow-up comes after the end of the one before it."""
    users = [message_text(m.get("content")) for m in messages if m.get("role") == "user"]
    users = [text for text in users if text.strip()]
    if not users:
        return ""
    if len(users) == 1 or len(users[-1].split()) >= FOLLOW_UP_WORDS:
        return users[-1]
    return f"{users[-2][-CONTEXT_CHARS:]}\n{users[-1]}"


class Router:
    def __init__(
        self,
        embedder: Embedder,
        retriever: Retriever | None,
        adapters: AdapterView | None,
        *,
        top_k: int,
        default_threshold: float,
        rag_threshold: float,
        retry_after_s: int,
    ) -> None:
        self._embedder = embedder
        self._retriever = retriever
        self._adapters = adapters
        self._top_k = top_k
        self.default_threshold = default_threshold
        self.rag_threshold = rag_threshold
        self._retry_after_s = retry_after_s
        self._signal = DomainSignal()
        self._built_for = -1
        self._vectors: dict[tuple[str, ...], Vectors] = {}
        self._rebuild_lock = asyncio.Lock()

    # -- the adapters' profiles

    async def domain_signal(self) -> DomainSignal:
        """The profiles of the registered adapters, rebuilt when the registry changed (only
        new example texts are embedded)."""
        if self._adapters is None:
            return self._signal
        async with self._rebuild_lock:
            generation = self._adapters.generation
            if generation != self._built_for:
                manifests = await asyncio.to_thread(self._adapters.manifests)
                self._signal = await asyncio.to_thread(self._build, manifests)
                self._built_for = generation
        return self._signal

    def _build(self, manifests: Sequence[AdapterManifest]) -> DomainSignal:
        profiles = []
        for manifest in manifests:
            texts = profile_texts(manifest)
            if texts not in self._vectors:
                self._vectors[texts] = self._embedder.embed(texts)
            profiles.append(
                DomainProfile(
                    manifest.name, self._vectors[texts], manifest.threshold, manifest.allow_retrieval
                )
            )
        wanted = {profile_texts(m) for m in manifests}
        self._vectors = {texts: v for texts, v in self._vectors.items() if texts in wanted}
        return DomainSignal(profiles)

    def threshold(self, profile: DomainProfile) -> float:
        return self.default_threshold if profile.threshold is None else profile.threshold

    # -- the decision

    async def decide(self, messages: Sequence[dict[str, Any]], *, pin: Pin | None, rag: RagMode) -> Decision:
        """``pin`` None: an ``auto`` request. Raises only for what the client asked that cannot
        be (``rag: on`` with a pinned adapter that forbids retrieval; the index failing under
        ``rag: on``)."""
        signal = await self.domain_signal()
        if pin is not None and pin.adapter is not None and rag == "on":
            pinned = signal.profiles.get(pin.adapter)
            if pinned is not None and not pinned.allow_retrieval:
                raise InvalidRequestError(
                    f"The adapter '{pin.adapter}' does not allow retrieval; send rag='auto' or 'off'.",
                    param="rag",
                    code="retrieval_forbidden",
                )
        query = routing_query(messages)
        if not query.strip():
            return Decision(_pinned(pin), [], {}, None, f"{_pin_reason(pin)}; no user text to route on")
        search = rag != "off" and self._retriever is not None
        try:
            scores, passages = await asyncio.to_thread(self._measure, signal, query, search)
        except IndexUnavailable as exc:
            if rag == "on":
                raise IndexUnavailableError(str(exc), retry_after_s=self._retry_after_s) from None
            logger.error("router fell back to the base model: index unavailable: %s", exc)
            adapter = _pinned(pin)
            model = _pin_reason(pin) if pin is not None else "base model"
            return Decision(
                adapter, [], {}, None, f"router failed (index unavailable: {exc}); {model}, no retrieval"
            )
        adapter, adapter_reason = self._choose_adapter(signal, scores, pin, rag)
        chosen, rag_reason = self._choose_passages(signal, adapter, passages, rag)
        best = max((p.score for p in passages), default=None) if search else None
        rounded = {name: round(score, 4) for name, score in scores.items()}
        return Decision(
            adapter,
            chosen,
            rounded,
            None if best is None else round(best, 4),
            f"{adapter_reason}; {rag_reason}",
        )

    def _measure(
        self, signal: DomainSignal, query: str, search: bool
    ) -> tuple[dict[str, float], list[Passage]]:
        """Blocking: embed once, score the adapters, search the index with the same vector."""
        vector = self._embedder.embed([query])[0]
        scores = signal.scores(vector)
        passages = self._retriever.search(vector, query, self._top_k) if search and self._retriever else []
        return scores, passages

    def _choose_adapter(
        self, signal: DomainSignal, scores: dict[str, float], pin: Pin | None, rag: RagMode
    ) -> tuple[str | None, str]:
        if pin is not None:
            return pin.adapter, _pin_reason(pin)
        eligible = {
            name: score
            for name, score in scores.items()
            if (rag != "on" or signal.profiles[name].allow_retrieval)
            and (self._adapters is None or self._adapters.is_servable(name))
        }
        if not eligible:
            why = "no adapter has example prompts" if not scores else "no adapter can take it now"
            return None, f"base model: {why}"
        best = max(eligible, key=eligible.__getitem__)
        threshold = self.threshold(signal.profiles[best])
        if eligible[best] >= threshold:
            return best, f"adapter '{best}': similarity {eligible[best]:.2f} >= threshold {threshold:.2f}"
        return None, f"base model: best adapter '{best}' at {eligible[best]:.2f} < threshold {threshold:.2f}"

    def _choose_passages(
        self, signal: DomainSignal, adapter: str | None, passages: list[Passage], rag: RagMode
    ) -> tuple[list[Passage], str]:
        if rag == "off":
            return [], "rag=off"
        if self._retriever is None:
            return [], "retrieval is not configured"
        if rag == "on":
            return passages, f"rag=on: {len(passages)} passages" if passages else "rag=on: no passage matched"
        profile = signal.profiles.get(adapter) if adapter else None
        if profile is not None and not profile.allow_retrieval:
            return [], f"no retrieval: adapter '{adapter}' forbids it"
        if not passages:
            return [], "no retrieval: the index has no passage for it"
        best = max(p.score for p in passages)
        above = [p for p in passages if p.score >= self.rag_threshold]
        if not above:
            return [], f"no retrieval: best passage {best:.2f} < threshold {self.rag_threshold:.2f}"
        if adapter is None:
            return above, f"{len(above)} passages >= threshold {self.rag_threshold:.2f}"
        fresh = [p for p in above if p.volatile]
        if not fresh:
            return (
                [],
                f"no retrieval: only stable collections matched, and adapter '{adapter}' covers its domain",
            )
        return fresh, f"{len(fresh)} passages from volatile collections >= threshold {self.rag_threshold:.2f}"

    def configuration(self, signal: DomainSignal) -> dict[str, Any]:
        """What ``GET /admin/router`` shows."""
        return {
            "default_threshold": self.default_threshold,
            "rag_threshold": self.rag_threshold,
            "top_k": self._top_k,
            "adapters": [
                {
                    "name": profile.name,
                    "threshold": self.threshold(profile),
                    "fitted": profile.threshold is not None,
                    "vectors": len(profile.vectors),
                    "allow_retrieval": profile.allow_retrieval,
                    "servable": self._adapters is None or self._adapters.is_servable(profile.name),
                }
                for profile in sorted(signal.profiles.values(), key=lambda p: p.name)
            ],
        }


def _pinned(pin: Pin | None) -> str | None:
    return pin.adapter if pin is not None else None


def _pin_reason(pin: Pin | None) -> str:
    if pin is None:
        return "base model"
    return f"model names adapter '{pin.adapter}'" if pin.adapter else "model names the base model"
