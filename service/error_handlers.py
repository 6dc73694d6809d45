"""Every error leaves the gateway in OpenAI's envelope, whoever raised it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from service.errors import APIError, InvalidRequestError
from service.metrics import Metrics
from service.middleware import REQUEST_ID

logger = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def respond(error: APIError) -> JSONResponse:
        metrics.count_error(error.error_type, error.code)
        return JSONResponse(error.envelope(), status_code=error.status_code, headers=error.headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        response = respond(APIError("The server had an error while processing your request."))
        # Starlette answers these outside every middleware, so the request id is added here.
        request_id = getattr(request.state, REQUEST_ID, None)
        if request_id is not None:
            response.headers["x-request-id"] = request_id
        return response

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        if exc.status_code >= 500 and _is_news(request, exc):
            cause = f" (from {type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
            logger.warning(
                "%s %s -> %d %s: %s%s",
                request.method,
                request.url.path,
                exc.status_code,
                exc.code or exc.error_type,
                exc.message,
                cause,
            )
        return respond(exc)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        message = str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
        if exc.status_code == 405:
            # Starlette names only the first route on the path; GET and POST of one path are
            # two routes here (and HEAD /health its own), so every one is asked.
            headers["Allow"] = ", ".join(sorted(_allowed_methods(request))) or headers.get("Allow", "")
        return respond(
            APIError(
                message,
                headers=headers,
                status_code=exc.status_code,
                error_type="invalid_request_error" if exc.status_code < 500 else "server_error",
            )
        )

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
        return respond(InvalidRequestError(message, param=param))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


def _is_news(request: Request, error: APIError) -> bool:
    """A server-side failure the operator has not been told of: each one is logged with its
    cause, but not /ready's 503 (probes ask every few seconds while the engine starts, and the
    launcher logs why) nor the drain's (the server logs once that it drains)."""
    return request.url.path != "/ready" and error.code != "shutting_down"


def _allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return methods
