"""Legacy text completions (``POST /v1/completions``), relayed to the engine's own: the base
model or a registered adapter continues a prompt, with no chat template, router or retrieval in
between (a client that asks for raw continuation wants exactly that prompt to reach the model).

Everything else is as for chat: an allow-list parsed strictly, bounds from the same settings,
the model resolved the same way (``auto`` is the base model; an adapter by the id the engine
knows its version by), engine failures in the same envelopes, responses and stream chunks cut
down to OpenAI's ``CreateCompletionResponse``, and token usage counted.

What OpenAI has and the gateway refuses, in words rather than by dropping it: token-id prompts
(ids of OpenAI's tokenizer, meaningless to this model), ``suffix`` (vLLM does not insert) and
``best_of`` above 1 (vLLM's engine no longer ranks candidates). No HTTP here; the routes wrap it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.adapter_registry import AdapterRegistry
from service.catalog import AUTO, ModelCatalog
from service.engine import EngineStream
from service.errors import APIError, InvalidRequestError, NotFoundError, UpstreamError
from service.limits import MAX_STOP_CHARS, RequestLimits
from service.metrics import Metrics
from service.protocol import StreamOptions, Usage, _Wire

logger = logging.getLogger(__name__)

DONE = "[DONE]"
MAX_PROMPTS = 16
"""Prompts in one request: each is a generation (times ``n``), and the concurrency cap counts
the request once."""
MAX_LOGPROBS = 5
"""OpenAI's own bound on ``logprobs`` for completions."""
_INT64 = 2**63

# ---------------------------------------------------------------------------- wire types


class CompletionRequest(BaseModel):
    """The allow-list: only these fields exist for the gateway; anything else is a 400."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str = AUTO
    # Token arrays parse (OpenAI's schema has them) so that they are refused in words.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1, lt=_INT64)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, lt=_INT64)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-_INT64, lt=_INT64)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None
    suffix: str | None = None  # refused unless null: see the module's docstring
    best_of: Annotated[int, Field(ge=0, lt=_INT64)] | None = None  # refused above 1
    user: Annotated[str, Field(max_length=256)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def engine_payload(self, engine_model: str) -> dict[str, Any]:
        payload = self.model_dump(exclude_none=True, exclude={"model", "suffix", "best_of"})
        payload["model"] = engine_model
        return payload


class CompletionLogprobs(_Wire):
    text_offset: list[int] | None = None
    # null for the first prompt token of an echo: nothing came before it to predict it from
    token_logprobs: list[float | None] | None = None
    tokens: list[str] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None


class CompletionChoice(_Wire):
    keep_null: ClassVar[frozenset[str]] = frozenset({"logprobs", "finish_reason"})
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    # null on every stream chunk but a choice's last, as OpenAI sends them
    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class TextCompletion(_Wire):
    """A completion, and (same shape, unlike chat) each chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------------------- the service


class TextCompletionEngine(Protocol):
    async def text_completion(self, payload: dict[str, Any]) -> bytes | EngineStream: ...


class CompletionService:
    def __init__(
        self,
        engine: TextCompletionEngine,
        catalog: ModelCatalog,
        limits: RequestLimits,
        metrics: Metrics,
        adapters: AdapterRegistry | None = None,
    ) -> None:
        self._engine = engine
        self._catalog = catalog
        self._limits = limits
        self._metrics = metrics
        self._adapters = adapters

    async def _resolve(self, requested: str) -> tuple[str, str]:
        """The name the client sees and the engine's id for it (as chat resolves a pinned model:
        ``auto`` is the base model here, there being no router)."""
        base = await self._catalog.resolve(AUTO)
        if requested == AUTO:
            return base, base
        if self._adapters is not None and self._adapters.is_registered(requested):
            self._adapters.check_servable(requested)
            return requested, self._adapters.engine_id(requested)
        await self._catalog.resolve(requested)  # 404 for a model that does not exist
        return requested, requested

    async def _send(self, request: CompletionRequest) -> tuple[str, bytes | EngineStream]:
        check(request, self._limits)
        model, engine_model = await self._resolve(request.model)
        payload = request.engine_payload(engine_model)
        if request.stream:
            # Usage is always asked of the engine (for the token metrics); the client sees it
            # only if it asked too.
            payload["stream_options"] = {"include_usage": True}
        try:
            return model, await self._engine.text_completion(payload)
        except NotFoundError:
            self._catalog.forget()
            raise

    async def complete(self, request: CompletionRequest) -> TextCompletion:
        model, answer = await self._send(request)
        if not isinstance(answer, bytes):  # an engine that streamed what was not asked to be
            await answer.aclose()
            raise UpstreamError("The model engine streamed a completion that was asked for whole.")
        completion = _parse(answer)
        self._metrics.count_usage(model, completion.usage)
        # The engine may know an adapter by its version's id: clients see the name they use.
        return completion.model_copy(update={"model": model})

    async def stream(self, request: CompletionRequest) -> CompletionStream:
        """Open the upstream stream before answering, so that the engine's refusals are plain
        HTTP errors rather than events in a 200 stream."""
        model, answer = await self._send(request)
        if isinstance(answer, bytes):
            raise UpstreamError("The model engine answered a streamed completion whole.")
        wants_usage = request.stream_options is not None and request.stream_options.include_usage
        return CompletionStream(answer, model=model, wants_usage=wants_usage, metrics=self._metrics)


