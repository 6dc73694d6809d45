"""The engine: a vLLM OpenAI-compatible server, spoken to over HTTP only.

:class:`Engine` is the narrow interface the rest of the gateway uses; :class:`VLLMEngine` is
the real one. It uses aiohttp rather than httpx: on this hot path httpx costs about 0.3 ms
more per request (measured against a loopback server), a third of the latency budget the
gateway has. Tests put a real loopback fake server behind it for the error paths.

A request whose connection to the engine could not be opened (refused, or the connect timed
out) is sent once more after a short pause: nothing reached the engine, so nothing is done
twice, and the cause is usually brief (a connect seen late by a busy event loop, a replica
behind a router that just went away).

Failure mapping:
    no connection, twice / connection lost  503 engine_unavailable (Retry-After)
    silent past the read timeout            504 engine_timeout
    vLLM 400/422                            400 (context_length_exceeded when it says so)
    vLLM 404                                404 model_not_found
    vLLM 503                                503
    anything else                           502 engine_error
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar

import aiohttp
from opentelemetry import trace
from pydantic import ValidationError

from service import request_context
from service.errors import (
    APIError,
    EngineTimeoutError,
    EngineUnavailableError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UpstreamError,
)
from service.protocol import ChatCompletion, ModelCard, ModelList, PromptSize

_T = TypeVar("_T", ChatCompletion, ModelList, PromptSize)
_CONTEXT_WORDS = re.compile(r"maximum context length|max_model_len|context length", re.IGNORECASE)
_CHAT = "/v1/chat/completions"
_CONNECT_FAILURES = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
"""Raised before a byte of the request was sent: safe to send again."""
CONNECT_RETRY_PAUSE_S = 0.25

logger = logging.getLogger(__name__)


class EngineStream(Protocol):
    """An opened streaming generation: the SSE ``data`` payloads, ``[DONE]`` excluded."""

    def data(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    async def list_models(self) -> list[ModelCard]: ...

    async def load_adapter(self, name: str, path: str, *, replace: bool) -> None: ...

    async def unload_adapter(self, name: str) -> bool: ...

    async def chat(self, payload: dict[str, Any]) -> ChatCompletion: ...

    async def open_chat_stream(self, payload: dict[str, Any]) -> EngineStream: ...

    async def count_prompt_tokens(self, model: str, messages: list[dict[str, Any]]) -> PromptSize: ...


def engine_session(
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    max_connections: int,
    keepalive_s: float,
    api_key: str | None = None,
) -> aiohttp.ClientSession:
    """The pooled HTTP session to the engine. ``read_timeout_s`` bounds the silence between two
    reads (a generation may take long in total, but never goes quiet that long).

    ``keepalive_s`` must stay below the engine's idle timeout (vLLM closes an idle connection
    after 5 s; aiohttp would reuse one for 15 s): a request sent on a connection the engine is
    closing fails with ServerDisconnectedError, a 503 to the client for nothing it did."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return aiohttp.ClientSession(
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s),
        connector=aiohttp.TCPConnector(
            limit=max_connections, limit_per_host=max_connections, keepalive_timeout=keepalive_s
        ),
        raise_for_status=False,
    )


