"""The Responses API over chat completions: a request becomes a chat request run through
:class:`service.chat.ChatService` (so routing, retrieval, redaction, limits and metrics all
apply), and the chat result becomes a ``Response`` (or, streamed, Responses events).

The gateway keeps no state: a conversation is sent whole in ``input`` every time."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from service.chat import ChatService
from service.errors import InvalidRequestError
from service.parsing import invalid_request
from service.protocol import ChatCompletionRequest
from service.responses_output import ResponseEvents, response_shell, to_response
from service.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    MessageItem,
    ResponseObject,
    ResponsesRequest,
    TextContent,
)


class ResponsesService:
    def __init__(self, chat: ChatService) -> None:
        self._chat = chat

    async def create(self, request: ResponsesRequest) -> ResponseObject:
        chat_request, params = to_chat_request(request)
        try:
            completion = await self._chat.complete(chat_request)
        except InvalidRequestError as exc:
            raise in_responses_terms(exc, params) from None
        return to_response(request, completion)

    async def stream(self, request: ResponsesRequest) -> ResponseEvents:
        """Open the upstream stream before answering, as chat does: the engine's refusals are
        plain HTTP errors rather than events in a 200 stream."""
        chat_request, params = to_chat_request(request)
        try:
            stream = await self._chat.stream(chat_request)
        except InvalidRequestError as exc:
            raise in_responses_terms(exc, params) from None
        return ResponseEvents(stream, response_shell(request, stream.route))


# ---------------------------------------------------------------------------- request


def to_chat_request(request: ResponsesRequest) -> tuple[ChatCompletionRequest, list[str]]:
    """The chat request, and for each of its messages the Responses parameter it came from
    (to name it in errors found later, by the chat limits or the engine)."""
    if request.previous_response_id is not None:
        raise InvalidRequestError(
            "previous_response_id is not supported: send the whole conversation in input "
            "(the gateway stores no responses).",
            param="previous_response_id",
        )
    messages: list[dict[str, Any]] = []
    params: list[str] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
        params.append("instructions")
    if isinstance(request.input, str):
        items: Sequence[InputItem] = [MessageItem(role="user", content=request.input)]
    else:
        items = request.input
    answerable: set[str] = set()  # the calls of the assistant message just before
    for index, item in enumerate(items):
        param = "input" if isinstance(request.input, str) else f"input[{index}]"
        previous = messages[-1] if messages else None
        if isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            # Consecutive calls, and calls right after the assistant's text, are one turn.
            if previous is not None and previous["role"] == "assistant":
                previous.setdefault("tool_calls", []).append(call)
                answerable.add(item.call_id)
                continue
            messages.append({"role": "assistant", "tool_calls": [call]})
            answerable = {item.call_id}
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in answerable:
                raise InvalidRequestError(
                    f"No function call with call_id '{item.call_id}' comes before this output: a "
                    "function_call_output must follow the function_call items it answers.",
                    param=f"{param}.call_id",
                )
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
        else:
            messages.append({"role": item.role, "content": _chat_content(item.content)})
            answerable = set()
        params.append(param)
    fields: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "max_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        # OpenAI's Responses API takes an empty tool list; chat refuses one.
        "tools": [_chat_tool(tool.model_dump()) for tool in request.tools] if request.tools else None,
        "tool_choice": _chat_tool_choice(request),
        # Meaningless without tools, and OpenAI takes it so; chat refuses it (a tool-less agent
        # of the Agents SDK may send it).
        "parallel_tool_calls": request.parallel_tool_calls if request.tools else None,
        "response_format": _chat_format(request),
        "reasoning_effort": request.reasoning.effort if request.reasoning else None,
        "user": request.user,
        "stream": request.stream,
        # Usage is needed for the Response's own ``usage``, which OpenAI always sends.
        "stream_options": {"include_usage": True} if request.stream else None,
        "rag": request.rag,
    }
    try:
        chat = ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise in_responses_terms(invalid_request(exc), params) from None
    return chat, params


def _text(content: TextContent) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _chat_content(content: TextContent) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": part.text} for part in content]


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {
        key: tool[key] for key in ("name", "description", "parameters", "strict") if tool[key] is not None
    }
    return {"type": "function", "function": function}


def _chat_tool_choice(request: ResponsesRequest) -> str | dict[str, Any] | None:
    choice = request.tool_choice
    if not request.tools and choice in ("auto", "none"):
        return None  # what any tool-less request does anyway; a call that must be made is a 400
    if choice is None or isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.name}}


def _chat_format(request: ResponsesRequest) -> dict[str, Any] | None:
    text_format = request.text.format if request.text else None
    if text_format is None:
        return None
    if text_format.type != "json_schema":
        return {"type": text_format.type}
    spec = text_format.model_dump(by_alias=True, exclude_none=True, exclude={"type"})
    return {"type": "json_schema", "json_schema": spec}


# Chat parameters that have another name in the Responses API.
_RENAMED = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
}
_MESSAGE_PARAM = re.compile(r"^messages\[(\d+)\](.*)$")


def in_responses_terms(error: InvalidRequestError, params: Sequence[str]) -> InvalidRequestError:
    """A chat request's 400 with ``param`` named as the Responses request names it."""
    param = error.param
    if param is None:
        return error
    found = _MESSAGE_PARAM.match(param)
    if found and int(found.group(1)) < len(params):
        field = found.group(2)
        renamed = params[int(found.group(1))] + (".call_id" if field == ".tool_call_id" else field)
    else:
        head = param.split(".", 1)[0]
        renamed = _RENAMED.get(head, param)
    if renamed == param:
        return error
    return InvalidRequestError(error.message.replace(param, renamed), param=renamed, code=error.code)
