"""The chat result as a Responses API ``Response``: whole (:func:`to_response`) or as the
Responses stream events of a chat stream (:class:`ResponseEvents`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import ServerSentEvent

from service.chat import DONE, ChatStream
from service.protocol import ChatCompletion, ChatCompletionChunk, FinishReason, RouteDecision, Usage
from service.responses_protocol import (
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_shell(request: ResponsesRequest, route: RouteDecision | None = None) -> ResponseObject:
    """The Response before any output: the request's settings echoed, status in progress."""
    text = request.text.model_dump(by_alias=True, exclude_none=True) if request.text else {}
    return ResponseObject(
        id=_new_id("resp"),
        created_at=int(time.time()),
        status="in_progress",
        model=request.model,
        instructions=request.instructions,
        tools=[tool.model_dump() for tool in request.tools or ()],
        tool_choice=_echo_tool_choice(request),
        parallel_tool_calls=request.parallel_tool_calls is not False,
        temperature=request.temperature,
        top_p=request.top_p,
        max_output_tokens=request.max_output_tokens,
        text={"format": {"type": "text"}, **text},
        reasoning=request.reasoning.model_dump() if request.reasoning else None,
        metadata=request.metadata,
        user=request.user,
        route=route,
    )


def _echo_tool_choice(request: ResponsesRequest) -> str | dict[str, Any]:
    choice = request.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else choice.model_dump()


def to_response(request: ResponsesRequest, completion: ChatCompletion) -> ResponseObject:
    choice = completion.choices[0]
    status = _item_status(choice.finish_reason)
    output: list[OutputItem] = []
    if choice.message.content:
        text = OutputText(text=choice.message.content)
        output.append(OutputMessage(id=_new_id("msg"), status=status, content=[text]))
    for call in choice.message.tool_calls or ():
        output.append(
            OutputFunctionCall(
                id=_new_id("fc"),
                status="completed",
                call_id=call.id,
                name=call.function.name,
                arguments=call.function.arguments,
            )
        )
    return finished(response_shell(request, completion.route), output, choice.finish_reason, completion.usage)


def finished(
    shell: ResponseObject, output: list[OutputItem], finish_reason: FinishReason | None, usage: Usage | None
) -> ResponseObject:
    """The shell completed (or incomplete: the answer was cut short) with its output."""
    incomplete = _incomplete(finish_reason)
    return shell.model_copy(
        update={
            "status": "incomplete" if incomplete else "completed",
            "completed_at": None if incomplete else int(time.time()),
            "incomplete_details": incomplete,
            "output": output,
            "usage": _usage(usage),
        }
    )


def _incomplete(finish_reason: FinishReason | None) -> IncompleteDetails | None:
    if finish_reason == "length":
        return IncompleteDetails(reason="max_output_tokens")
    if finish_reason == "content_filter":
        return IncompleteDetails(reason="content_filter")
    return None


def _item_status(finish_reason: FinishReason | None) -> ItemStatus:
    return "incomplete" if _incomplete(finish_reason) else "completed"


def _usage(usage: Usage | None) -> ResponseUsage:
    usage = usage or Usage()
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else None
    reasoning = usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else None
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached or 0),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning or 0),
        total_tokens=usage.total_tokens,
    )


# ---------------------------------------------------------------------------- streaming


