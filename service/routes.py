"""The public HTTP surface. Routes are thin: parse, call one service method, answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from service.adapter_registry import AdapterRegistry
from service.admission import Admission
from service.auth import require_api_key
from service.catalog import ModelCatalog
from service.chat import ChatService, ChatStream
from service.errors import APIError, EngineUnavailableError, NotFoundError
from service.metrics import Metrics
from service.openapi import inline_schema, json_body
from service.parsing import parse_json_body
from service.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ModelCard, ModelList
from service.settings import Settings

router = APIRouter()


# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a thread pool,
# which cost about a millisecond a request here.
async def _chat(request: Request) -> ChatService:
    chat: ChatService = request.app.state.chat
    return chat


async def _catalog(request: Request) -> ModelCatalog:
    catalog: ModelCatalog = request.app.state.catalog
    return catalog


ChatDep = Annotated[ChatService, Depends(_chat)]
CatalogDep = Annotated[ModelCatalog, Depends(_catalog)]

_JSON = "application/json"
ROUTE_HEADER = "X-Route"


class ChatEventStream(EventSourceResponse):
    """SSE over an opened engine stream. The upstream connection is closed however the
    response ends (finished, failed, or the client went away), which makes vLLM abort."""

    def __init__(self, stream: ChatStream) -> None:
        super().__init__(stream.events(), sep="\n", headers={ROUTE_HEADER: stream.route.header()})
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.aclose()


@router.post(
    "/v1/chat/completions",
    dependencies=[Depends(require_api_key)],
    responses={
        200: {
            "description": "A completion, or with `stream: true` an SSE stream of chunks.",
            "content": {
                _JSON: {"schema": inline_schema(ChatCompletion, "serialization")},
                "text/event-stream": {"schema": inline_schema(ChatCompletionChunk, "serialization")},
            },
        }
    },
    # The body is parsed by hand (strictly, errors in OpenAI's words), so it is described here.
    openapi_extra=json_body(ChatCompletionRequest),
)
async def create_chat_completion(request: Request, chat: ChatDep) -> Response:
    body = await parse_json_body(request, ChatCompletionRequest)
    if body.stream:
        return ChatEventStream(await chat.stream(body))
    completion = await chat.complete(body)
    headers = {ROUTE_HEADER: completion.route.header()} if completion.route else None
    return Response(completion.model_dump_json(), media_type=_JSON, headers=headers)


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_api_key)])
async def list_models(request: Request, catalog: CatalogDep) -> Response:
    adapters: AdapterRegistry = request.app.state.adapters
    models = await catalog.list(adapters.servable())
    return Response(models.model_dump_json(), media_type=_JSON)


@router.get("/v1/models/{model}", response_model=ModelCard, dependencies=[Depends(require_api_key)])
async def retrieve_model(model: str, request: Request, catalog: CatalogDep) -> Response:
    """One card of ``GET /v1/models``, the same one (``auto`` included); 404 for any other id."""
    adapters: AdapterRegistry = request.app.state.adapters
    models = await catalog.list(adapters.servable())
    card = next((card for card in models.data if card.id == model), None)
    if card is None:
        raise NotFoundError(f"The model '{model}' does not exist.", param="model", code="model_not_found")
    return Response(card.model_dump_json(), media_type=_JSON)


# HEAD is the same operation: left out of the schema, where it would repeat GET's operation id.
@router.head("/health", include_in_schema=False)
@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive (it says nothing about the engine: see /ready)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request, catalog: CatalogDep) -> JSONResponse:
    """The engine answers, serves its model and has every registered adapter loaded, and the
    gateway is not draining: 200, else 503 with Retry-After."""
    settings: Settings = request.app.state.settings
    admission: Admission = request.app.state.admission
    if admission.draining:
        raise admission.shutting_down()
    try:
        cards = await catalog.refresh()
    except APIError as exc:
        raise EngineUnavailableError(
            f"The model engine is not ready: {exc.message}", retry_after_s=settings.retry_after_s
        ) from None
    if catalog.base_model is None:
        raise EngineUnavailableError(
            "The model engine serves no model yet.", retry_after_s=settings.retry_after_s
        )
    adapters: AdapterRegistry = request.app.state.adapters
    if not adapters.reconciled:
        raise EngineUnavailableError(
            "The engine is loading the registered adapters.", retry_after_s=settings.retry_after_s
        )
    return JSONResponse({"status": "ready", "model": catalog.base_model, "models": len(cards)})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.exposition(), media_type="text/plain; version=0.0.4")
