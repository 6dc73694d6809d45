"""What a chat request becomes on its way to the engine, and what the engine's answer becomes on
its way back: allow-listed fields only, vLLM's extras stripped, OpenAI's schemas met, and a
stream that fails part-way still ends with one error event and ``[DONE]``."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from service.engine import VLLMEngine, engine_session
from service.settings import Settings
from tests.api.conftest import (
    CHAT,
    USER,
    assert_envelope,
    assert_error,
    chat_body,
    make_settings,
    sse_data,
    sse_json,
)
from tests.fakes import Drop, FakeEngine, JSONReply, Stall
from tests.openai_schema import assert_conforms
from tests.vllm_bodies import BASE_MODEL, chunk, completion, stream_chunks, usage_chunk

DONE = "[DONE]"

# Every field the gateway accepts, with a value that passes its limits.
FULL_REQUEST: dict[str, Any] = {
    "model": "auto",
    "messages": [
        {"role": "developer", "content": "Answer in French."},
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}], "name": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]},
        {"role": "assistant", "content": "Bonjour.", "name": "bot"},
        {"role": "user", "content": "Again?", "name": "ann"},
    ],
    "max_completion_tokens": 64,
    "temperature": 0.7,
    "top_p": 0.9,
    "n": 2,
    "stop": ["\n\n", "END"],
    "seed": -7,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logprobs": True,
    "top_logprobs": 3,
    "response_format": {"type": "json_object"},
    "user": "user-42",
}


# ---------------------------------------------------------------------------- the engine's view


async def test_only_allow_listed_fields_reach_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_completion()
    response = await client.post(CHAT, json=FULL_REQUEST)
    assert response.status_code == 200, response.text
    sent = engine.last_chat_body
    assert sent == {
        "model": BASE_MODEL,
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}], "name": "rules"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
            },
            {"role": "assistant", "content": "Bonjour.", "name": "bot"},
            {"role": "user", "content": "Again?", "name": "ann"},
        ],
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "n": 2,
        "stop": ["\n\n", "END"],
        "seed": -7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logprobs": True,
        "top_logprobs": 3,
        "response_format": {"type": "json_object"},
        "user": "user-42",
        "stream": False,
    }


async def test_a_minimal_request_sends_no_unset_fields(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_completion()
    await client.post(CHAT, json={"messages": [USER]})
    assert engine.last_chat_body == {"model": BASE_MODEL, "messages": [USER], "stream": False}


@pytest.mark.parametrize(
    ("fields", "budget"),
    [
        ({"max_completion_tokens": 32}, 32),
        ({"max_tokens": 16}, 16),
        ({"max_tokens": 16, "max_completion_tokens": 32}, 32),
    ],
)
async def test_token_budget_is_sent_as_max_tokens(
    client: httpx.AsyncClient, engine: FakeEngine, fields: dict[str, Any], budget: int
) -> None:
    engine.enqueue_completion()
    await client.post(CHAT, json=chat_body(**fields))
    sent = engine.last_chat_body
    assert sent["max_tokens"] == budget
    assert "max_completion_tokens" not in sent


async def test_developer_message_is_sent_as_system(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_completion()
    await client.post(CHAT, json=chat_body(messages=[{"role": "developer", "content": "Terse."}, USER]))
    assert [m["role"] for m in engine.last_chat_body["messages"]] == ["system", "user"]


async def test_json_schema_response_format_keeps_the_schema_verbatim(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": ["string", "null"], "default": None}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "reply", "schema": schema, "strict": True},
    }
    engine.enqueue_completion('{"answer": null}')
    response = await client.post(CHAT, json=chat_body(response_format=response_format))
    assert response.status_code == 200, response.text
    assert engine.last_chat_body["response_format"] == response_format


async def test_stream_always_asks_the_engine_for_usage(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_stream(stream_chunks("Hi"))
    engine.enqueue_stream(stream_chunks("Hi"))
    await client.post(CHAT, json=chat_body(stream=True))
    await client.post(CHAT, json=chat_body(stream=True, stream_options={"include_usage": False}))
    for request in engine.chat_requests:
        assert request.body["stream"] is True
        assert request.body["stream_options"] == {"include_usage": True}


class TestEngineKey:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(engine_api_key="engine-secret")

    async def test_engine_gets_its_own_key_never_the_clients(
        self, client: httpx.AsyncClient, engine: FakeEngine
    ) -> None:
        engine.enqueue_completion()
        engine.enqueue_stream(stream_chunks("Hi"))
        headers = {"authorization": "Bearer client-key"}
        await client.post(CHAT, json=chat_body(), headers=headers)
        await client.post(CHAT, json=chat_body(stream=True), headers=headers)
        assert [r.path for r in engine.requests] == [CHAT, CHAT]
        assert {r.headers["authorization"] for r in engine.requests} == {"Bearer engine-secret"}


# ---------------------------------------------------------------------------- completions


async def test_completion_is_normalised_to_openai_schema(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_completion("Bonjour !", prompt_tokens=11, completion_tokens=4)
    response = await client.post(CHAT, json=chat_body())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert_conforms("CreateChatCompletionResponse", body)
    assert body == {
        "id": "chatcmpl-fake0001",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": BASE_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Bonjour !", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
        # the one extension field: how the request was routed
        "route": {
            "adapter": None,
            "rag": {"used": False, "sources": []},
            "scores": {"adapters": {}, "retrieval": None},
            "reason": (
                "base model: no adapter has example prompts; no retrieval: the index has no passage for it"
            ),
        },
    }
    assert response.headers["x-route"] == "adapter=none; rag=off; sources=0"


async def test_vllm_completion_itself_breaks_the_schema() -> None:
    """Guards the test above: the fake's raw body really has what the gateway must strip."""
    with pytest.raises(AssertionError, match="violations"):
        assert_conforms("CreateChatCompletionResponse", completion())


