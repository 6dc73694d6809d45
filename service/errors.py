"""One error envelope for every response: ``{"error": {"message", "type", "param", "code"}}``.

The tree:

    APIError                      any failure that reaches a client
    ├── InvalidRequestError       400  the client's request is wrong (names ``param``)
    ├── AuthenticationError       401  missing or wrong API key or admin token
    ├── NotFoundError             404  unknown model, adapter or route
    ├── ConflictError             409  a name already taken
    ├── PayloadTooLargeError      413  body over the configured limit
    ├── UnsupportedMediaTypeError 415  a body that is not JSON
    ├── HeadersTooLargeError      431  too many headers, or too many header bytes
    ├── EngineUnavailableError    503  engine down or restarting (sends Retry-After)
    ├── EngineTimeoutError        504  engine silent past the read timeout
    └── UpstreamError             502  the engine answered something we cannot use

A client mistake is never a 5xx: OpenAI SDKs retry 5xx, which would repeat the mistake.
"""

from __future__ import annotations

import json
from typing import Any


class APIError(Exception):
    status_code: int = 500
    error_type: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status_code: int | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        if error_type is not None:
            self.error_type = error_type
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.error_type, self.param, self.code)

    def body(self) -> bytes:
        return json.dumps(self.envelope()).encode()


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"


class ConflictError(APIError):
    status_code = 409
    error_type = "invalid_request_error"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"


class UnsupportedMediaTypeError(APIError):
    status_code = 415
    error_type = "invalid_request_error"


class HeadersTooLargeError(APIError):
    status_code = 431
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="request_header_fields_too_large")


class EngineUnavailableError(APIError):
    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, *, retry_after_s: int, code: str = "engine_unavailable") -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class EngineTimeoutError(APIError):
    status_code = 504
    error_type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="engine_timeout")


class UpstreamError(APIError):
    status_code = 502
    error_type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="engine_error")


def error_envelope(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
