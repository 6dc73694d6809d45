"""Bounds on a chat request that depend on configuration; each failure names its ``param``."""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import InvalidRequestError
from service.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    NamedToolChoice,
    ToolMessage,
    UserMessage,
)
from service.settings import Settings

MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class RequestLimits:
    max_messages: int
    max_n: int
    max_tokens_cap: int
    max_top_logprobs: int
    max_stop: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            max_messages=settings.max_messages,
            max_n=settings.max_n,
            max_tokens_cap=settings.max_tokens_cap,
            max_top_logprobs=settings.max_top_logprobs,
            max_stop=settings.max_stop,
        )

    def check(self, request: ChatCompletionRequest) -> None:
        """Raise :class:`InvalidRequestError` for the first bound the request breaks."""
        if len(request.messages) > self.max_messages:
            _fail(
                "messages", f"at most {self.max_messages} messages are accepted, got {len(request.messages)}"
            )
        if not any(isinstance(m, UserMessage) for m in request.messages):
            _fail("messages", "messages must contain at least one message with role 'user'")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(request, name)
            if value is not None and value > self.max_tokens_cap:
                _fail(name, f"{name} must be at most {self.max_tokens_cap}, got {value}")
        if request.n is not None and request.n > self.max_n:
            _fail("n", f"n must be at most {self.max_n}, got {request.n}")
        if request.top_logprobs is not None:
            if not request.logprobs:
                _fail("top_logprobs", "top_logprobs requires logprobs to be true")
            if request.top_logprobs > self.max_top_logprobs:
                _fail("top_logprobs", f"top_logprobs must be at most {self.max_top_logprobs}")
        stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        if len(stops) > self.max_stop:
            _fail("stop", f"at most {self.max_stop} stop sequences are accepted, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            _fail("stop", f"each stop sequence must be 1 to {MAX_STOP_CHARS} characters")
        if request.stream_options is not None and not request.stream:
            _fail("stream_options", "stream_options is only allowed when stream is true")
        check_tools(request)


def check_tools(request: ChatCompletionRequest) -> None:
    """What OpenAI refuses of tools: a choice or parallelism without tools, a named choice
    that is not among them, a function defined twice, a tool result that answers no call."""
    names = [tool.function.name for tool in request.tools or ()]
    if not names:
        for param in ("tool_choice", "parallel_tool_calls"):
            if getattr(request, param) is not None:
                _fail(param, f"{param} is only allowed when 'tools' are specified")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        _fail("tools", f"each function must be defined once; defined more than once: {', '.join(duplicates)}")
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        _fail(
            "tool_choice", f"tool_choice names the function '{choice.function.name}', which is not in tools"
        )
    calls: set[str] = set()
    for index, message in enumerate(request.messages):
        if isinstance(message, AssistantMessage):
            calls = {call.id for call in message.tool_calls or ()}
        elif not isinstance(message, ToolMessage):
            calls = set()
        elif message.tool_call_id not in calls:
            _fail(
                f"messages[{index}].tool_call_id",
                "a message with role 'tool' must answer a tool call of the assistant message before it",
            )


def _fail(param: str, message: str) -> None:
    raise InvalidRequestError(message, param=param)