async def test_completion_with_logprobs_and_several_choices_conforms(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    body = completion("A")
    second = json.loads(json.dumps(body["choices"][0]))
    second.update(index=1, finish_reason="length")
    second["message"]["content"] = "B"
    token = {"token": "A", "logprob": -0.25, "bytes": [65]}
    body["choices"][0]["logprobs"] = {"content": [{**token, "top_logprobs": [token]}]}
    body["choices"].append(second)
    engine.enqueue(JSONReply(body))
    response = await client.post(CHAT, json=chat_body(n=2, logprobs=True, top_logprobs=1))
    assert response.status_code == 200, response.text
    out = response.json()
    assert_conforms("CreateChatCompletionResponse", out)
    assert [c["message"]["content"] for c in out["choices"]] == ["A", "B"]
    assert [c["finish_reason"] for c in out["choices"]] == ["stop", "length"]
    assert out["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == [token]


# ---------------------------------------------------------------------------- streams


async def test_stream_chunks_conform_and_end_with_done(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_stream(stream_chunks("Hel", "lo", "!"))
    response = await client.post(CHAT, json=chat_body(stream=True))
    assert response.status_code == 200
    events, last = sse_json(response)
    assert last == DONE
    for event in events:
        assert_conforms("CreateChatCompletionStreamResponse", event)
        assert "token_ids" not in event["choices"][0]
        assert event["model"] == BASE_MODEL
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "Hello!"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, None, None, "stop"]


async def test_usage_chunk_is_dropped_when_not_asked(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_stream(stream_chunks("Hi"))
    response = await client.post(CHAT, json=chat_body(stream=True))
    events, last = sse_json(response)
    assert last == DONE
    assert all(e["choices"] for e in events)
    assert all("usage" not in e for e in events)


async def test_usage_chunk_is_passed_when_asked(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_stream(stream_chunks("Hi", "!"))
    response = await client.post(CHAT, json=chat_body(stream=True, stream_options={"include_usage": True}))
    events, last = sse_json(response)
    assert last == DONE
    *content, final = events
    assert final["choices"] == []
    assert final["usage"] == {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    assert_conforms("CreateChatCompletionStreamResponse", final)
    assert all("usage" not in e for e in content)


async def test_continuous_usage_is_stripped_from_content_chunks_when_not_asked(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    with_usage = {**chunk("Hi"), "usage": usage_chunk()["usage"]}
    engine.enqueue_stream([with_usage, usage_chunk()])
    response = await client.post(CHAT, json=chat_body(stream=True))
    events, last = sse_json(response)
    assert last == DONE
    assert len(events) == 1
    assert "usage" not in events[0]
    assert events[0]["choices"][0]["delta"]["content"] == "Hi"


async def test_abandoning_a_stream_closes_the_engine_connection(engine: FakeEngine) -> None:
    # Closing the connection mid-generation is what makes vLLM abort: returning it to the
    # pool would leave the engine generating for nobody.
    engine.enqueue_stream([chunk("", role="assistant"), chunk("Hi")], hold=True)
    async with engine_session(
        connect_timeout_s=2, read_timeout_s=5, max_connections=4, keepalive_s=4
    ) as session:
        upstream = await VLLMEngine(session, engine.url, retry_after_s=1).open_chat_stream(chat_body())
        first = await anext(aiter(upstream.data()))
        assert json.loads(first)["choices"][0]["delta"]["role"] == "assistant"
        assert not await engine.streams[0].wait_closed(timeout_s=0.2)
        await upstream.aclose()
        assert await engine.streams[0].wait_closed()


async def test_sse_events_use_newline_separators(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_stream(stream_chunks("Hi"))
    response = await client.post(CHAT, json=chat_body(stream=True))
    assert "\r" not in response.text
    assert response.text.endswith("data: [DONE]\n\n")


# ---------------------------------------------------------------------------- stream failures


def _error_then_done(response: httpx.Response, *, code: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The content chunks before the failure, and the one error event; asserts [DONE] ends it."""
    assert response.status_code == 200
    events, last = sse_json(response)
    assert last == DONE
    errors = [e for e in events if "error" in e]
    assert len(errors) == 1, events
    assert events[-1] is errors[0], "the error event must be the last before [DONE]"
    assert_envelope(errors[0], param=None, code=code, status=500)
    return events[:-1], errors[0]["error"]


async def test_engine_dropping_mid_stream_gives_one_error_event_then_done(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_stream(
        [chunk("", role="assistant"), chunk("Hel"), chunk("lo")],
        fail_with=Drop(),
    )
    response = await client.post(CHAT, json=chat_body(stream=True))
    chunks, _ = _error_then_done(response, code="engine_unavailable")
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "Hel", "lo"]
    for c in chunks:
        assert_conforms("CreateChatCompletionStreamResponse", c)
    assert await engine.streams[0].wait_closed()


async def test_engine_silent_mid_stream_gives_timeout_event_then_done(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_stream([chunk("", role="assistant"), chunk("Hi")], fail_with=Stall())
    response = await client.post(CHAT, json=chat_body(stream=True))
    chunks, _ = _error_then_done(response, code="engine_timeout")
    assert len(chunks) == 2


async def test_vllm_error_event_mid_stream_gives_one_error_event_then_done(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    vllm_error = {
        "error": {
            "message": "EngineCore encountered an issue",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
    engine.enqueue_stream([chunk("", role="assistant"), chunk("Hi"), vllm_error])
    response = await client.post(CHAT, json=chat_body(stream=True))
    chunks, error = _error_then_done(response, code="engine_error")
    assert len(chunks) == 2
    assert "EngineCore encountered an issue" in error["message"]


async def test_unreadable_stream_event_gives_one_error_event_then_done(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_stream([chunk("Hi"), "{not json"])
    response = await client.post(CHAT, json=chat_body(stream=True))
    chunks, _ = _error_then_done(response, code="engine_error")
    assert len(chunks) == 1


async def test_failure_before_the_first_chunk_is_still_an_sse_error(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_stream([], fail_with=Drop())
    response = await client.post(CHAT, json=chat_body(stream=True))
    chunks, _ = _error_then_done(response, code="engine_unavailable")
    assert chunks == []


async def test_engine_400_before_the_stream_is_plain_json(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_error(400, "top_k must be -1 or at least 1", param="top_k")
    response = await client.post(CHAT, json=chat_body(stream=True))
    assert_error(response, 400, param="top_k")
    assert engine.streams == []
    assert "data:" not in response.text


async def test_stream_error_event_payloads_are_single_json_lines(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_stream([chunk("a\nb")], fail_with=Drop())
    response = await client.post(CHAT, json=chat_body(stream=True))
    payloads = sse_data(response)
    assert len(payloads) == 3
    assert json.loads(payloads[0])["choices"][0]["delta"]["content"] == "a\nb"
    assert json.loads(payloads[1])["error"]["code"] == "engine_unavailable"
    assert payloads[2] == DONE
