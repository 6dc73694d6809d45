"""``POST /v1/responses``: OpenAI's Responses API over the gateway's chat completions. Thin like
:mod:`service.routes`: parse, call one service method, answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from service.auth import require_api_key
from service.chat import ChatService
from service.openapi import inline_schema, json_body
from service.parsing import parse_json_body
from service.responses_api import ResponsesService
from service.responses_output import ResponseEvents
from service.responses_protocol import ResponseObject, ResponsesRequest
from service.routes import ROUTE_HEADER

router = APIRouter()

_JSON = "application/json"


# `async def`, as in service.routes: plain `def` dependencies run in the thread pool.
async def _responses(request: Request) -> ResponsesService:
    chat: ChatService = request.app.state.chat
    return ResponsesService(chat)


ResponsesDep = Annotated[ResponsesService, Depends(_responses)]


class ResponseEventStream(EventSourceResponse):
    """SSE over an opened engine stream, closed however the response ends (finished, failed,
    or the client went away), which makes vLLM abort."""

    def __init__(self, events: ResponseEvents) -> None:
        super().__init__(events.events(), sep="\n", headers={ROUTE_HEADER: events.route.header()})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


@router.post(
    "/v1/responses",
    dependencies=[Depends(require_api_key)],
    responses={
        200: {
            "description": "A response, or with `stream: true` an SSE stream of Responses events.",
            "content": {
                _JSON: {"schema": inline_schema(ResponseObject, "serialization")},
                "text/event-stream": {"schema": {"type": "object"}},
            },
        }
    },
    # The body is parsed by hand (strictly, errors in OpenAI's words), so it is described here.
    openapi_extra=json_body(ResponsesRequest),
)
async def create_response(request: Request, responses: ResponsesDep) -> Response:
    body = await parse_json_body(request, ResponsesRequest)
    if body.stream:
        return ResponseEventStream(await responses.stream(body))
    result = await responses.create(body)
    headers = {ROUTE_HEADER: result.route.header()} if result.route else None
    return Response(result.model_dump_json(), media_type=_JSON, headers=headers)