class VLLMEngine:
    """A vLLM server at ``base_url``; every failure becomes an :class:`APIError`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        retry_after_s: int,
        probe_timeout_s: float = 3.0,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._retry_after_s = retry_after_s
        self._probe_timeout = aiohttp.ClientTimeout(total=probe_timeout_s)

    async def list_models(self) -> list[ModelCard]:
        status, body = await self._request("GET", "/v1/models", timeout_s=self._probe_timeout)
        if status != 200:
            raise self._status_error(status, body)
        return _parse(ModelList, body).data

    async def load_adapter(self, name: str, path: str, *, replace: bool) -> None:
        """Load a LoRA adapter under ``name``. ``replace`` swaps the weights of a loaded one in
        place (from a new ``path``, so vLLM does not reuse prefix-cache blocks of the old)."""
        payload = {"lora_name": name, "lora_path": path, "load_inplace": replace}
        status, body = await self._request("POST", "/v1/load_lora_adapter", payload=payload)
        if status != 200:
            raise self._status_error(status, body)

    async def unload_adapter(self, name: str) -> bool:
        """Unload ``name``; False when the engine did not have it."""
        status, body = await self._request("POST", "/v1/unload_lora_adapter", payload={"lora_name": name})
        if status == 404:
            return False
        if status != 200:
            raise self._status_error(status, body)
        return True

    async def chat(self, payload: dict[str, Any]) -> ChatCompletion:
        with request_context.span("engine.chat", kind=trace.SpanKind.CLIENT, attributes=_span_facts(payload)):
            status, body = await self._request("POST", _CHAT, payload=payload)
            if status != 200:
                raise self._status_error(status, body)
        return _parse(ChatCompletion, body)

    async def count_prompt_tokens(self, model: str, messages: list[dict[str, Any]]) -> PromptSize:
        """The prompt's length in the model's tokens, chat template included (vLLM's
        ``/tokenize``), and the model's context window."""
        payload = {"model": model, "messages": messages, "add_generation_prompt": True}
        status, body = await self._request("POST", "/tokenize", payload=payload)
        if status != 200:
            raise self._status_error(status, body)
        return _parse(PromptSize, body)

    async def open_chat_stream(self, payload: dict[str, Any]) -> EngineStream:
        # The span lasts to the stream's end; the traceparent vLLM gets is this span's.
        span = request_context.start_span(
            "engine.chat", kind=trace.SpanKind.CLIENT, attributes=_span_facts(payload, stream=True)
        )
        try:
            with request_context.activate(span):
                return await self._open_stream(_CHAT, payload, span)
        except BaseException:
            span.end()
            raise

    async def _open_stream(self, path: str, payload: dict[str, Any], span: trace.Span) -> EngineStream:
        try:
            response = await self._send("POST", path, json=payload)
        except aiohttp.ConnectionTimeoutError as exc:
            raise self._unavailable(exc) from exc
        except TimeoutError as exc:
            raise _timeout(exc) from exc
        except aiohttp.ClientError as exc:
            raise self._unavailable(exc) from exc
        if response.status != 200:
            try:
                body = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                body = b""
            finally:
                response.close()
            raise self._status_error(response.status, body)
        return _VLLMStream(response, self._retry_after_s, span)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        payload: dict[str, Any] | None = None,
        timeout_s: aiohttp.ClientTimeout | None = None,
    ) -> tuple[int, bytes]:
        options: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
        try:
            async with await self._send(method, path, json=payload, **options) as response:
                return response.status, await response.read()
        except aiohttp.ConnectionTimeoutError as exc:
            raise self._unavailable(exc) from exc
        except TimeoutError as exc:
            raise _timeout(exc) from exc
        except aiohttp.ClientError as exc:
            raise self._unavailable(exc) from exc

    async def _send(self, method: str, path: str, **options: Any) -> aiohttp.ClientResponse:
        """The engine's response (headers read), the request sent a second time if its first
        connection could not be opened. Both carry the request's id and trace context."""
        headers = request_context.upstream_headers()
        if headers:
            options["headers"] = headers
        try:
            return await self._session.request(method, self._base_url + path, **options)
        except _CONNECT_FAILURES as exc:
            logger.info("no connection to the engine (%s); trying once more", type(exc).__name__)
        await asyncio.sleep(CONNECT_RETRY_PAUSE_S)
        return await self._session.request(method, self._base_url + path, **options)

    def _unavailable(self, exc: BaseException) -> EngineUnavailableError:
        return EngineUnavailableError(
            f"The model engine is unavailable ({type(exc).__name__}); retry shortly.",
            retry_after_s=self._retry_after_s,
        )

    def _status_error(self, status: int, body: bytes) -> APIError:
        """Map a vLLM error response: its 4xx are the client's mistakes and keep their status."""
        message, param = _engine_message(body)
        if status in (400, 422):
            code = "context_length_exceeded" if _CONTEXT_WORDS.search(message) else None
            if code:
                message = f"This model's maximum context length was exceeded: {message}"
            return InvalidRequestError(message, param=param, code=code)
        if status == 404:
            return NotFoundError(message, param=param or "model", code="model_not_found")
        if status == 413:  # a proxy before the engine with a smaller body limit than the gateway's
            return PayloadTooLargeError(f"The model engine refused the request as too large: {message}")
        if status == 503:
            return EngineUnavailableError(message, retry_after_s=self._retry_after_s)
        return UpstreamError(f"The model engine failed (HTTP {status}): {message}")

    async def text_completion(self, payload: dict[str, Any]) -> bytes | EngineStream:
        """Legacy text completions (``/v1/completions``, see ``service.completions``): the plain
        answer's body, or with ``stream`` the opened stream; failures mapped as for chat."""
        if not payload.get("stream"):
            status, body = await self._request("POST", "/v1/completions", payload=payload)
            if status != 200:
                raise self._status_error(status, body)
            return body
        return await self._open_stream("/v1/completions", payload, trace.INVALID_SPAN)


