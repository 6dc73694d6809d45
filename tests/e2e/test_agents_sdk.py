"""The unmodified OpenAI Agents SDK (its default model class, ``OpenAIResponsesModel``) runs a
one-tool agent against ``/v1/responses`` over a real vLLM engine, plain and streamed.

The bundled model is small: its forced calls are valid because the engine constrains them to
the tool's schema; what it answers afterwards is not checked, only that it answers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from agents import Agent, ModelSettings, Runner, ToolCallItem, function_tool, set_tracing_disabled
from agents.models.openai_responses import OpenAIResponsesModel
from openai import AsyncOpenAI
from openai.types.responses import ResponseFunctionToolCall

from tests.harness import RunningService
from tests.openai_schema import assert_conforms

pytestmark = pytest.mark.e2e

BASE_MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the weather in Paris?"


def weather_agent(service: RunningService, cities: list[str]) -> Agent[None]:
    # No trace exporter: it would try to reach OpenAI.
    set_tracing_disabled(True)

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        cities.append(city)
        return f"18 degrees and sunny in {city}"

    client = AsyncOpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=120)
    return Agent(
        name="forecaster",
        instructions="You answer weather questions. Use the get_weather tool.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model=BASE_MODEL, openai_client=client),
        # The SDK resets tool_choice after the first call, so the next turn may answer in text.
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=48),
    )


def assert_called_as_declared(cities: list[str], items: list[Any]) -> None:
    """The tool ran with a ``city`` string, from a call whose arguments are that object."""
    assert cities, "the tool was never called"
    assert all(isinstance(city, str) for city in cities)
    calls = [
        item.raw_item
        for item in items
        if isinstance(item, ToolCallItem) and isinstance(item.raw_item, ResponseFunctionToolCall)
    ]
    assert calls
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": cities[0]}


async def test_an_agent_calls_its_tool_then_answers(service: RunningService) -> None:
    cities: list[str] = []
    result = await Runner.run(weather_agent(service, cities), QUESTION, max_turns=4)
    assert_called_as_declared(cities, result.new_items)
    assert isinstance(result.final_output, str)
    assert result.final_output.strip()


async def test_a_streamed_agent_run_calls_its_tool_then_answers(service: RunningService) -> None:
    cities: list[str] = []
    run = Runner.run_streamed(weather_agent(service, cities), QUESTION, max_turns=4)
    raw_types = {event.data.type async for event in run.stream_events() if event.type == "raw_response_event"}
    assert {"response.function_call_arguments.delta", "response.output_text.delta", "response.completed"} <= (
        raw_types
    )
    assert_called_as_declared(cities, run.new_items)
    assert isinstance(run.final_output, str)
    assert run.final_output.strip()


def test_every_stream_event_conforms(service: RunningService) -> None:
    body = {"model": "auto", "input": QUESTION, "max_output_tokens": 12, "stream": True}
    with httpx.stream("POST", f"{service.url}/v1/responses", json=body, timeout=120) as response:
        assert response.status_code == 200
        payloads = [
            line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")
        ]
    events = [json.loads(payload) for payload in payloads]
    assert_conforms("ResponseCreatedEvent", events[0])
    for event in events:
        assert_conforms("ResponseStreamEvent", event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    final = events[-1]
    assert final["type"] in {"response.completed", "response.incomplete"}
    assert_conforms("Response", final["response"])
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    assert text
    assert final["response"]["output"][0]["content"][0]["text"] == text
    assert final["response"]["usage"]["output_tokens"] > 0
