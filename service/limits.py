"""Bounds on a chat request that depend on configuration; each failure names its ``param``."""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import InvalidRequestError
from service.protocol import ChatCompletionRequest, UserMessage
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


def _fail(param: str, message: str) -> None:
    raise InvalidRequestError(message, param=param)
