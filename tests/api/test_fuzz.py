"""Property-based requests from the gateway's own ``/openapi.json`` (schemathesis): for every
operation, inputs that fit the schema and inputs that break it, and neither ever gets a 5xx, and
every 4xx is OpenAI's envelope.

Bounded for CI: a fixed number of examples per operation and mode, derandomized (the same
requests every run; a failure replays), no example database. The schema is read over ASGI; the
cases are sent over ASGI by httpx, in the one event loop that runs the app and the fake engine
(which answers every chat and completion request it gets), rather than by schemathesis's own
client, which runs apps in a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import Case as SchemathesisCase
from schemathesis import GenerationMode
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.core.transport import Response

from service.app import build_app
from tests.api.conftest import GATEWAY_URL, assert_envelope, make_settings
from tests.api.test_completions import stream_events, text_completion
from tests.fakes import FakeEngine, JSONReply, RecordedRequest, Reply, StreamReply
from tests.vllm_bodies import completion, stream_chunks

Case = SchemathesisCase[Any]
COMPLETIONS_PATH = "/v1/completions"
ADMIN_TOKEN = "fuzz-admin-token"
EXAMPLES = 50
"""Per operation and generation mode (at most: an operation without input has few distinct ones)."""

WITH_BODY = [
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/responses",
    "POST /admin/adapters",
    "PATCH /admin/adapters/{name}",
    "POST /admin/collections/{name}/documents",
    "POST /admin/router/explain",
    "POST /admin/router/fit",
]
"""Operations with a JSON body: the only inputs a generated request can break (any string is a
valid path parameter)."""
WITHOUT_BODY = [
    "GET /v1/models",
    "GET /v1/models/{model}",
    "GET /health",
    "GET /ready",
    "GET /metrics",
    "GET /admin/adapters",
    "GET /admin/adapters/{name}",
    "DELETE /admin/adapters/{name}",
    "GET /admin/collections",
    "DELETE /admin/collections/{name}/documents/{source}",
    "DELETE /admin/collections/{name}",
    "GET /admin/router",
]
NO_PATH: dict[str, str] = {}
EMBEDDER = "the-embedder"
"""A ``model`` the fuzzed bodies are given: the gateway's embedder, whose name is known once the
app runs."""
CASES = [
    pytest.param(label, GenerationMode.POSITIVE, NO_PATH, None, id=f"{label} valid")
    for label in WITH_BODY + WITHOUT_BODY
]
CASES += [
    pytest.param(label, GenerationMode.NEGATIVE, NO_PATH, None, id=f"{label} invalid") for label in WITH_BODY
]
# Random collection names are nearly all invalid: with a valid one, documents get ingested.
CASES.append(
    pytest.param(
        "POST /admin/collections/{name}/documents",
        GenerationMode.POSITIVE,
        {"name": "fuzz-notes"},
        None,
        id="POST /admin/collections/fuzz-notes/documents valid",
    )
)
# Random model names are nearly all 404s: with a served one, the request gets past the lookup
# (for embeddings, to the embedder itself; for the others, to the engine).
CASES += [
    pytest.param(
        "GET /v1/models/{model}", GenerationMode.POSITIVE, {"model": "auto"}, None, id="GET /v1/models/auto"
    ),
    *[
        pytest.param(
            label,
            mode,
            NO_PATH,
            model,
            id=f"{label} {'valid' if mode is GenerationMode.POSITIVE else 'invalid'} model={model}",
        )
        for label, model in [
            ("POST /v1/embeddings", EMBEDDER),
            ("POST /v1/completions", "auto"),
            ("POST /v1/responses", "auto"),
        ]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ],
]


def engine_answer(body: dict[str, Any]) -> Reply:
    """What vLLM would answer a chat request the gateway let through."""
    if body.get("stream"):
        return StreamReply(stream_chunks("Hello", " there"))
    return JSONReply(completion())


def completion_answer(body: dict[str, Any]) -> Reply:
    """What vLLM would answer a legacy completion request the gateway let through."""
    if body.get("stream"):
        return StreamReply(stream_events("Hello", " there"))
    return JSONReply(text_completion())


class FuzzEngine(FakeEngine):
    """The fake vLLM answering every chat request and every ``/v1/completions`` request."""

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST" or request.path != COMPLETIONS_PATH:
            return await super()._serve(request)
        body = json.loads(await request.read())
        self.requests.append(RecordedRequest(request.method, request.path, body, request.headers))
        return await self._reply(request, completion_answer(body))


class Gateway:
    """The app (lifespan entered) and the fake engine, in an event loop of their own that
    runs while a request is in flight."""

    def __init__(self, runner: asyncio.Runner, data_dir: Path) -> None:
        self.runner = runner
        self.data_dir = data_dir
        self.engine = FuzzEngine(default_reply=engine_answer)
        self._stack = contextlib.AsyncExitStack()
        self.client: httpx.AsyncClient

    async def start(self) -> None:
        await self.engine.start()
        self._stack.push_async_callback(self.engine.stop)
        settings = make_settings(data_dir=self.data_dir, admin_token=ADMIN_TOKEN)
        self.app = build_app(settings.model_copy(update={"engine_url": self.engine.url}))
        await self._stack.enter_async_context(self.app.router.lifespan_context(self.app))
        await asyncio.wait_for(self.app.state.adapters.wait_reconciled(), timeout=5)
        transport = httpx.ASGITransport(app=self.app)
        self.client = await self._stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url=GATEWAY_URL, timeout=30)
        )

    async def stop(self) -> None:
        await self._stack.aclose()

    def send(self, case: Case) -> httpx.Response:
        kwargs = case.as_transport_kwargs(base_url=GATEWAY_URL, headers=_auth(case))
        return self.runner.run(self._send(kwargs))

    async def _send(self, kwargs: dict[str, Any]) -> httpx.Response:
        # schemathesis prepares a `requests` call: raw bytes go as httpx's `content`.
        data = kwargs.pop("data", None)
        if isinstance(data, str | bytes):
            kwargs["content"] = data
        elif data is not None:
            kwargs["data"] = data
        cookies = kwargs.pop("cookies", None)
        self.client.cookies.clear()
        if cookies:
            self.client.cookies.update(cookies)
        return await self.client.request(**kwargs)


def _with_model(case: Case, model: str) -> Case:
    """``case`` with ``model`` in its body, where the body is an object (a negative case may
    have broken the body itself, which stays as it is)."""
    if isinstance(case.body, dict):
        case.body = {**case.body, "model": model}
    return case


def _auth(case: Case) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"} if case.operation.path.startswith("/admin") else {}


def openai_envelope(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx (and 5xx) body is exactly ``{"error": {"message", "type", "param", "code"}}``."""
    if response.status_code >= 400:
        try:
            body = json.loads(response.content)
        except ValueError as exc:
            raise AssertionError(
                f"{response.status_code} body is not JSON: {response.content[:200]!r}"
            ) from exc
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        param = error.get("param") if isinstance(error, dict) else None
        assert_envelope(body, param=param, code=code, status=response.status_code, error_type=_type(error))
    return None