class _VLLMStream:
    def __init__(self, response: aiohttp.ClientResponse, retry_after_s: int, span: trace.Span) -> None:
        self._response = response
        self._retry_after_s = retry_after_s
        self._span: trace.Span | None = span if span.is_recording() else None

    def data(self) -> AsyncIterator[str]:
        return self._payloads() if self._span is None else self._traced(self._payloads())

    async def _traced(self, payloads: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for payload in payloads:
                yield payload
        except APIError as exc:
            self._end_span(exc)
            raise
        self._end_span(None)

    def _end_span(self, error: APIError | None) -> None:
        if self._span is not None:
            if error is not None:
                self._span.record_exception(error)
                self._span.set_status(trace.StatusCode.ERROR, error.message)
            self._span.end()
            self._span = None

    async def _payloads(self) -> AsyncIterator[str]:
        try:
            async for line in _lines(self._response.content):
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, other SSE fields
                payload = line[5:].strip().decode()
                if payload == "[DONE]":
                    return
                yield payload
        except TimeoutError as exc:
            raise _timeout(exc) from exc
        except aiohttp.ClientError as exc:
            raise EngineUnavailableError(
                f"The model engine stopped mid-stream ({type(exc).__name__}).",
                retry_after_s=self._retry_after_s,
            ) from exc
        raise EngineUnavailableError(
            "The model engine closed the stream before it finished.", retry_after_s=self._retry_after_s
        )

    async def aclose(self) -> None:
        # Closing the connection (not returning it to the pool) is what makes vLLM abort.
        self._response.close()
        self._end_span(None)


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Lines of any length (aiohttp's own line iterator refuses lines over 64 KiB)."""
    pending = b""
    async for block in content.iter_any():
        pending += block
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.rstrip(b"\r")
    if pending:
        yield pending


def _span_facts(payload: dict[str, Any], *, stream: bool = False) -> dict[str, str | bool]:
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": str(payload.get("model")),
        "hybrid.stream": stream,
    }


def _timeout(exc: BaseException) -> EngineTimeoutError:
    return EngineTimeoutError(f"The model engine did not answer in time ({type(exc).__name__}).")


def _engine_message(body: bytes) -> tuple[str, str | None]:
    text = body.decode(errors="replace")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return text[:500] or "no details", None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        param = error.get("param")
        return str(error.get("message", "")), param if isinstance(param, str) else None
    if isinstance(parsed, dict) and "detail" in parsed:
        return str(parsed["detail"])[:500], None
    return text[:500], None


def _parse(kind: type[_T], content: bytes) -> _T:
    try:
        return kind.model_validate_json(content)
    except ValidationError as exc:
        raise UpstreamError(
            f"The model engine sent an unexpected {kind.__name__}: {exc.errors()[0]['msg']}"
        ) from exc
