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

from tests.vllm_bodies import completion, error_body, lora_card, model_card, prompt_tokens

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
LOAD_LORA_PATH = "/v1/load_lora_adapter"
UNLOAD_LORA_PATH = "/v1/unload_lora_adapter"
TOKENIZE_PATH = "/tokenize"
MAX_BODY_BYTES = 64 * 1024 * 1024
"""vLLM (uvicorn) sets no body limit; aiohttp's default of 1 MiB would refuse big prompts."""


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

HOLD_S = 60.0
"""How long a held stream waits for its client to leave: as long as a test on a loaded machine
may need, and still bounded, so that a test that fails while holding cannot stall the fake's
shutdown for good."""


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
            await record.wait_closed(timeout_s=HOLD_S)
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