def _type(error: Any) -> str | None:
    # 401s are authentication_error, a 429 is OpenAI's "requests"; the rest the default.
    return (
        error.get("type")
        if isinstance(error, dict) and error.get("type") in {"authentication_error", "requests"}
        else None
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with asyncio.Runner() as runner:
        gateway = Gateway(runner, tmp_path_factory.mktemp("fuzz"))
        runner.run(gateway.start())
        try:
            yield gateway
        finally:
            runner.run(gateway.stop())


@pytest.fixture(scope="module")
def schema(gateway: Gateway) -> Any:
    async def without_lifespan(scope: Any, receive: Any, send: Any) -> None:
        # schemathesis's ASGI client would start the app's lifespan once more, in a thread of its
        # own, replacing the app's engine session with one bound to that thread's loop; refusing
        # the lifespan scope at once is how an app says it has none.
        if scope["type"] == "lifespan":
            raise RuntimeError("the lifespan is run by the gateway fixture")
        await gateway.app(scope, receive, send)

    return schemathesis.openapi.from_asgi("/openapi.json", without_lifespan)


def test_every_operation_is_fuzzed(schema: Any) -> None:
    assert sorted(result.ok().label for result in schema.get_all_operations()) == sorted(
        WITH_BODY + WITHOUT_BODY
    )


@pytest.mark.parametrize(("label", "mode", "path_parameters", "model"), CASES)
def test_no_input_gets_a_5xx_or_a_bare_error(
    gateway: Gateway,
    schema: Any,
    label: str,
    mode: GenerationMode,
    path_parameters: dict[str, str],
    model: str | None,
) -> None:
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters or None)
    if model is not None:
        name = gateway.app.state.knowledge.embedder.name if model == EMBEDDER else model
        strategy = strategy.map(lambda case: _with_model(case, name))

    # too_slow: a chat example calls the router's embedder and the fake engine over a socket;
    # filter_too_much: negative generation of a schema with few fields rejects many drafts.
    @hypothesis_settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=strategy)
    def check(case: Case) -> None:
        response = gateway.send(case)
        case.validate_response(response, checks=[not_a_server_error, openai_envelope])

    check()
