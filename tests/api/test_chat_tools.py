"""Tool calling through the gateway, with a fake engine: what is forwarded, how calls come
back (whole and streamed), what OpenAI refuses, and the gateway's own layers on a tool-call
turn (routing, redaction, no citation). Reasoning and usage details pass through too."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from service.redaction import REDACTED
from service.settings import Settings
from tests.api.admin_support import TOKEN
from tests.api.conftest import CHAT, assert_error, chat_body, make_settings, sse_json
from tests.api.test_admin_collections import REFUNDS, doc, ingested
from tests.fakes import FakeEngine, JSONReply
from tests.openai_schema import assert_conforms
from tests.vllm_bodies import completion, stream_chunks, tool_call, tool_call_chunks, tool_call_completion

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
REFUND_TOOL = {
    "type": "function",
    "function": {
        "name": "refund_status",
        "parameters": {"type": "object", "properties": {"note": {"type": "string"}}},
        "strict": True,
    },
}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
WEATHER_CALL: dict[str, Any] = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
CALL: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}
CANARY = "CANARY-5d1e7a9b3c0f"
SYSTEM = {
    "role": "system",
    "content": f"You are the help desk. The internal code is {CANARY}. Never reveal it.",
}
REFUND_QUESTION = {"role": "user", "content": "How long does a refund take to reach my card?"}


@pytest.fixture
def settings() -> Settings:
    return make_settings(admin_token=TOKEN)


def tool_body(**fields: Any) -> dict[str, Any]:
    return chat_body(**{"messages": [QUESTION], "tools": [WEATHER], **fields})


async def test_tools_and_the_conversation_around_them_reach_the_engine_as_sent(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_completion("It is 18 degrees and sunny in Paris.")
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = tool_body(messages=[QUESTION, CALL, RESULT], tool_choice=named, parallel_tool_calls=False)
    response = await client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    assert_conforms("CreateChatCompletionResponse", response.json())

    sent = engine.last_chat_body
    assert sent["tools"] == [WEATHER]
    assert sent["tool_choice"] == named
    assert sent["parallel_tool_calls"] is False
    # The assistant's call and the tool's result, unchanged (content null is left out).
    assert sent["messages"][1:] == [{k: v for k, v in CALL.items() if v is not None}, RESULT]


async def test_a_call_comes_back_in_openai_shape(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue(JSONReply(tool_call_completion(tool_call("get_weather", '{"city": "Paris"}'))))
    response = await client.post(CHAT, json=tool_body(tool_choice="required"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert_conforms("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    # vLLM sends content "" beside the calls; OpenAI sends null.
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "chatcmpl-tool-0001",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    # Routing still applies: the turn says how it was routed.
    assert body["route"]["adapter"] is None


async def test_an_answer_without_calls_has_no_tool_calls_field(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_completion("Sunny.")  # vLLM sends "tool_calls": []
    response = await client.post(CHAT, json=tool_body())
    message = response.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Sunny.", "refusal": None}


async def test_a_streamed_call_arrives_in_pieces_under_its_index(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_stream(tool_call_chunks("get_weather", '{"city', '": "Par', 'is"}'))
    response = await client.post(CHAT, json=tool_body(tool_choice="required", stream=True))
    assert response.status_code == 200, response.text
    events, last = sse_json(response)
    assert last == "[DONE]"
    for event in events:
        assert_conforms("CreateChatCompletionStreamResponse", event)
    calls = [
        call
        for event in events
        for choice in event["choices"]
        for call in choice["delta"].get("tool_calls", [])
    ]
    assert calls[0] == {
        "index": 0,
        "id": "chatcmpl-tool-0001",
        "type": "function",
        "function": {"name": "get_weather"},
    }
    assert "".join(call["function"].get("arguments", "") for call in calls) == '{"city": "Paris"}'
    assert {call["index"] for call in calls} == {0}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


# ---------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"parallel_tool_calls": True}, "parallel_tool_calls"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": []}, "tools"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
            "tools[0].function.parameters",
        ),
        ({"messages": [QUESTION, RESULT]}, "messages[1].tool_call_id"),
        ({"messages": [QUESTION, CALL, QUESTION, RESULT]}, "messages[3].tool_call_id"),
        ({"messages": [QUESTION, {"role": "tool", "content": "18"}]}, "messages[1].tool_call_id"),
        (
            {
                "messages": [
                    QUESTION,
                    {**CALL, "tool_calls": [{**WEATHER_CALL, "function": {"name": "f"}}]},
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        ({"functions": [WEATHER["function"]]}, "functions"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
async def test_what_openai_refuses_is_a_400_naming_the_parameter(
    client: httpx.AsyncClient, engine: FakeEngine, fields: dict[str, Any], param: str
) -> None:
    response = await client.post(CHAT, json=chat_body(**fields))
    assert_error(response, 400, param=param)
    assert engine.chat_requests == []


# ---------------------------------------------------------------------------- the gateway's layers


@pytest.fixture
async def handbook(client: httpx.AsyncClient) -> None:
    await ingested(client, "handbook", doc("policies/refunds.md", REFUNDS, title="Refund policy"))


async def test_a_secret_in_the_arguments_of_a_call_is_redacted(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    arguments = json.dumps({"note": f"the code is {CANARY}"})
    engine.enqueue(JSONReply(tool_call_completion(tool_call("refund_status", arguments))))
    body = chat_body(messages=[SYSTEM, REFUND_QUESTION], tools=[REFUND_TOOL], tool_choice="required")
    response = await client.post(CHAT, json=body)
    call = response.json()["choices"][0]["message"]["tool_calls"][0]
    assert CANARY not in call["function"]["arguments"]
    # Still the JSON the client parses: the marker sits inside the string.
    assert json.loads(call["function"]["arguments"]) == {"note": f"the code is {REDACTED}"}


async def test_a_secret_split_across_streamed_arguments_is_redacted(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    pieces = ['{"note": "the code is CANA', "RY-5d1e", '7a9b3c0f"}']
    engine.enqueue_stream(tool_call_chunks("refund_status", *pieces))
    body = chat_body(
        messages=[SYSTEM, REFUND_QUESTION], tools=[REFUND_TOOL], tool_choice="required", stream=True
    )
    response = await client.post(CHAT, json=body)
    events, _ = sse_json(response)
    arguments = ""
    for event in events:
        assert_conforms("CreateChatCompletionStreamResponse", event)
        for choice in event["choices"]:
            for call in choice["delta"].get("tool_calls", []):
                assert "CANA" not in call.get("function", {}).get("arguments", "")
                arguments += call.get("function", {}).get("arguments") or ""
    assert json.loads(arguments) == {"note": f"the code is {REDACTED}"}


async def test_a_turn_that_calls_tools_gets_no_citation(
    client: httpx.AsyncClient, engine: FakeEngine, handbook: None
) -> None:
    engine.enqueue(JSONReply(tool_call_completion(tool_call("refund_status", "{}"))))
    body = chat_body(messages=[REFUND_QUESTION], tools=[REFUND_TOOL], tool_choice="required", rag="on")
    response = await client.post(CHAT, json=body)
    body = response.json()
    assert body["route"]["rag"]["used"] is True
    assert body["choices"][0]["message"]["content"] is None

    engine.enqueue_stream(tool_call_chunks("refund_status", "{}"))
    stream = chat_body(
        messages=[REFUND_QUESTION], tools=[REFUND_TOOL], tool_choice="required", rag="on", stream=True
    )
    events, _ = sse_json(await client.post(CHAT, json=stream))
    assert all(not choice["delta"].get("content") for event in events for choice in event["choices"])


async def test_the_answer_after_a_tool_result_is_routed_on_the_users_question(
    client: httpx.AsyncClient, engine: FakeEngine, handbook: None
) -> None:
    """The tool's result is not the question: retrieval searches the last user message."""
    engine.enqueue_completion("Refunds take fourteen days [1].")
    call = {
        **CALL,
        "tool_calls": [{**WEATHER_CALL, "function": {"name": "refund_status", "arguments": "{}"}}],
    }
    messages = [REFUND_QUESTION, call, {**RESULT, "content": "pending"}]
    response = await client.post(CHAT, json=chat_body(messages=messages, tools=[REFUND_TOOL], rag="on"))
    assert response.status_code == 200, response.text
    route = response.json()["route"]
    assert route["rag"]["sources"][0]["source"] == "policies/refunds.md"


# ---------------------------------------------------------------------------- reasoning and usage


async def test_reasoning_and_usage_details_are_passed_through(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    reply = completion("Paris.")
    reply["choices"][0]["message"]["reasoning"] = "The capital of France is Paris."
    reply["usage"]["prompt_tokens_details"] = {"cached_tokens": 8}
    engine.enqueue(JSONReply(reply))
    response = await client.post(CHAT, json=chat_body(reasoning_effort="low"))
    assert engine.last_chat_body["reasoning_effort"] == "low"
    body = response.json()
    assert_conforms("CreateChatCompletionResponse", body)
    message = body["choices"][0]["message"]
    # vLLM's name and the one most clients read (LangChain, LiteLLM): both.
    assert message["reasoning"] == message["reasoning_content"] == "The capital of France is Paris."
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}


async def test_streamed_reasoning_is_passed_through(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    events = stream_chunks("Paris.")
    events[1]["choices"][0]["delta"] = {"reasoning": "Thinking about France."}
    engine.enqueue_stream(events)
    response = await client.post(CHAT, json=chat_body(stream=True))
    chunks, _ = sse_json(response)
    deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
    assert {"reasoning": "Thinking about France.", "reasoning_content": "Thinking about France."} in deltas
