"""OpenAI's other generation endpoints: embeddings from the gateway's embedder, and legacy text
completions relayed to the engine. Thin like :mod:`service.routes`: parse, call one service
method, answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from service.auth import require_api_key
from service.completions import CompletionRequest, CompletionService, CompletionStream, TextCompletion
from service.embeddings_api import EmbeddingList, EmbeddingRequest, EmbeddingService
from service.openapi import inline_schema, json_body
from service.parsing import parse_json_body

router = APIRouter()

_JSON = "application/json"


# `async def`, as in service.routes: plain `def` dependencies run in the thread pool.
async def _embeddings(request: Request) -> EmbeddingService:
    embeddings: EmbeddingService = request.app.state.embeddings
    return embeddings


async def _completions(request: Request) -> CompletionService:
    completions: CompletionService = request.app.state.completions
    return completions


EmbeddingsDep = Annotated[EmbeddingService, Depends(_embeddings)]
CompletionsDep = Annotated[CompletionService, Depends(_completions)]


class CompletionEventStream(EventSourceResponse):
    """SSE over an opened engine stream, closed however the response ends (which makes vLLM
    abort a generation whose client went away)."""

    def __init__(self, stream: CompletionStream) -> None:
        super().__init__(stream.events(), sep="\n")
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.aclose()


@router.post(
    "/v1/embeddings",
    dependencies=[Depends(require_api_key)],
    responses={200: {"content": {_JSON: {"schema": inline_schema(EmbeddingList, "serialization")}}}},
    # The body is parsed by hand (strictly, errors in OpenAI's words), so it is described here.
    openapi_extra=json_body(EmbeddingRequest),
)
async def create_embeddings(request: Request, embeddings: EmbeddingsDep) -> Response:
    body = await parse_json_body(request, EmbeddingRequest)
    result = await embeddings.create(body)
    return Response(result.model_dump_json(), media_type=_JSON)


@router.post(
    "/v1/completions",
    dependencies=[Depends(require_api_key)],
    responses={
        200: {
            "description": "A completion, or with `stream: true` an SSE stream of completion chunks.",
            "content": {
                _JSON: {"schema": inline_schema(TextCompletion, "serialization")},
                "text/event-stream": {"schema": inline_schema(TextCompletion, "serialization")},
            },
        }
    },
    openapi_extra=json_body(CompletionRequest),
)
async def create_completion(request: Request, completions: CompletionsDep) -> Response:
    body = await parse_json_body(request, CompletionRequest)
    if body.stream:
        return CompletionEventStream(await completions.stream(body))
    completion = await completions.complete(body)
    return Response(completion.model_dump_json(), media_type=_JSON)
