"""The admin API of the router: its classifier and configuration, the decision a chat request
would get (without generating), and fitting the classifier on labelled prompts. Mounted with
the other admin routes, behind the same token."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.auth import require_admin
from service.chat import ChatService
from service.errors import InvalidRequestError
from service.openapi import json_body
from service.parsing import parse_json_body
from service.protocol import ChatCompletionRequest
from service.route_model import BASE
from service.route_training import NothingToFitError
from service.router import Router

router = APIRouter(prefix="/admin/router", dependencies=[Depends(require_admin)], tags=["admin"])

MAX_FIT_ROWS = 50_000
Text = Annotated[str, StringConstraints(min_length=1, max_length=2000, pattern=r"\S")]


class LabelledPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    text: Text
    label: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    """A registered adapter's name, or ``base``."""


class FitRequest(BaseModel):
    """Labelled prompts that replace the stored ones; ``dry_run``: fit and report, store nothing."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    examples: Annotated[list[LabelledPrompt], Field(max_length=MAX_FIT_ROWS)]
    dry_run: bool = False


def _router(request: Request) -> Router:
    routing: Router = request.app.state.router
    return routing


@router.get("")
async def show_router(request: Request) -> dict[str, Any]:
    """The classifier in force (version, data counts, validation figures) and each adapter."""
    routing = _router(request)
    await routing.sync()
    return {"object": "router", **routing.configuration()}


@router.post("/explain", openapi_extra=json_body(ChatCompletionRequest))
async def explain_route(request: Request) -> dict[str, Any]:
    """``{"route": ...}`` for a chat request body: the object its response would carry."""
    body = await parse_json_body(request, ChatCompletionRequest)
    chat: ChatService = request.app.state.chat
    route = await chat.explain(body)
    return {"route": route.model_dump(mode="json")}


@router.post("/fit", openapi_extra=json_body(FitRequest))
async def fit_router(request: Request) -> dict[str, Any]:
    """Fit the classifier with these labelled prompts (plus the adapters' own and general chat),
    store it as a new version and put it in force; the figures of the fit."""
    body = await parse_json_body(request, FitRequest)
    routing = _router(request)
    manifests = await routing.sync()
    for i, row in enumerate(body.examples):
        if row.label != BASE and row.label not in manifests:
            raise InvalidRequestError(
                f"Label '{row.label}' names no registered adapter (use an adapter's name or 'base').",
                param=f"examples[{i}].label",
                code="unknown_label",
            )
    try:
        active = await routing.learner.fit(
            lambda: list(manifests.values()),
            [(row.text, row.label) for row in body.examples],
            dry_run=body.dry_run,
        )
    except NothingToFitError:
        raise InvalidRequestError(
            "No adapter has example prompts, a description or labelled prompts to learn from.",
            param="examples",
            code="nothing_to_fit",
        ) from None
    meta = active.meta
    return {
        "object": "router.fit",
        "stored": not body.dry_run,
        "version": active.version,
        "classes": list(active.model.classes),
        "abstain_threshold": active.model.abstain,
        "temperature": active.model.temperature,
        "data": meta.get("data"),
        "fit_rows": meta.get("fit_rows"),
        "validation": meta.get("validation"),
        "fit_seconds": meta.get("fit_seconds"),
    }
