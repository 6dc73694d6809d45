"""The unmodified OpenAI Python SDK against the gateway over a real vLLM engine; every body
and chunk validated against OpenAI's published schemas."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.harness import MAX_MODEL_LEN, RunningService
from tests.openai_schema import assert_conforms

pytestmark = pytest.mark.e2e

FRANCE: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_answers_through_the_sdk(service: RunningService) -> None:
    raw = service.client().chat.completions.with_raw_response.create(
        model="auto",
        messages=FRANCE,
        temperature=0,
        max_tokens=24,
    )
    assert_conforms("CreateChatCompletionResponse", raw.http_response.json())
    completion = raw.parse()
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0


def test_stream_reassembles_to_the_plain_answer(service: RunningService) -> None:
    client = service.client()
    plain = client.chat.completions.create(model="auto", messages=FRANCE, temperature=0, max_tokens=32)
    stream = client.chat.completions.create(
        model="auto",
        messages=FRANCE,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        pieces.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(pieces) == plain.choices[0].message.content
    assert usage is not None
    assert plain.usage is not None
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_every_stream_chunk_conforms(service: RunningService) -> None:
    body = {
        "model": "auto",
        "messages": FRANCE,
        "max_tokens": 12,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    payloads = []
    with httpx.stream("POST", f"{service.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        assert_conforms("CreateChatCompletionStreamResponse", chunk)
    assert {c["index"] for chunk in chunks for c in chunk["choices"]} == {0, 1}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_logprobs_and_n_conform(service: RunningService) -> None:
    raw = service.client().chat.completions.with_raw_response.create(
        model="auto",
        messages=FRANCE,
        max_tokens=8,
        n=2,
        logprobs=True,
        top_logprobs=3,
        seed=7,
    )
    body = raw.http_response.json()
    assert_conforms("CreateChatCompletionResponse", body)
    assert len(body["choices"]) == 2
    assert len(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) >= 3


def test_models_list(service: RunningService) -> None:
    raw = service.client().models.with_raw_response.list()
    assert_conforms("ListModelsResponse", raw.http_response.json())
    cards = raw.http_response.json()["data"]
    # The base first, `auto` last, any adapters registered by other tests between them.
    assert cards[0]["id"] == "SmolLM2-135M-Instruct"
    assert cards[-1]["id"] == "auto"
    assert all(card["parent"] == "SmolLM2-135M-Instruct" for card in cards[1:-1])


def test_the_base_model_id_works_like_auto(service: RunningService) -> None:
    completion = service.client().chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=FRANCE,
        temperature=0,
        max_tokens=24,
    )
    assert completion.model == "SmolLM2-135M-Instruct"
    assert "Paris" in (completion.choices[0].message.content or "")


def test_unknown_model_is_not_found(service: RunningService) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        service.client().chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert caught.value.code == "model_not_found"
    assert_conforms("ErrorResponse", caught.value.response.json())


def test_out_of_range_parameter_is_bad_request(service: RunningService) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        service.client().chat.completions.create(model="auto", messages=FRANCE, temperature=5)
    assert caught.value.param == "temperature"
    assert_conforms("ErrorResponse", caught.value.response.json())


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_the_context_window_is_bad_request(service: RunningService, stream: bool) -> None:
    long_prompt = "word " * (MAX_MODEL_LEN + 200)
    with pytest.raises(openai.BadRequestError) as caught:
        service.client(max_retries=0).chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": long_prompt}],
            max_tokens=16,
            stream=stream,
        )
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length" in caught.value.message


def test_max_tokens_past_the_context_is_bad_request(service: RunningService) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        service.client(max_retries=0).chat.completions.create(
            model="auto", messages=FRANCE, max_tokens=MAX_MODEL_LEN + 1
        )
    assert caught.value.code == "context_length_exceeded"
