"""The router: for each request, which adapter (if any) and which retrieved passages (if any),
and why.

The query is embedded once; that one vector gives both signals and the retrieval itself:

- domain: a classifier fitted on the adapters' prompts, the operator's labelled prompts and
  general chat (:mod:`service.route_learner`) gives each adapter and ``base`` a calibrated
  probability. The most probable adapter wins only at or above the abstain threshold fitted
  for base recall (or the adapter's own threshold); otherwise the base model answers. The
  classifier is a matrix product on the query vector that retrieval needs anyway.
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
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from adapters.manifest import AdapterManifest
from index.embedder import Embedder, Vectors
from index.errors import IndexUnavailable
from index.retrieval import Passage, Retriever
from service import request_context
from service.context_block import message_text
from service.errors import InvalidRequestError
from service.knowledge import IndexUnavailableError
from service.protocol import RouteDecision
from service.route_learner import ActiveRoute, RouteLearner
from service.route_model import BASE, RouteModel
from service.traffic_log import Observed, Retrieved, TrafficLog

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
    base_score: float | None = None
    """The classifier's probability of the base model (None: no classifier was asked)."""
    observed: Observed | None = None
    """What it was decided on, for :meth:`Router.observe`."""


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
        learner: RouteLearner,
        *,
        top_k: int,
        rag_threshold: float,
        retry_after_s: int,
        traffic: TrafficLog | None = None,
    ) -> None:
        self._embedder = embedder
        self._retriever = retriever
        self._adapters = adapters
        self.learner = learner
        self._top_k = top_k
        self.rag_threshold = rag_threshold
        self._retry_after_s = retry_after_s
        self._traffic = traffic
        self._manifests: dict[str, AdapterManifest] = {}
        self._seen = -1
        self._sync_lock = asyncio.Lock()

    # -- what the router knows of the adapters

    async def sync(self) -> dict[str, AdapterManifest]:
        """The registered adapters' manifests, re-read when the registry changed; a change also
        starts a refit of the classifier in the background (requests keep the current one)."""
        if self._adapters is None:
            return self._manifests
        async with self._sync_lock:
            generation = self._adapters.generation
            if generation != self._seen:
                manifests = await asyncio.to_thread(self._adapters.manifests)
                self._manifests = {m.name: m for m in manifests}
                self._seen = generation
                self.learner.schedule(self._adapters.manifests)
        return self._manifests

    def threshold(self, manifest: AdapterManifest | None, model: RouteModel) -> float:
        """The probability an adapter needs: its own threshold, else the fitted one."""
        if manifest is None or manifest.threshold is None:
            return model.abstain
        return manifest.threshold

    # -- the decision

    async def decide(self, messages: Sequence[dict[str, Any]], *, pin: Pin | None, rag: RagMode) -> Decision:
        """``pin`` None: an ``auto`` request. Raises only for what the client asked that cannot
        be (``rag: on`` with a pinned adapter that forbids retrieval; the index failing under
        ``rag: on``).

        Within a request, the whole decision is timed (``hybrid_route_seconds``) and traced (a
        ``route`` span with what was decided)."""
        started = time.perf_counter()
        with request_context.span("route", attributes={"hybrid.rag_mode": rag}) as span:
            # A decision that raised has no adapter to file it under; the error is counted.
            decision = await self._decide(messages, pin=pin, rag=rag)
            if decision.observed is None:  # decided on nothing the classifier or the index said
                observed = Observed(routing_query(messages), pin is not None)
                decision = dataclasses.replace(decision, observed=observed)
            metrics = request_context.metrics()
            if metrics is not None:
                metrics.observe_route(decision.adapter, time.perf_counter() - started)
            if span.is_recording():
                span.set_attributes(_span_facts(decision))
        return decision

    async def _decide(self, messages: Sequence[dict[str, Any]], *, pin: Pin | None, rag: RagMode) -> Decision:
        manifests = await self.sync()
        if pin is not None and pin.adapter is not None and rag == "on":
            pinned = manifests.get(pin.adapter)
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
        active = self.learner.active
        try:
            scores, passages, search_s = await asyncio.to_thread(self._measure, active, query, search)
        except IndexUnavailable as exc:
            if rag == "on":
                raise IndexUnavailableError(str(exc), retry_after_s=self._retry_after_s) from None
            logger.error("router fell back to the base model: index unavailable: %s", exc)
            adapter = _pinned(pin)
            model = _pin_reason(pin) if pin is not None else "base model"
            return Decision(
                adapter, [], {}, None, f"router failed (index unavailable: {exc}); {model}, no retrieval"
            )
        adapter, adapter_reason = self._choose_adapter(manifests, active, scores, pin, rag)
        metrics = request_context.metrics()
        if metrics is not None and search_s is not None:
            metrics.observe_retrieval(adapter, search_s)
        chosen, rag_reason = self._choose_passages(manifests, adapter, passages, rag)
        best = max((p.score for p in passages), default=None) if search else None
        rounded = {name: round(score, 4) for name, score in scores.items() if name != BASE}
        return Decision(
            adapter,
            chosen,
            rounded,
            None if best is None else round(best, 4),
            f"{adapter_reason}; {rag_reason}",
            base_score=round(scores[BASE], 4) if BASE in scores else None,
            observed=Observed.of(
                query,
                pin is not None,
                scores,
                [Retrieved(p.collection, p.id, p.score) for p in passages],
                active.version if active is not None else None,
                None if active is None else lambda name: self.threshold(manifests.get(name), active.model),
            ),
        )

    def observe(self, decision: Decision, route: RouteDecision) -> None:
        """A decision being served (not an explained one): its scores into the metrics
        (``hybrid_route_score`` for automatic ones, ``hybrid_retrieval_score``) and its line
        into the traffic log, if one is kept."""
        observed = decision.observed
        if observed is None:
            return
        metrics = request_context.metrics()
        if metrics is not None:
            probability = observed.scores.get(decision.adapter or BASE)
            if not observed.pinned and probability is not None:
                metrics.observe_route_score(decision.adapter, probability)
            metrics.observe_retrieval_scores([(r.collection, r.score) for r in observed.retrieved])
        if self._traffic is not None:
            self._traffic.record(observed, decision.adapter, route)

    def _measure(
        self, active: ActiveRoute | None, query: str, search: bool
    ) -> tuple[dict[str, float], list[Passage], float | None]:
        """Blocking: embed once, score the classes, search the index with the same vector. The
        search's seconds come back for ``hybrid_retrieval_seconds``, which is filed under the
        adapter decided after it (None: no search)."""
        vector = self._embedder.embed([query])[0]
        scores = active.model.scores(vector) if active is not None else {}
        if not (search and self._retriever):
            return scores, [], None
        started = time.perf_counter()
        passages = self._search(vector, query)
        return scores, passages, time.perf_counter() - started

    def _search(self, vector: Vectors, query: str) -> list[Passage]:
        """Blocking: the index query, traced."""
        assert self._retriever is not None
        with request_context.span("retrieve", attributes={"hybrid.top_k": self._top_k}) as span:
            passages = self._retriever.search(vector, query, self._top_k)
            span.set_attribute("hybrid.passages", len(passages))
        return passages

    def _choose_adapter(
        self,
        manifests: dict[str, AdapterManifest],
        active: ActiveRoute | None,
        scores: dict[str, float],
        pin: Pin | None,
        rag: RagMode,
    ) -> tuple[str | None, str]:
        if pin is not None:
            return pin.adapter, _pin_reason(pin)
        if active is None:
            # A refresh also runs when there is nothing to fit (no adapter): only say "fitted"
            # when an adapter has prompts for it to fit on.
            fitting = self.learner.fitting and any(_routable(m) for m in manifests.values())
            why = "the router is being fitted" if fitting else "no adapter has example prompts"
            return None, f"base model: {why}"
        eligible = {
            name: score
            for name, score in scores.items()
            if name in manifests
            and (rag != "on" or manifests[name].allow_retrieval)
            and (self._adapters is None or self._adapters.is_servable(name))
        }
        version = f"router v{active.version}" if active.version is not None else "router"
        if not eligible:
            return None, f"base model: no adapter can take it now ({version})"
        best = max(eligible, key=eligible.__getitem__)
        threshold = self.threshold(manifests.get(best), active.model)
        base = scores.get(BASE, 0.0)
        if eligible[best] >= threshold:
            return (
                best,
                f"adapter '{best}': probability {eligible[best]:.2f} >= {threshold:.2f} "
                f"(base {base:.2f}; {version})",
            )
        return (
            None,
            f"base model: best adapter '{best}' at {eligible[best]:.2f} < {threshold:.2f} "
            f"(base {base:.2f}; {version})",
        )

    def _choose_passages(
        self,
        manifests: dict[str, AdapterManifest],
        adapter: str | None,
        passages: list[Passage],
        rag: RagMode,
    ) -> tuple[list[Passage], str]:
        if rag == "off":
            return [], "rag=off"
        if self._retriever is None:
            return [], "retrieval is not configured"
        if rag == "on":
            return passages, f"rag=on: {len(passages)} passages" if passages else "rag=on: no passage matched"
        manifest = manifests.get(adapter) if adapter else None
        if manifest is not None and not manifest.allow_retrieval:
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

    def configuration(self) -> dict[str, Any]:
        """What ``GET /admin/router`` shows: the classifier in force and each adapter."""
        active = self.learner.active
        classifier: dict[str, Any] | None = None
        if active is not None:
            meta = active.meta
            classifier = {
                "version": active.version,
                "created_at": meta.get("created_at"),
                "classes": list(active.model.classes),
                "abstain_threshold": active.model.abstain,
                "temperature": active.model.temperature,
                "embedder": meta.get("embedder"),
                "settings": meta.get("settings"),
                "data": meta.get("data"),
                "fit_rows": meta.get("fit_rows"),
                "general_dropped": meta.get("general_dropped"),
                "validation": meta.get("validation"),
                "fit_seconds": meta.get("fit_seconds"),
            }
        routed = set(active.model.adapters) if active is not None else set()
        return {
            "classifier": classifier,
            "fitting": self.learner.fitting,
            "last_error": self.learner.error,
            "rag_threshold": self.rag_threshold,
            "top_k": self._top_k,
            "adapters": [
                {
                    "name": name,
                    "threshold": manifest.threshold,
                    "routed": name in routed,
                    "allow_retrieval": manifest.allow_retrieval,
                    "servable": self._adapters is None or self._adapters.is_servable(name),
                }
                for name, manifest in sorted(self._manifests.items())
            ],
        }


def _span_facts(decision: Decision) -> dict[str, str | bool | int | float]:
    """The ``route`` span's attributes: what was decided and the scores it was decided on."""
    facts: dict[str, str | bool | int | float] = {
        "hybrid.route.adapter": decision.adapter or "",
        "hybrid.route.rag": bool(decision.passages),
        "hybrid.route.passages": len(decision.passages),
        "hybrid.route.reason": decision.reason,
    }
    if decision.retrieval_score is not None:
        facts["hybrid.route.retrieval_score"] = decision.retrieval_score
    if decision.base_score is not None:
        facts["hybrid.route.base_score"] = decision.base_score
    for name, score in decision.adapter_scores.items():
        facts[f"hybrid.route.score.{name}"] = score
    return facts


def _pinned(pin: Pin | None) -> str | None:
    return pin.adapter if pin is not None else None


def _pin_reason(pin: Pin | None) -> str:
    if pin is None:
        return "base model"
    return f"model names adapter '{pin.adapter}'" if pin.adapter else "model names the base model"


def _routable(manifest: AdapterManifest) -> bool:
    return bool(manifest.examples or manifest.description.strip() or manifest.training_prompts)
