"""``POST /v1/responses`` with a fake engine: what reaches the engine as chat, the Response and
its stream events (each validated against OpenAI's published schemas), what is refused, and the
OpenAI Agents SDK's own model class driving the gateway in process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import httpx2
import pytest
from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
from agents.models.openai_responses import OpenAIResponsesModel
from fastapi import FastAPI
from openai import AsyncOpenAI

from service.settings import Settings
from tests.api.conftest import GATEWAY_URL, assert_error, make_settings
from tests.fakes import Drop, FakeEngine, JSONReply
from tests.openai_schema import assert_conforms
from tests.vllm_bodies import (
    BASE_MODEL,
    chunk,
    completion,
    stream_chunks,
    tool_call,
    tool_call_chunks,
    tool_call_completion,
)

RESPONSES = "/v1/responses"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
CHAT_WEATHER = {
    "type": "function",
    "function": {k: v for k, v in WEATHER.items() if k != "type"},
}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
RESULT = {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees and sunny"}

# The Responses stream events this endpoint sends, by type: OpenAI's schema of each.
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
}


@pytest.fixture
def settings() -> Settings:
    return make_settings(max_tokens_cap=256)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "auto", "input": "Say hello.", **fields}


def events_of(response: httpx.Response) -> list[dict[str, Any]]:
    """The stream's events, each checked: its SSE name is its ``type``, it conforms to OpenAI's
    schema of that type, and sequence numbers count up from 0."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events: list[dict[str, Any]] = []
    for block in response.text.replace("\r\n", "\n").split("\n\n"):
        lines = block.split("\n")
        names = [line.removeprefix("event:").strip() for line in lines if line.startswith("event:")]
        data = [line.removeprefix("data:").strip() for line in lines if line.startswith("data:")]
        if not data:
            continue
        event = json.loads("\n".join(data))
        assert names == [event["type"]], block
        assert_conforms(EVENT_SCHEMAS[event["type"]], event)
        assert_conforms("ResponseStreamEvent", event)
        events.append(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return events


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


# ---------------------------------------------------------------------------- plain


async def test_a_text_answer_is_a_response(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_completion("Hello there!", prompt_tokens=20, completion_tokens=3)
    response = await client.post(
        RESPONSES,
        json=body(instructions="Be brief.", max_output_tokens=32, temperature=0, metadata={"run": "7"}),
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert_conforms("Response", result)

    sent = engine.last_chat_body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello."},
    ]
    assert sent["max_tokens"] == 32
    assert sent["temperature"] == 0
    assert result["id"].startswith("resp_")
    assert result["object"] == "response"
    assert result["status"] == "completed"
    assert result["model"] == "auto"
    assert result["instructions"] == "Be brief."
    assert result["metadata"] == {"run": "7"}
    assert result["max_output_tokens"] == 32
    [message] = result["output"]
    assert message["id"].startswith("msg_")
    assert message["role"] == "assistant"
    assert message["status"] == "completed"
    assert message["content"] == [
        {"type": "output_text", "text": "Hello there!", "annotations": [], "logprobs": []}
    ]
    assert result["usage"] == {
        "input_tokens": 20,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 23,
    }
    # The gateway's extension, as on chat: how the request was routed.
    assert result["route"]["adapter"] is None
    assert response.headers["x-route"].startswith("adapter=none")


async def test_a_conversation_with_calls_reaches_the_engine_as_chat(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_completion("It is sunny in Paris and Lyon.")
    second = {
        **CALL,
        "call_id": "call_2",
        "arguments": '{"city": "Lyon"}',
        "id": "fc_2",
        "status": "completed",
    }
    request = body(
        input=[
            {"type": "message", "role": "developer", "content": "Use the tools."},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris and Lyon?"}]},
            CALL,
            second,
            RESULT,
            {**RESULT, "call_id": "call_2", "output": [{"type": "input_text", "text": "20 degrees"}]},
        ],
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        reasoning={"effort": "low"},
        text={"format": {"type": "json_schema", "name": "weather", "schema": {"type": "object"}}},
        store=False,
        include=["reasoning.encrypted_content"],
        prompt_cache_key="conversation-1",
        truncation="disabled",
    )
    response = await client.post(RESPONSES, json=request)
    assert response.status_code == 200, response.text
    result = response.json()
    assert_conforms("Response", result)

    sent = engine.last_chat_body
    # Consecutive calls are one assistant turn; each output is a tool message.
    assert sent["messages"][2:] == [
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": CALL["arguments"]},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": second["arguments"]},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "20 degrees"},
    ]
    assert sent["messages"][0] == {"role": "system", "content": "Use the tools."}
    assert sent["tools"] == [CHAT_WEATHER]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False
    assert sent["reasoning_effort"] == "low"
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": {"type": "object"}},
    }
    # The settings echoed as OpenAI echoes them.
    assert result["tools"] == [WEATHER]
    assert result["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert result["parallel_tool_calls"] is False
    assert result["text"]["format"]["name"] == "weather"
    assert result["reasoning"] == {"effort": "low", "summary": None}
    assert result["store"] is False


async def test_an_earlier_answer_and_its_call_are_one_assistant_turn(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    """Output items sent back as input, as clients replay them (ids, statuses, annotations)."""
    engine.enqueue_completion("Done.")
    answer = {
        "type": "message",
        "id": "msg_1",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Let me check.", "annotations": [], "logprobs": []}],
    }
    response = await client.post(
        RESPONSES, json=body(input=[QUESTION, answer, CALL, RESULT], tools=[WEATHER])
    )
    assert response.status_code == 200, response.text
    assistant = engine.last_chat_body["messages"][1]
    assert assistant["content"] == [{"type": "text", "text": "Let me check."}]
    assert [call["id"] for call in assistant["tool_calls"]] == ["call_1"]


async def test_a_call_comes_back_as_a_function_call_item(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue(JSONReply(tool_call_completion(tool_call("get_weather", '{"city": "Paris"}'))))
    response = await client.post(
        RESPONSES, json=body(input=[QUESTION], tools=[WEATHER], tool_choice="required")
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert_conforms("Response", result)
    assert engine.last_chat_body["tool_choice"] == "required"
    # No message item: vLLM's empty content beside the call is no answer.
    [call] = result["output"]
    assert call["id"].startswith("fc_")
    assert {k: v for k, v in call.items() if k != "id"} == {
        "type": "function_call",
        "status": "completed",
        "call_id": "chatcmpl-tool-0001",
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }


async def test_tool_settings_without_tools_are_harmless(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    """OpenAI takes them (an agent without tools may send them); chat would refuse them."""
    engine.enqueue_completion()
    response = await client.post(RESPONSES, json=body(tools=[], tool_choice="auto", parallel_tool_calls=True))
    assert response.status_code == 200, response.text
    assert_conforms("Response", response.json())
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & engine.last_chat_body.keys()


async def test_an_answer_cut_short_is_incomplete(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_completion("Hello the", finish_reason="length")
    response = await client.post(RESPONSES, json=body(max_output_tokens=3))
    result = response.json()
    assert_conforms("Response", result)
    assert result["status"] == "incomplete"
    assert result["incomplete_details"] == {"reason": "max_output_tokens"}
    assert result["output"][0]["status"] == "incomplete"


# ---------------------------------------------------------------------------- streamed


async def test_a_streamed_answer_is_events_in_order(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_stream(stream_chunks("Hel", "lo", "!"))
    response = await client.post(RESPONSES, json=body(stream=True))
    events = events_of(response)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert engine.last_chat_body["stream_options"] == {"include_usage": True}
    assert response.headers["x-route"].startswith("adapter=none")
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "Hello!"
    item_id = events[2]["item"]["id"]
    assert {e["item_id"] for e in events[3:-2]} == {item_id}
    final = events[-1]["response"]
    assert_conforms("Response", final)
    assert final["id"] == events[0]["response"]["id"]
    assert final["status"] == "completed"
    assert final["output"] == [events[-2]["item"]]
    assert final["output"][0]["content"][0]["text"] == "Hello!"
    assert final["usage"]["output_tokens"] == 3


async def test_a_streamed_call_is_argument_deltas(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_stream(tool_call_chunks("get_weather", '{"city', '": "Par', 'is"}'))
    response = await client.post(
        RESPONSES, json=body(input=[QUESTION], tools=[WEATHER], tool_choice="required", stream=True)
    )
    events = events_of(response)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * 3,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added, done = events[2]["item"], events[-2]["item"]
    assert (added["status"], added["arguments"]) == ("in_progress", "")
    assert done == {**added, "status": "completed", "arguments": '{"city": "Paris"}'}
    assert events[-3]["arguments"] == '{"city": "Paris"}'
    assert events[-3]["name"] == "get_weather"
    assert events[-1]["response"]["output"] == [done]


async def test_a_stream_cut_short_ends_incomplete(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    events = stream_chunks("Hel")
    events[-2]["choices"][0]["finish_reason"] = "length"
    engine.enqueue_stream(events)
    streamed = events_of(await client.post(RESPONSES, json=body(stream=True, max_output_tokens=1)))
    assert streamed[-1]["type"] == "response.incomplete"
    assert streamed[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_an_engine_failure_mid_stream_ends_it_failed(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_stream([chunk("", role="assistant"), chunk("Hel")], fail_with=Drop())
    events = events_of(await client.post(RESPONSES, json=body(stream=True)))
    assert types(events)[-3:] == [
        "response.content_part.done",
        "response.output_item.done",
        "response.failed",
    ]
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "server_error"
    assert failed["error"]["message"]
    assert failed["output"][0]["content"][0]["text"] == "Hel"
    assert failed["output"][0]["status"] == "incomplete"
    assert await engine.streams[0].wait_closed()


async def test_the_engines_refusal_of_a_stream_is_a_plain_error(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_error(400, "This model's maximum context length is 2048 tokens.", param="messages")
    response = await client.post(RESPONSES, json=body(stream=True))
    assert_error(response, 400, param="input", code="context_length_exceeded")


# ---------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{**WEATHER, "name": "get weather"}]}, "tools[0].name"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"include": ["message.output_text.logprobs"]}, "include[0]"),
        ({"truncation": "auto"}, "truncation"),
        ({"temperature": "0.5"}, "temperature"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"text": {"format": {"type": "json_schema", "name": "w"}}}, "text.format.schema"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"input": 5}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"input": [{"role": "tool", "content": "18"}]}, "input[0].role"),
        ({"input": [QUESTION, {**CALL, "arguments": None}]}, "input[1].arguments"),
        ({"input": [QUESTION, RESULT]}, "input[1].call_id"),
        ({"input": [QUESTION, CALL, QUESTION, RESULT]}, "input[3].call_id"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"role": "user", "content": "Hi", "name": "bob"}]}, "input[0].name"),
        ({"input": [{"role": "system", "content": "Be brief."}]}, "input"),
    ],
)
async def test_what_the_gateway_cannot_honour_is_a_400_naming_the_parameter(
    client: httpx.AsyncClient, engine: FakeEngine, fields: dict[str, Any], param: str
) -> None:
    response = await client.post(RESPONSES, json=body(**fields))
    assert_error(response, 400, param=param)
    assert engine.chat_requests == []


async def test_previous_response_id_is_refused_with_the_reason(client: httpx.AsyncClient) -> None:
    response = await client.post(RESPONSES, json=body(previous_response_id="resp_1"))
    error = assert_error(response, 400, param="previous_response_id")
    assert "send the whole conversation in input" in error["message"]


async def test_an_unknown_model_is_not_found(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post(RESPONSES, json=body(model="gpt-4o"))
    assert_error(response, 404, param="model", code="model_not_found")


# ---------------------------------------------------------------------------- the Agents SDK


@pytest.fixture
async def sdk_client(app: FastAPI) -> AsyncIterator[AsyncOpenAI]:
    # The OpenAI SDK's own HTTP client (httpx2), over ASGI: no network, the real app.
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url=GATEWAY_URL) as http:
        yield AsyncOpenAI(base_url=f"{GATEWAY_URL}/v1", api_key="unused", http_client=http, max_retries=0)


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"18 degrees and sunny in {city}"


def weather_agent(client: AsyncOpenAI) -> Agent[None]:
    set_tracing_disabled(True)
    return Agent(
        name="forecaster",
        instructions="Answer weather questions with the get_weather tool.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model=BASE_MODEL, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=64),
    )


@pytest.mark.parametrize("streamed", [False, True])
async def test_the_agents_sdk_runs_a_tool_agent(
    sdk_client: AsyncOpenAI, engine: FakeEngine, streamed: bool
) -> None:
    if streamed:
        engine.enqueue_stream(tool_call_chunks("get_weather", '{"city": ', '"Paris"}', call_id="call_9"))
        engine.enqueue_stream(stream_chunks("Sunny, ", "18 degrees."))
    else:
        engine.enqueue(
            JSONReply(tool_call_completion(tool_call("get_weather", '{"city": "Paris"}', call_id="call_9")))
        )
        engine.enqueue(JSONReply(completion("Sunny, 18 degrees.")))
    agent = weather_agent(sdk_client)
    if streamed:
        run = Runner.run_streamed(agent, "What is the weather in Paris?")
        async for _ in run.stream_events():
            pass
        final = run.final_output
    else:
        final = (await Runner.run(agent, "What is the weather in Paris?")).final_output
    assert final == "Sunny, 18 degrees."

    first, second = (request.body for request in engine.chat_requests)
    assert first["tool_choice"] == "required"
    assert first["messages"][0]["role"] == "system"
    # After the call the SDK resets tool_choice and sends the conversation back whole.
    assert "tool_choice" not in second
    assert second["messages"][-2:] == [
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_9", "content": "18 degrees and sunny in Paris"},
    ]