class ResponseEvents:
    """Responses stream events over a chat stream: ``response.created``, ``in_progress``, each
    output item added, filled and done, then ``response.completed`` (or ``incomplete``); an
    engine failure mid-stream ends it with ``response.failed``.

    Items are streamed one after another, as vLLM sends them: text, then each call in turn."""

    def __init__(self, stream: ChatStream, shell: ResponseObject) -> None:
        self._stream = stream
        self._shell = shell
        self.route = stream.route
        self._sequence = 0
        self._output: list[OutputItem] = []
        self._open: OutputMessage | OutputFunctionCall | None = None
        self._calls: dict[int, OutputFunctionCall] = {}  # chat tool call index -> its item
        self._finish_reason: FinishReason | None = None
        self._usage: Usage | None = None

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        yield self._event("response.created", response=self._shell)
        yield self._event("response.in_progress", response=self._shell)
        async for data in self._stream.events():
            if data == DONE:
                break
            parsed = json.loads(data)
            if "error" in parsed:  # the chat stream's envelope for an engine failure
                for event in self._close_open(cut_short=True):
                    yield event
                failed = self._shell.model_copy(
                    update={
                        "status": "failed",
                        "error": ResponseError(message=parsed["error"]["message"]),
                        "output": self._output,
                    }
                )
                yield self._event("response.failed", response=failed)
                return
            for event in self._follow(ChatCompletionChunk.model_validate(parsed)):
                yield event
        for event in self._close_open():
            yield event
        final = finished(self._shell, self._output, self._finish_reason, self._usage)
        kind = "response.completed" if final.status == "completed" else "response.incomplete"
        yield self._event(kind, response=final)

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _follow(self, chunk: ChatCompletionChunk) -> list[ServerSentEvent]:
        if chunk.usage is not None:
            self._usage = chunk.usage
        events: list[ServerSentEvent] = []
        for choice in chunk.choices:
            if choice.index != 0:  # one answer: the chat request asks for no more
                continue
            if choice.delta.content:
                events += self._text(choice.delta.content)
            for delta in choice.delta.tool_calls or ():
                call = self._calls.get(delta.index)
                if call is None:
                    events += self._close_open()
                    call = OutputFunctionCall(
                        id=_new_id("fc"),
                        status="in_progress",
                        call_id=delta.id or _new_id("call"),
                        name=(delta.function.name if delta.function else None) or "",
                        arguments="",
                    )
                    self._calls[delta.index] = call
                    events += self._add(call)
                pieces = delta.function.arguments if delta.function else None
                if pieces:
                    call.arguments += pieces
                    events.append(
                        self._event_for(call, "response.function_call_arguments.delta", delta=pieces)
                    )
            if choice.finish_reason is not None:
                self._finish_reason = choice.finish_reason
        return events

    def _text(self, piece: str) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        message = self._open
        if not isinstance(message, OutputMessage):
            events += self._close_open()
            message = OutputMessage(id=_new_id("msg"), status="in_progress", content=[])
            events += self._add(message)
            message.content.append(OutputText(text=""))
            events.append(self._text_event(message, "response.content_part.added", part=OutputText(text="")))
        message.content[0].text += piece
        events.append(self._text_event(message, "response.output_text.delta", delta=piece, logprobs=[]))
        return events

    def _add(self, item: OutputMessage | OutputFunctionCall) -> list[ServerSentEvent]:
        self._open = item
        self._output.append(item)
        return [self._event("response.output_item.added", output_index=len(self._output) - 1, item=item)]

    def _close_open(self, *, cut_short: bool = False) -> list[ServerSentEvent]:
        """The open item's done events; ``cut_short``: the engine failed before it was whole."""
        item, self._open = self._open, None
        if item is None:
            return []
        events: list[ServerSentEvent] = []
        if cut_short:
            item.status = "incomplete"
        else:
            item.status = (
                _item_status(self._finish_reason) if isinstance(item, OutputMessage) else "completed"
            )
        if isinstance(item, OutputMessage):
            part = item.content[0]
            events.append(self._text_event(item, "response.output_text.done", text=part.text, logprobs=[]))
            events.append(self._text_event(item, "response.content_part.done", part=part))
        else:
            done = "response.function_call_arguments.done"
            events.append(self._event_for(item, done, name=item.name, arguments=item.arguments))
        events.append(
            self._event("response.output_item.done", output_index=self._output.index(item), item=item)
        )
        return events

    def _text_event(self, message: OutputMessage, kind: str, **fields: Any) -> ServerSentEvent:
        return self._event_for(message, kind, content_index=0, **fields)

    def _event_for(
        self, item: OutputMessage | OutputFunctionCall, kind: str, **fields: Any
    ) -> ServerSentEvent:
        return self._event(kind, item_id=item.id, output_index=self._output.index(item), **fields)

    def _event(self, kind: str, **fields: Any) -> ServerSentEvent:
        """One SSE event: its type as the SSE event name and in the data, which carries a
        sequence number one higher than the event before."""
        data = {"type": kind, "sequence_number": self._sequence}
        for name, value in fields.items():
            data[name] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        self._sequence += 1
        return ServerSentEvent(data=json.dumps(data), event=kind, sep="\n")
