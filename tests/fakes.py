"""A scripted fake vLLM server on a loopback port, so the gateway's real HTTP client talks to
it over a real socket (only for error paths and wire details; e2e tests use the real engine).

Tests ``enqueue()`` what the engine answers to the next chat requests (a completion, an error
status, an SSE stream that may fail part-way, a dropped or stalled connection); ``GET
/v1/models`` is served from :attr:`FakeEngine.models` followed by the loaded LoRA adapters.
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` keep :attr:`FakeEngine.loras` as
vLLM keeps its adapters (same checks, same messages); a test may pre-load adapters there, or
script the next load's failure with :attr:`FakeEngine.fail_next_load`. ``POST /tokenize``
counts a chat prompt with :func:`prompt_tokens` (a deterministic estimate, not a tokenizer)
against :attr:`FakeEngine.max_model_len`, which a test may lower. Every request is
recorded, so a test can assert what did (or did not) reach the engine. Bodies mirror vLLM's
real ones, nulls and extra fields included.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BASE_MODEL = "tiny-base"
MAX_MODEL_LEN = 2048
CREATED = 1_700_000_000
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
LOAD_LORA_PATH = "/v1/load_lora_adapter"
UNLOAD_LORA_PATH = "/v1/unload_lora_adapter"
TOKENIZE_PATH = "/tokenize"
MAX_BODY_BYTES = 64 * 1024 * 1024
"""vLLM (uvicorn) sets no body limit; aiohttp's default of 1 MiB would refuse big prompts."""


# ---------------------------------------------------------------------------- vLLM's bodies


