"""The stream timer: time to first token and between tokens, counted only on chunks that carry
content, from the request's arrival when inside one."""

from __future__ import annotations

import time

import pytest

from service import request_context
from service.metrics import Metrics
from service.protocol import ChatCompletionChunk
from service.stream_timing import StreamTimer, has_content
from tests.vllm_bodies import chunk, usage_chunk

MODEL = "SmolLM2-135M-Instruct"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sample(metrics: Metrics, name: str, adapter: str = "", model: str = MODEL) -> float:
    value = metrics.registry.get_sample_value(name, {"model": model, "adapter": adapter})
    return value or 0.0


def test_first_content_is_the_first_token_and_later_ones_are_gaps() -> None:
    metrics, clock = Metrics(), Clock()
    timer = StreamTimer(metrics, MODEL, None, clock=clock)
    clock.now += 0.3
    timer.chunk(False)  # the role-only first chunk: not a token
    clock.now += 0.2
    timer.chunk(True)
    for gap in (0.01, 0.04):
        clock.now += gap
        timer.chunk(True)
    clock.now += 5
    timer.chunk(False)  # the finish and usage chunks end nothing and start nothing

    assert sample(metrics, "hybrid_time_to_first_token_seconds_count") == 1
    assert sample(metrics, "hybrid_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert sample(metrics, "hybrid_inter_token_seconds_count") == 2
    assert sample(metrics, "hybrid_inter_token_seconds_sum") == pytest.approx(0.05)


def test_a_gap_spans_the_chunks_without_content_between() -> None:
    metrics, clock = Metrics(), Clock()
    timer = StreamTimer(metrics, MODEL, None, clock=clock)
    timer.chunk(True)
    clock.now += 0.1
    timer.chunk(False)
    clock.now += 0.1
    timer.chunk(True)
    assert sample(metrics, "hybrid_inter_token_seconds_sum") == pytest.approx(0.2)


def test_a_stream_without_content_observes_nothing() -> None:
    metrics = Metrics()
    timer = StreamTimer(metrics, MODEL, None, clock=Clock())
    timer.chunk(False)
    assert sample(metrics, "hybrid_time_to_first_token_seconds_count") == 0
    assert sample(metrics, "hybrid_inter_token_seconds_count") == 0


def test_labels_are_the_model_and_the_adapter() -> None:
    metrics = Metrics()
    StreamTimer(metrics, "banking", "banking", clock=Clock()).chunk(True)
    assert (
        sample(metrics, "hybrid_time_to_first_token_seconds_count", adapter="banking", model="banking") == 1
    )
    assert sample(metrics, "hybrid_time_to_first_token_seconds_count") == 0


def test_inside_a_request_the_first_token_is_timed_from_its_arrival() -> None:
    metrics = Metrics()
    arrived = time.perf_counter() - 2.0  # routing and retrieval took that long, say
    token = request_context.bind(request_context.RequestScope("req-1", arrived, metrics))
    try:
        timer = StreamTimer(metrics, MODEL, None)
    finally:
        request_context.unbind(token)
    timer.chunk(True)
    assert sample(metrics, "hybrid_time_to_first_token_seconds_sum") >= 2.0


def test_outside_a_request_the_first_token_is_timed_from_the_timer() -> None:
    metrics = Metrics()
    timer = StreamTimer(metrics, MODEL, None)
    timer.chunk(True)
    assert 0 <= sample(metrics, "hybrid_time_to_first_token_seconds_sum") < 1.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (chunk("", role="assistant"), False),
        (chunk("Hi"), True),
        (chunk("", finish_reason="stop"), False),
        (usage_chunk(completion_tokens=3), False),
    ],
    ids=["role", "content", "finish", "usage"],
)
def test_has_content(body: dict[str, object], expected: bool) -> None:
    assert has_content(ChatCompletionChunk.model_validate(body)) is expected
