"""Request bodies: JSON only, parsed straight into the wire types; every failure is a 400 (or
415) that names the parameter at fault."""

from __future__ import annotations

import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import Request

from service.errors import InvalidRequestError, UnsupportedMediaTypeError

M = TypeVar("M", bound=BaseModel)

# Segments pydantic adds to an error location to say which union member failed: a
# discriminator tag (a role, a format type) or a member type ("str", "list[TextPart]").
_UNION_LABEL = re.compile(r"^(str|int|float|bool|\w+\[.*\])$")
_ROLE_TAGS = frozenset({"system", "developer", "user", "assistant", "tool"})
_FORMAT_TAGS = frozenset({"text", "json_object", "json_schema"})


async def parse_json_body(request: Request, model: type[M]) -> M:
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        raise UnsupportedMediaTypeError(
            f"Unsupported Content-Type '{content_type[:100]}': send the body as application/json."
        )
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc) from None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def invalid_request(exc: ValidationError) -> InvalidRequestError:
    """The first validation error, in OpenAI's words where OpenAI has some."""
    error = exc.errors(include_url=False)[0]
    param = error_param(error)
    kind = error["type"]
    if kind == "json_invalid":
        return InvalidRequestError(
            f"We could not parse the JSON body of your request: it is not valid JSON ({error['msg']})."
        )
    if param is None and kind in {"model_type", "model_attributes_type", "dict_type"}:
        return InvalidRequestError("The request body must be a JSON object.")
    if kind == "extra_forbidden":
        return InvalidRequestError(f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    return InvalidRequestError(f"Invalid value for '{param}': {error['msg']}.", param=param)


def error_param(error: ErrorDetails) -> str | None:
    """``('messages', 0, 'user', 'content', 'str')`` → ``'messages[0].content'``."""
    text = ""
    previous: object = None
    for segment in error["loc"]:
        if isinstance(segment, int):
            text += f"[{segment}]"
        elif not (_UNION_LABEL.match(segment) or _is_tag(segment, previous)):
            text += f".{segment}" if text else segment
        previous = segment
    return text or None


def _is_tag(segment: str, previous: object) -> bool:
    # A role right after a message's index, a format type right after response_format: any
    # other "text" is a field (documents[0].text).
    if segment in _ROLE_TAGS:
        return isinstance(previous, int)
    return segment in _FORMAT_TAGS and previous == "response_format"
