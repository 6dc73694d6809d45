"""Latency of a streamed completion as its client gets it: time to first token and the time
between tokens, into ``hybrid_time_to_first_token_seconds`` and ``hybrid_inter_token_seconds``.

A chunk counts when it carries content (the role-only first chunk of vLLM, a usage-only last
chunk and a finish-only chunk do not). vLLM sends one chunk per engine step, so "between
tokens" is between chunks: a step that yields several tokens (speculative decoding) is one gap;
with ``n`` > 1 the choices' chunks interleave and each gap is between any two of them.

The first token is timed from the request's arrival at the gateway (routing, retrieval and the
engine's queue and prefill included: what the client waits for), or from the timer's creation
outside a request. A completion that is not streamed has no time to first token: its client
gets every token at once, in ``hybrid_request_duration_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from service import request_context
from service.metrics import Metrics
from service.protocol import ChatCompletionChunk


def has_content(chunk: ChatCompletionChunk) -> bool:
    """Whether the chunk carries generated tokens: text, reasoning, or a tool call's pieces."""
    return any(
        choice.delta.content or choice.delta.reasoning or choice.delta.tool_calls for choice in chunk.choices
    )


class StreamTimer:
    """Call :meth:`chunk` for each chunk as it goes to the client."""

    def __init__(
        self,
        metrics: Metrics,
        model: str,
        adapter: str | None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._metrics = metrics
        self._model = model
        self._adapter = adapter
        self._clock = clock
        started = request_context.started()
        # The request's arrival is on perf_counter's scale; a test's clock has its own.
        self._started = started if started is not None and clock is time.perf_counter else clock()
        self._last: float | None = None

    def chunk(self, has_content: bool) -> None:
        if not has_content:
            return
        now = self._clock()
        if self._last is None:
            self._metrics.observe_first_token(self._model, self._adapter, now - self._started)
        else:
            self._metrics.observe_inter_token(self._model, self._adapter, now - self._last)
        self._last = now
