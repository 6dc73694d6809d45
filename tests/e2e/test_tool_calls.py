"""Tool calls on the real engine with the bundled model, through the unmodified OpenAI SDK:
a forced call (``required`` or a named function) is a call to a declared tool whose arguments
satisfy the tool's schema, plain and streamed; a tool's answer sent back gets a text reply.
Every body and chunk is validated against OpenAI's published schemas."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.harness import RunningService
from tests.openai_schema import assert_conforms

pytestmark = pytest.mark.e2e

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
]
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather like in Paris today?"}
]


def _chat(service: RunningService, **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{service.url}/v1/chat/completions",
        json={"model": "auto", "temperature": 0, "max_tokens": 96, **body},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    assert_conforms("CreateChatCompletionResponse", payload)
    return payload


def _valid_weather_call(call: dict[str, Any]) -> dict[str, Any]:
    assert call["type"] == "function"
    assert call["id"]
    assert call["function"]["name"] == "get_weather"
    arguments: dict[str, Any] = json.loads(call["function"]["arguments"])
    Draft202012Validator(WEATHER_PARAMETERS).validate(arguments)
    return arguments


# A named tool choice ends with "stop", as OpenAI's own API does: the call was not the
# model's decision.
@pytest.mark.parametrize(
    ("tool_choice", "finish_reason"),
    [("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}}, "stop")],
    ids=["required", "named"],
)
def test_a_forced_call_satisfies_the_tools_schema(
    service: RunningService, tool_choice: Any, finish_reason: str
) -> None:
    tools = TOOLS[:1] if tool_choice == "required" else TOOLS
    payload = _chat(service, messages=QUESTION, tools=tools, tool_choice=tool_choice)
    choice = payload["choices"][0]
    assert choice["finish_reason"] == finish_reason
    # No citation (or any text) appended to a turn that calls tools.
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert len(calls) >= 1
    _valid_weather_call(calls[0])


def test_a_streamed_call_reassembles_to_a_valid_call(service: RunningService) -> None:
    client = service.client()
    stream = client.chat.completions.create(
        model="auto",
        messages=QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=96,
        stream=True,
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        assert_conforms("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(
                    piece.index, {"type": "function", "id": "", "function": {"name": "", "arguments": ""}}
                )
                call["id"] = piece.id or call["id"]
                if piece.function is not None:
                    call["function"]["name"] += piece.function.name or ""
                    call["function"]["arguments"] += piece.function.arguments or ""
    assert finish == "stop"
    assert list(calls) == [0]
    _valid_weather_call(calls[0])


def test_the_tools_answer_gets_a_text_reply(service: RunningService) -> None:
    first = _chat(service, messages=QUESTION, tools=TOOLS, tool_choice="required")
    call = first["choices"][0]["message"]["tool_calls"][0]
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 degrees."},
    ]
    reply = _chat(service, messages=history, tools=TOOLS, tool_choice="none")
    choice = reply["choices"][0]
    assert choice["finish_reason"] in {"stop", "length"}
    assert choice["message"]["content"]
    assert not choice["message"].get("tool_calls")