class CompletionStream:
    """The normalised SSE ``data`` payloads of one generation, ending with ``[DONE]``; an engine
    failure mid-stream becomes one error payload, then ``[DONE]``."""

    def __init__(self, upstream: EngineStream, *, model: str, wants_usage: bool, metrics: Metrics) -> None:
        self._upstream = upstream
        self._model = model
        self._wants_usage = wants_usage
        self._metrics = metrics

    async def events(self) -> AsyncIterator[str]:
        try:
            async for data in self._upstream.data():
                chunk = _parse(data)
                if chunk.usage is not None:
                    self._metrics.count_usage(self._model, chunk.usage)
                    if not self._wants_usage:
                        if not chunk.choices:
                            continue
                        chunk = chunk.model_copy(update={"usage": None})
                yield chunk.model_copy(update={"model": self._model}).model_dump_json()
        except APIError as exc:
            logger.warning("completion stream ended by an engine error: %s", exc.message)
            self._metrics.count_error(exc.error_type, exc.code)
            yield json.dumps(exc.envelope())
        yield DONE

    async def aclose(self) -> None:
        await self._upstream.aclose()


def check(request: CompletionRequest, limits: RequestLimits) -> None:
    """The bounds chat has (same settings), and what the gateway refuses of completions."""
    prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]
    if not prompts:
        _fail("prompt", "'prompt' must not be an empty list")
    if len(prompts) > MAX_PROMPTS:
        _fail("prompt", f"at most {MAX_PROMPTS} prompts are accepted, got {len(prompts)}")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            _fail("prompt", "'prompt' must be text: token arrays (ids of another tokenizer) are not accepted")
        if not prompt:
            _fail(
                f"prompt[{index}]" if isinstance(request.prompt, list) else "prompt",
                "a prompt must not be empty",
            )
    if request.max_tokens is not None and request.max_tokens > limits.max_tokens_cap:
        _fail("max_tokens", f"max_tokens must be at most {limits.max_tokens_cap}, got {request.max_tokens}")
    if request.n is not None and request.n > limits.max_n:
        _fail("n", f"n must be at most {limits.max_n}, got {request.n}")
    if request.logprobs is not None and request.logprobs > limits.max_top_logprobs:
        _fail("logprobs", f"logprobs must be at most {limits.max_top_logprobs}")
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > limits.max_stop:
        _fail("stop", f"at most {limits.max_stop} stop sequences are accepted, got {len(stops)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        _fail("stop", f"each stop sequence must be 1 to {MAX_STOP_CHARS} characters")
    if request.stream_options is not None and not request.stream:
        _fail("stream_options", "stream_options is only allowed when stream is true")
    if request.suffix is not None:
        _fail("suffix", "suffix is not supported: the engine only continues a prompt, it does not insert")
    if request.best_of is not None and request.best_of > 1:
        _fail("best_of", "best_of above 1 is not supported: ask for n completions and choose among them")


def _fail(param: str, message: str) -> NoReturn:
    raise InvalidRequestError(message, param=param)


def _parse(data: str | bytes) -> TextCompletion:
    try:
        return TextCompletion.model_validate_json(data)
    except ValidationError as exc:
        raise _engine_error(data, exc) from None


def _engine_error(data: str | bytes, exc: ValidationError) -> APIError:
    """vLLM reports a failure mid-stream as ``data: {"error": {...}}``."""
    try:
        error = json.loads(data).get("error")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        error = None
    if isinstance(error, dict):
        return UpstreamError(f"The model engine failed mid-stream: {error.get('message', '')}")
    return UpstreamError(f"The model engine sent an unexpected text completion: {exc.errors()[0]['msg']}")
