"""The admin API of the router: its configuration, and the decision a chat request would get
(without generating). Mounted with the other admin routes, behind the same token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from service.auth import require_admin
from service.chat import ChatService
from service.openapi import json_body
from service.parsing import parse_json_body
from service.protocol import ChatCompletionRequest
from service.router import Router

router = APIRouter(prefix="/admin/router", dependencies=[Depends(require_admin)], tags=["admin"])


@router.get("")
async def show_router(request: Request) -> dict[str, Any]:
    """Thresholds in force, and what the router knows of each adapter."""
    routing: Router = request.app.state.router
    return {"object": "router", **routing.configuration(await routing.domain_signal())}


@router.post("/explain", openapi_extra=json_body(ChatCompletionRequest))
async def explain_route(request: Request) -> dict[str, Any]:
    """``{"route": ...}`` for a chat request body: the object its response would carry."""
    body = await parse_json_body(request, ChatCompletionRequest)
    chat: ChatService = request.app.state.chat
    route = await chat.explain(body)
    return {"route": route.model_dump(mode="json")}
