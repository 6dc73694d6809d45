"""Chat completions: validate against the limits, resolve the model, call the engine, normalise
what comes back. No HTTP here; the routes wrap it."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from service.adapter_registry import AdapterRegistry
from service.augment import Augmenter
from service.catalog import AUTO, ModelCatalog
from service.citations import Citations
from service.context_block import message_text, query_text
from service.engine import Engine, EngineStream
from service.errors import APIError, NotFoundError, UpstreamError
from service.injection import screen_passage
from service.limits import RequestLimits
from service.metrics import Metrics
from service.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, RouteDecision
from service.redaction import SecretRedactor, StreamRedactor
from service.router import Decision, Pin, Router
from service.stream_timing import StreamTimer, has_content

logger = logging.getLogger(__name__)

DONE = "[DONE]"


@dataclass(frozen=True)
class _Prepared:
    """A request made ready for the engine."""

    model: str  # the name clients see
    payload: dict[str, Any]
    route: RouteDecision
    removed: Sequence[Counter[str]]  # instructions screened out of each passage, in source order
    redactor: SecretRedactor | None  # the secrets of the request's system prompt, if any
    decision: Decision  # what the router decided it on (its scores, for the metrics and traffic log)


class ChatService:
    def __init__(
        self,
        engine: Engine,
        catalog: ModelCatalog,
        limits: RequestLimits,
        metrics: Metrics,
        adapters: AdapterRegistry | None = None,
        router: Router | None = None,
        *,
        attach_citations: bool = True,
        answer_tokens: int = 512,
        screen_instructions: bool = True,
        redact_secrets: bool = True,
    ) -> None:
        self._engine = engine
        self._catalog = catalog
        self._limits = limits
        self._metrics = metrics
        self._adapters = adapters
        self._router = router
        self._augmenter = Augmenter(engine, answer_tokens=answer_tokens)
        self._attach_citations = attach_citations
        self._screen_instructions = screen_instructions
        self._redact_secrets = redact_secrets

    async def _resolve(self, requested: str) -> tuple[str, Pin | None]:
        """The base model's engine id, and what the request's ``model`` pins (None: ``auto``)."""
        base = await self._catalog.resolve(AUTO)
        if requested == AUTO:
            return base, None
        if self._adapters is not None and self._adapters.is_registered(requested):
            self._adapters.check_servable(requested)
            return base, Pin(requested)
        await self._catalog.resolve(requested)  # 404 for a model that does not exist
        return requested, Pin(None)

    async def _prepare(self, request: ChatCompletionRequest) -> _Prepared:
        self._limits.check(request)
        base, pin = await self._resolve(request.model)
        payload = request.engine_payload(base)
        # Secrets come from the client's own system and developer messages (developer is
        # system by now), read before any source is added.
        redactor = (
            SecretRedactor.for_messages(
                message_text(m["content"]) for m in payload["messages"] if m["role"] == "system"
            )
            if self._redact_secrets
            else None
        )
        if self._router is not None:
            decision = await self._router.decide(payload["messages"], pin=pin, rag=request.rag)
        else:
            adapter = pin.adapter if pin is not None else None
            decision = Decision(adapter, [], {}, None, "routing is not configured")
        removed: list[Counter[str]] = []
        if self._screen_instructions and decision.passages:
            screened = [screen_passage(passage) for passage in decision.passages]
            decision = dataclasses.replace(decision, passages=[passage for passage, _ in screened])
            removed = [kinds for _, kinds in screened]
        model = decision.adapter or base
        payload["model"] = self._adapters.engine_id(model) if decision.adapter and self._adapters else model
        route = await self._augmenter.apply(decision, payload, base)
        logger.info("route %s: %s", route.header(), route.reason)
        return _Prepared(model, payload, route, removed[: len(route.rag.sources)], redactor, decision)

    def _count(self, prepared: _Prepared) -> None:
        """Metrics and logs of a request about to be generated (not of an explained one)."""
        self._metrics.count_route(prepared.route)
        if self._router is not None:
            self._router.observe(prepared.decision, prepared.route)
        for source, kinds in zip(prepared.route.rag.sources, prepared.removed, strict=False):
            if kinds:
                self._metrics.count_injections(kinds)
                logger.warning(
                    "removed %d instruction(s) to the model (%s) from source [%d] %s (chunk %s)",
                    sum(kinds.values()),
                    ", ".join(sorted(kinds)),
                    source.id,
                    source.source,
                    source.chunk_id,
                )

    async def explain(self, request: ChatCompletionRequest) -> RouteDecision:
        """The decision a chat request would get, without generating."""
        return (await self._prepare(request)).route

    async def complete(self, request: ChatCompletionRequest) -> ChatCompletion:
        prepared = await self._prepare(request)
        model, payload, route = prepared.model, prepared.payload, prepared.route
        self._count(prepared)
        try:
            completion = await self._engine.chat(payload)
        except NotFoundError:
            self._catalog.forget()
            raise
        self._metrics.count_usage(model, completion.usage)
        if prepared.redactor is not None:
            completion, redacted = prepared.redactor.completion(completion)
            _count_redactions(self._metrics, redacted)
        # Citations are chosen from what the client will read, redactions included.
        citations = self._citations(route, payload)
        if citations is not None:
            completion = citations.attach(completion)
        # The engine may know an adapter by its version's id: clients see the name they use.
        return completion.model_copy(update={"route": route, "model": model})

    async def stream(self, request: ChatCompletionRequest) -> ChatStream:
        """Open the upstream stream before answering, so that the engine's refusals (context
        too long, unknown model) are plain HTTP errors rather than events in a 200 stream."""
        prepared = await self._prepare(request)
        model, payload, route = prepared.model, prepared.payload, prepared.route
        self._count(prepared)
        # Usage is always asked of the engine (for the token metrics); the client sees it
        # only if it asked too.
        payload["stream_options"] = {"include_usage": True}
        wants_usage = request.stream_options is not None and request.stream_options.include_usage
        try:
            upstream = await self._engine.open_chat_stream(payload)
        except NotFoundError:
            self._catalog.forget()
            raise
        return ChatStream(
            upstream,
            model=model,
            wants_usage=wants_usage,
            metrics=self._metrics,
            route=route,
            citations=self._citations(route, payload),
            redactor=StreamRedactor(prepared.redactor) if prepared.redactor is not None else None,
        )

    def _citations(self, route: RouteDecision, payload: dict[str, Any]) -> Citations | None:
        if not self._attach_citations or not route.rag.used:
            return None
        return Citations([source.text for source in route.rag.sources], query_text(payload["messages"]))


class ChatStream:
    """The normalised SSE ``data`` payloads of one generation, ending with ``[DONE]``.

    An engine failure mid-stream becomes one error payload, then ``[DONE]``."""

    def __init__(
        self,
        upstream: EngineStream,
        *,
        model: str,
        wants_usage: bool,
        metrics: Metrics,
        route: RouteDecision,
        citations: Citations | None = None,
        redactor: StreamRedactor | None = None,
    ) -> None:
        self._upstream = upstream
        self._model = model
        self._wants_usage = wants_usage
        self._metrics = metrics
        self.route = route
        self._citations = citations
        self._redactor = redactor
        self._timer = StreamTimer(metrics, model, route.adapter)

    async def events(self) -> AsyncIterator[str]:
        first = True
        try:
            async for data in self._upstream.data():
                chunk = _parse_chunk(data)
                if chunk.usage is not None:
                    self._metrics.count_usage(self._model, chunk.usage)
                    if not self._wants_usage:
                        if not chunk.choices:
                            continue
                        chunk = chunk.model_copy(update={"usage": None})
                # Redaction first: it holds back the tail that may begin a secret, and citations
                # are added to the last chunk after the held text is released.
                if self._redactor is not None:
                    chunk, redacted = self._redactor.follow(chunk)
                    _count_redactions(self._metrics, redacted)
                if self._citations is not None:
                    chunk = self._citations.follow(chunk)
                yield self._finish(chunk, first)
                first = False
            if self._redactor is not None:  # an answer that never finished: its held text
                tail, redacted = self._redactor.drain()
                _count_redactions(self._metrics, redacted)
                if tail is not None:
                    yield self._finish(tail, first)
        except APIError as exc:
            logger.warning("stream ended by an engine error: %s", exc.message)
            self._metrics.count_error(exc.error_type, exc.code)
            yield json.dumps(exc.envelope())
        yield DONE

    def _finish(self, chunk: ChatCompletionChunk, first: bool) -> str:
        """The chunk's JSON, with the route on the first and the client's model name on all."""
        self._timer.chunk(has_content(chunk))
        if first:
            chunk = chunk.model_copy(update={"route": self.route, "model": self._model})
        elif chunk.model != self._model:  # an adapter the engine knows by its version's id
            chunk = chunk.model_copy(update={"model": self._model})
        return chunk.model_dump_json()

    async def aclose(self) -> None:
        await self._upstream.aclose()


def _count_redactions(metrics: Metrics, count: int) -> None:
    if count:
        metrics.count_redactions(count)
        logger.warning("redacted %d secret(s) of the system prompt from an answer", count)


def _parse_chunk(data: str) -> ChatCompletionChunk:
    try:
        return ChatCompletionChunk.model_validate_json(data)
    except ValidationError:
        pass
    raise _engine_event_error(data)


def _engine_event_error(data: str) -> APIError:
    """vLLM reports a failure mid-stream as ``data: {"error": {...}}``."""
    try:
        error = json.loads(data).get("error")
    except (json.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict):
        return UpstreamError(f"The model engine failed mid-stream: {error.get('message', '')}")
    return UpstreamError("The model engine sent an unreadable stream event.")
