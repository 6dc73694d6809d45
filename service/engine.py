"""The engine: a vLLM OpenAI-compatible server, spoken to over HTTP only.

:class:`Engine` is the narrow interface the rest of the gateway uses; :class:`VLLMEngine` is
the real one (httpx). Tests of error paths give it an ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import ValidationError

from service.errors import (
    APIError,
    EngineTimeoutError,
    EngineUnavailableError,
    InvalidRequestError,
    NotFoundError,
    UpstreamError,
)
from service.protocol import ChatCompletion, ModelCard, ModelList

_T = TypeVar("_T", ChatCompletion, ModelList)
_CONTEXT_WORDS = re.compile(r"maximum context length|max_model_len|context length", re.IGNORECASE)


class EngineStream(Protocol):
    """An opened streaming generation: the SSE ``data`` payloads, ``[DONE]`` excluded."""

    def data(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    async def list_models(self) -> list[ModelCard]: ...

    async def chat(self, payload: dict[str, Any]) -> ChatCompletion: ...

    async def open_chat_stream(self, payload: dict[str, Any]) -> EngineStream: ...


class VLLMEngine:
    """A vLLM server at ``client.base_url``; every failure becomes an :class:`APIError`."""

    def __init__(self, client: httpx.AsyncClient, *, retry_after_s: int, probe_timeout_s: float = 3.0):
        self._client = client
        self._retry_after_s = retry_after_s
        self._probe_timeout = probe_timeout_s

    async def list_models(self) -> list[ModelCard]:
        response = await self._send("GET", "/v1/models", timeout_s=self._probe_timeout)
        return _parse(ModelList, response.content).data

    async def chat(self, payload: dict[str, Any]) -> ChatCompletion:
        response = await self._send("POST", "/v1/chat/completions", json=payload)
        return _parse(ChatCompletion, response.content)

    async def open_chat_stream(self, payload: dict[str, Any]) -> EngineStream:
        request = self._client.build_request("POST", "/v1/chat/completions", json=payload)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise _timeout(exc) from exc
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        if response.status_code != httpx.codes.OK:
            try:
                await response.aread()
            finally:
                await response.aclose()
            raise self._status_error(response)
        return _VLLMStream(response, self._retry_after_s)

    async def _send(
        self, method: str, path: str, *, json: Any = None, timeout_s: float | None = None
    ) -> httpx.Response:
        extra: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
        try:
            response = await self._client.request(method, path, json=json, **extra)
        except httpx.TimeoutException as exc:
            raise _timeout(exc) from exc
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        if response.status_code != httpx.codes.OK:
            raise self._status_error(response)
        return response

    def _unavailable(self, exc: Exception) -> EngineUnavailableError:
        return EngineUnavailableError(
            f"The model engine is unavailable ({type(exc).__name__}); retry shortly.",
            retry_after_s=self._retry_after_s,
        )

    def _status_error(self, response: httpx.Response) -> APIError:
        """Map a vLLM error response: its 4xx are the client's mistakes and keep their status."""
        message, param = _engine_message(response)
        status = response.status_code
        if status == httpx.codes.BAD_REQUEST or status == httpx.codes.UNPROCESSABLE_ENTITY:
            code = "context_length_exceeded" if _CONTEXT_WORDS.search(message) else None
            if code:
                message = f"This model's maximum context length was exceeded: {message}"
            return InvalidRequestError(message, param=param, code=code)
        if status == httpx.codes.NOT_FOUND:
            return NotFoundError(message, param=param or "model", code="model_not_found")
        if status == httpx.codes.SERVICE_UNAVAILABLE:
            return EngineUnavailableError(message, retry_after_s=self._retry_after_s)
        return UpstreamError(f"The model engine failed (HTTP {status}): {message}")


class _VLLMStream:
    def __init__(self, response: httpx.Response, retry_after_s: int) -> None:
        self._response = response
        self._retry_after_s = retry_after_s

    async def data(self) -> AsyncIterator[str]:
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, other SSE fields
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                yield payload
        except httpx.TimeoutException as exc:
            raise _timeout(exc) from exc
        except httpx.TransportError as exc:
            raise EngineUnavailableError(
                f"The model engine stopped mid-stream ({type(exc).__name__}).",
                retry_after_s=self._retry_after_s,
            ) from exc

    async def aclose(self) -> None:
        # Closing the connection is what makes vLLM abort the generation.
        await self._response.aclose()


def _timeout(exc: Exception) -> EngineTimeoutError:
    return EngineTimeoutError(f"The model engine did not answer in time ({type(exc).__name__}).")


def _engine_message(response: httpx.Response) -> tuple[str, str | None]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:500] or response.reason_phrase, None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        param = error.get("param")
        return str(error.get("message", "")), param if isinstance(param, str) else None
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500], None
    return response.text[:500], None


def _parse(kind: type[_T], content: bytes) -> _T:
    try:
        return kind.model_validate_json(content)
    except ValidationError as exc:
        raise UpstreamError(
            f"The model engine sent an unexpected {kind.__name__}: {exc.errors()[0]['msg']}"
        ) from exc