def model_card(model_id: str = BASE_MODEL, *, parent: str | None = None) -> dict[str, Any]:
    """One entry of vLLM's ``/v1/models``, with its ``root`` and ``permission`` extensions."""
    return {
        "id": model_id,
        "object": "model",
        "created": CREATED,
        "owned_by": "vllm",
        "root": f"/models/{model_id}",
        "parent": parent,
        "max_model_len": MAX_MODEL_LEN,
        "permission": [
            {
                "id": f"modelperm-{model_id}",
                "object": "model_permission",
                "created": CREATED,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


def lora_card(name: str, path: str, *, parent: str | None) -> dict[str, Any]:
    """A loaded LoRA adapter in vLLM's ``/v1/models``: its path as ``root``, the base as ``parent``."""
    return {
        "id": name,
        "object": "model",
        "created": CREATED,
        "owned_by": "vllm",
        "root": path,
        "parent": parent,
        "max_model_len": None,
        "permission": model_card(name)["permission"],
    }


def usage(prompt_tokens: int = 12, completion_tokens: int = 5) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def completion(
    content: str = "Hello there!",
    *,
    model: str = BASE_MODEL,
    finish_reason: str = "stop",
    prompt_tokens: int = 12,
    completion_tokens: int = 5,
) -> dict[str, Any]:
    """A non-streamed completion as vLLM sends it: nulls OpenAI's schema forbids included."""
    return {
        "id": "chatcmpl-fake0001",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning": None,
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "token_ids": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens),
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "kv_transfer_params": None,
    }


def chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish_reason: str | None = None,
    model: str = BASE_MODEL,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` as vLLM streams it."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-fake0002",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
                "token_ids": None,
            }
        ],
    }


def usage_chunk(
    prompt_tokens: int = 12, completion_tokens: int = 3, *, model: str = BASE_MODEL
) -> dict[str, Any]:
    """vLLM's last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {
        "id": "chatcmpl-fake0002",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def stream_chunks(*pieces: str, with_usage: bool = True) -> list[dict[str, Any]]:
    """A whole generation: the role chunk, one chunk per piece, the finish chunk, the usage."""
    chunks = [chunk("", role="assistant")]
    chunks += [chunk(piece) for piece in pieces]
    chunks.append(chunk("", finish_reason="stop"))
    if with_usage:
        chunks.append(usage_chunk(completion_tokens=len(pieces)))
    return chunks


def error_body(message: str, *, status: int, error_type: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's error body (``code`` is the HTTP status, an int)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def prompt_tokens(messages: Sequence[Any]) -> int:
    """The fake's token count of a chat prompt: a character count over four, plus four tokens
    of chat template per message (deterministic, so a test can predict what fits)."""
    characters = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            characters += len(content)
        elif isinstance(content, list):
            characters += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
    return characters // 4 + 4 * len(messages)


# ---------------------------------------------------------------------------- scripted replies


@dataclass(frozen=True)
class JSONReply:
    body: Any
    status: int = 200


@dataclass(frozen=True)
class RawReply:
    content: bytes
    status: int = 200
    content_type: str = "application/json"


@dataclass(frozen=True)
class StreamReply:
    """SSE ``data`` payloads (dicts are JSON-encoded); ``fail_with`` is raised after them, in
    place of the final ``[DONE]``."""

    events: Sequence[dict[str, Any] | str]
    fail_with: Drop | Stall | None = None
    done: bool = True
    hold: bool = False  # after the events, keep the connection open until the client leaves


class Drop:
    """The engine cuts the connection (before answering, or mid-stream)."""


class Stall:
    """The engine goes silent for longer than the gateway's read timeout, then drops."""


STALL_S = 3.0


@dataclass(frozen=True)
class RaiseReply:
    """The connection fails instead of a response: :class:`Drop` or :class:`Stall`."""

    error: Drop | Stall


Reply = JSONReply | RawReply | StreamReply | RaiseReply


@dataclass
class StreamRecord:
    """One SSE response the fake sent; ``wait_closed`` tells whether the gateway hung up."""

    transport: asyncio.BaseTransport | None

    async def wait_closed(self, timeout_s: float = 3.0) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if self.transport is None or self.transport.is_closing():
                return True
            await asyncio.sleep(0.02)
        return False


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    body: Any
    headers: Mapping[str, str]


@dataclass
class FakeEngine:
    """A fake vLLM; :meth:`start` serves it on 127.0.0.1 and sets :attr:`url`.

    A chat request with nothing enqueued is a test mistake: it fails loudly (HTTP 599 and an
    assertion when the test ends, as unused or missing replies are checked)."""

    models: list[dict[str, Any]] = field(default_factory=lambda: [model_card()])
    models_error: Drop | Stall | None = None
    loras: dict[str, str] = field(default_factory=dict)
    """Loaded LoRA adapters, name -> path, as vLLM's ``lora_requests``."""
    fail_next_load: tuple[int, str] | None = None
    """(status, message): the next load that passes vLLM's checks fails in the engine instead."""
    load_delay_s: float = 0.0
    """How long a load takes (vLLM reads the weights from disk meanwhile)."""
    max_model_len: int = 8192
    """The context window ``/tokenize`` reports."""
    default_reply: Callable[[dict[str, Any]], Reply] | None = None
    """The reply to a chat request (its body given) when nothing is enqueued: for fuzzing, where
    requests are too many to script; None: such a request is a test mistake."""
    peak_concurrent_loads: int = field(default=0, init=False)
    load_started: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    """Set once a load has passed vLLM's checks (a test can act while loads are in flight)."""
    _loads_in_flight: int = field(default=0, init=False, repr=False)
    requests: list[RecordedRequest] = field(default_factory=list, init=False)
    streams: list[StreamRecord] = field(default_factory=list, init=False, repr=False)
    unexpected: int = field(default=0, init=False)
    url: str = field(default="", init=False)
    _replies: deque[Reply] = field(default_factory=deque, init=False, repr=False)
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)

    # -- scripting

    def enqueue(self, *replies: Reply) -> None:
        self._replies.extend(replies)

    def enqueue_completion(self, content: str = "Hello there!", **kwargs: Any) -> dict[str, Any]:
        body = completion(content, **kwargs)
        self.enqueue(JSONReply(body))
        return body

    def enqueue_error(
        self, status: int, message: str, *, error_type: str = "BadRequestError", param: str | None = None
    ) -> None:
        self.enqueue(
            JSONReply(error_body(message, status=status, error_type=error_type, param=param), status)
        )

    def enqueue_stream(
        self,
        events: Sequence[dict[str, Any] | str],
        *,
        fail_with: Drop | Stall | None = None,
        done: bool = True,
        hold: bool = False,
    ) -> None:
        self.enqueue(StreamReply(events, fail_with=fail_with, done=done, hold=hold))

    def enqueue_raise(self, error: Drop | Stall) -> None:
        self.enqueue(RaiseReply(error))

    @property
    def pending(self) -> int:
        return len(self._replies)

    # -- what reached the engine

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path == CHAT_PATH]

    @property
    def load_requests(self) -> list[dict[str, Any]]:
        """The bodies of every load request, refused ones included."""
        return [r.body for r in self.requests if r.method == "POST" and r.path == LOAD_LORA_PATH]

    @property
    def unload_requests(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if r.method == "POST" and r.path == UNLOAD_LORA_PATH]

    @property
    def tokenize_requests(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if r.method == "POST" and r.path == TOKENIZE_PATH]

    @property
    def base_model_id(self) -> str | None:
        return next((card["id"] for card in self.models if card.get("parent") is None), None)

    @property
    def last_chat_body(self) -> dict[str, Any]:
        assert self.chat_requests, "no chat request reached the engine"
        body: dict[str, Any] = self.chat_requests[-1].body
        return body

    # -- the server

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.requests.append(RecordedRequest(request.method, request.path, body, request.headers))
        if request.method == "GET" and request.path == MODELS_PATH:
            if self.models_error is not None:
                return await _fail(request, self.models_error)
            loras = [lora_card(n, p, parent=self.base_model_id) for n, p in self.loras.items()]
            return web.json_response({"object": "list", "data": [*self.models, *loras]})
        if request.method == "POST" and request.path == LOAD_LORA_PATH:
            return await self._load_lora(body if isinstance(body, dict) else {})
        if request.method == "POST" and request.path == UNLOAD_LORA_PATH:
            return self._unload_lora(body if isinstance(body, dict) else {})
        if request.method == "POST" and request.path == TOKENIZE_PATH:
            return self._tokenize(body if isinstance(body, dict) else {})
        if request.method == "POST" and request.path == CHAT_PATH:
            if not self._replies and self.default_reply is not None:
                return await self._reply(request, self.default_reply(body if isinstance(body, dict) else {}))
            if not self._replies:
                self.unexpected += 1
                return web.json_response({"error": "no reply enqueued"}, status=599)
            return await self._reply(request, self._replies.popleft())
        return web.json_response(error_body("Not Found", status=404, error_type="NotFoundError"), status=404)

    async def _load_lora(self, body: dict[str, Any]) -> web.Response:
        """vLLM's ``OpenAIServingModels.load_lora_adapter``: its checks, then the engine's load."""
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _invalid_input("Both 'lora_name' and 'lora_path' must be provided.")
        if any(card["id"] == name for card in self.models if card.get("parent") is None):
            return _invalid_input(f"The lora adapter '{name}' conflicts with a served base model.")
        if not body.get("load_inplace", False) and name in self.loras:
            return _invalid_input(
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True."
            )
        self.load_started.set()
        self._loads_in_flight += 1
        self.peak_concurrent_loads = max(self.peak_concurrent_loads, self._loads_in_flight)
        try:
            await asyncio.sleep(self.load_delay_s)
        finally:
            self._loads_in_flight -= 1
        if self.fail_next_load is not None:
            (status, message), self.fail_next_load = self.fail_next_load, None
            kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
            return web.json_response(error_body(message, status=status, error_type=kind), status=status)
        self.loras[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    def _unload_lora(self, body: dict[str, Any]) -> web.Response:
        name = body.get("lora_name")
        if not name:
            return _invalid_input("'lora_name' needs to be provided to unload a LoRA adapter.")
        if self.loras.pop(name, None) is None:
            message = f"The lora adapter '{name}' cannot be found."
            return web.json_response(error_body(message, status=404, error_type="NotFoundError"), status=404)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    def _tokenize(self, body: dict[str, Any]) -> web.Response:
        """vLLM's ``/tokenize`` for a chat prompt (``tokens`` left empty: nobody reads them)."""
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _invalid_input("'messages' (or 'prompt') must be provided.")
        count = prompt_tokens(messages)
        return web.json_response({"count": count, "max_model_len": self.max_model_len, "tokens": []})

    async def _reply(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if isinstance(reply, RaiseReply):
            return await _fail(request, reply.error)
        if isinstance(reply, JSONReply):
            return web.json_response(reply.body, status=reply.status)
        if isinstance(reply, RawReply):
            return web.Response(body=reply.content, status=reply.status, content_type=reply.content_type)
        response = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        self.streams.append(StreamRecord(request.transport))
        for event in reply.events:
            data = event if isinstance(event, str) else json.dumps(event)
            await response.write(f"data: {data}\n\n".encode())
        if reply.hold:
            record = self.streams[-1]
            await record.wait_closed(timeout_s=STALL_S)
            return response
        if reply.fail_with is not None:
            return await _fail(request, reply.fail_with, response)
        if reply.done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _invalid_input(message: str) -> web.Response:
    return web.json_response(error_body(message, status=400, error_type="InvalidUserInput"), status=400)


async def _fail(
    request: web.Request, error: Drop | Stall, response: web.StreamResponse | None = None
) -> web.StreamResponse:
    if isinstance(error, Stall):
        await asyncio.sleep(STALL_S)
    if request.transport is not None:
        request.transport.abort()
    return response or web.Response()
