"""Chat requests the gateway refuses: always a 4xx in OpenAI's envelope naming the ``param`` at
fault, and a refused request never reaches the engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.api.conftest import CHAT, USER, assert_error, chat_body, make_settings
from tests.fakes import FakeEngine

SYSTEM = {"role": "system", "content": "Be brief."}


# ---------------------------------------------------------------------------- the body itself


@pytest.mark.parametrize("raw", [b"{", b'{"messages": [}', b"not json", b""])
async def test_invalid_json_is_400_without_param(
    client: httpx.AsyncClient, engine: FakeEngine, raw: bytes
) -> None:
    response = await client.post(CHAT, content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 400, param=None)
    assert "JSON" in error["message"]
    assert engine.requests == []


@pytest.mark.parametrize("body", [[], "x", 42, None, [{"messages": [USER]}]])
async def test_non_object_json_is_400(client: httpx.AsyncClient, engine: FakeEngine, body: Any) -> None:
    response = await client.post(
        CHAT, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400, param=None)
    assert "JSON object" in error["message"]
    assert engine.requests == []


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"]
)
async def test_non_json_content_type_is_415(
    client: httpx.AsyncClient, engine: FakeEngine, content_type: str
) -> None:
    response = await client.post(
        CHAT, content=json.dumps(chat_body()).encode(), headers={"content-type": content_type}
    )
    assert_error(response, 415, param=None)
    assert engine.requests == []


async def test_form_encoded_body_is_415(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post(CHAT, data={"model": "auto", "messages": "hi"})
    assert_error(response, 415, param=None)
    assert engine.requests == []


async def test_json_with_charset_and_vendor_json_are_accepted(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_completion()
    engine.enqueue_completion()
    payload = json.dumps(chat_body()).encode()
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = await client.post(CHAT, content=payload, headers={"content-type": content_type})
        assert response.status_code == 200, response.text
    assert len(engine.chat_requests) == 2


# ---------------------------------------------------------------------------- field validation

_BAD_BODIES: list[tuple[str, dict[str, Any], str | None]] = [
    ("empty messages", {"messages": []}, "messages"),
    ("only a system message", {"messages": [SYSTEM]}, "messages"),
    ("only an assistant message", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ("content a number", {"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ("content null", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("content an object", {"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content"),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
    ),
    (
        "second message bad",
        {"messages": [SYSTEM, {"role": "user", "content": 1.5}]},
        "messages[1].content",
    ),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("functions (deprecated function calling)", {"functions": [{"name": "f"}]}, "functions"),
    ("tool_choice", {"tool_choice": "auto"}, "tool_choice"),
    ("chat_template_kwargs", {"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
    ("guided_json (a vLLM extra)", {"guided_json": {"type": "object"}}, "guided_json"),
    ("unknown message field", {"messages": [{**USER, "tool_calls": []}]}, "messages[0].tool_calls"),
    ("n above the cap", {"n": 9}, "n"),
    ("n = 10**6", {"n": 10**6}, "n"),
    ("n = 2**63", {"n": 2**63}, "n"),
    ("n = 0", {"n": 0}, "n"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens -1", {"max_tokens": -1}, "max_tokens"),
    ("max_tokens above the cap", {"max_tokens": 4097}, "max_tokens"),
    ("max_tokens 2**63", {"max_tokens": 2**63}, "max_tokens"),
    ("max_completion_tokens above the cap", {"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ("max_completion_tokens 0", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("temperature 2.5", {"temperature": 2.5}, "temperature"),
    ("temperature -1", {"temperature": -1}, "temperature"),
    ("top_p 0", {"top_p": 0}, "top_p"),
    ("top_p 1.5", {"top_p": 1.5}, "top_p"),
    ("presence_penalty 3", {"presence_penalty": 3}, "presence_penalty"),
    ("frequency_penalty -2.5", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("top_logprobs with logprobs false", {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("top_logprobs above the cap", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs huge", {"logprobs": True, "top_logprobs": 10**12}, "top_logprobs"),
    ("too many stop sequences", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("empty stop sequence", {"stop": [""]}, "stop"),
    ("overlong stop sequence", {"stop": "x" * 257}, "stop"),
    ("stop a number", {"stop": 3}, "stop"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("stream_options with stream false", {"stream": False, "stream_options": {}}, "stream_options"),
    ("temperature a string", {"temperature": "0.5"}, "temperature"),
    ("n a string", {"n": "2"}, "n"),
    ("max_tokens a float", {"max_tokens": 16.0}, "max_tokens"),
    ("stream a string", {"stream": "true"}, "stream"),
    ("logprobs an int", {"logprobs": 1}, "logprobs"),
    ("model a number", {"model": 7}, "model"),
    ("seed 2**64", {"seed": 2**64}, "seed"),
    ("user too long", {"user": "u" * 257}, "user"),
    ("response_format unknown type", {"response_format": {"type": "xml"}}, "response_format"),
    (
        "json_schema bad name",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
        "response_format.json_schema.name",
    ),
]


@pytest.mark.parametrize(
    ("fields", "param"),
    [pytest.param(fields, param, id=name) for name, fields, param in _BAD_BODIES],
)
async def test_invalid_request_is_400_naming_the_param(
    client: httpx.AsyncClient, engine: FakeEngine, fields: dict[str, Any], param: str
) -> None:
    response = await client.post(CHAT, json=chat_body(**fields))
    assert_error(response, 400, param=param)
    assert engine.chat_requests == []


async def test_missing_messages_is_400(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post(CHAT, json={"model": "auto"})
    error = assert_error(response, 400, param="messages")
    assert error["message"] == "Missing required parameter: 'messages'."
    assert engine.requests == []


@pytest.mark.parametrize(
    "message",
    [{"role": "ipython", "content": "x"}, {"role": "function", "content": "x"}, {"content": "no role"}],
    ids=["ipython", "function", "missing"],
)
async def test_unknown_or_missing_role_is_400(
    client: httpx.AsyncClient, engine: FakeEngine, message: dict[str, Any]
) -> None:
    response = await client.post(CHAT, json=chat_body(messages=[message]))
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith("messages[0]")
    assert error["code"] is None
    assert engine.chat_requests == []


async def test_unknown_field_is_named_in_the_message(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post(CHAT, json=chat_body(logit_bias={}))
    error = assert_error(response, 400, param="logit_bias")
    assert error["message"] == "Unrecognized request argument supplied: logit_bias"
    assert engine.requests == []


async def test_stream_request_refused_before_any_sse(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post(CHAT, json=chat_body(stream=True, n=10**6))
    assert_error(response, 400, param="n")
    assert engine.chat_requests == []


# ---------------------------------------------------------------------------- body size


def _padded(size: int) -> bytes:
    """A valid chat body of exactly ``size`` bytes."""
    body = json.dumps(chat_body(messages=[{"role": "user", "content": ""}])).encode()
    padding = size - len(body)
    return json.dumps(chat_body(messages=[{"role": "user", "content": "x" * padding}])).encode()


class TestBodySize:
    @pytest.fixture
    def settings(self) -> Settings:
        # The smallest limit settings allow, so a plainly valid request fits and a padded one not.
        return make_settings(max_body_bytes=1024)

    async def test_over_the_limit_with_content_length_is_413(
        self, client: httpx.AsyncClient, engine: FakeEngine
    ) -> None:
        response = await client.post(
            CHAT, content=_padded(2000), headers={"content-type": "application/json"}
        )
        error = assert_error(response, 413, param=None)
        assert "1024" in error["message"]
        assert engine.requests == []

    async def test_chunked_over_the_limit_is_413(self, client: httpx.AsyncClient, engine: FakeEngine) -> None:
        body = _padded(4000)
        pieces = [body[start : start + 256] for start in range(0, len(body), 256)]
        sent: list[bytes] = []

        async def chunks() -> AsyncIterator[bytes]:
            for piece in pieces:
                sent.append(piece)
                yield piece

        response = await client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
        assert_error(response, 413, param=None)
        assert engine.requests == []
        # Refused as soon as the limit was passed, not after reading everything.
        assert len(sent) < len(pieces)

    async def test_at_the_limit_is_served(self, client: httpx.AsyncClient, engine: FakeEngine) -> None:
        engine.enqueue_completion()
        body = _padded(1024)
        assert len(body) == 1024
        response = await client.post(CHAT, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        assert len(engine.chat_requests) == 1

    async def test_at_the_limit_chunked_is_served(
        self, client: httpx.AsyncClient, engine: FakeEngine
    ) -> None:
        engine.enqueue_completion()
        body = _padded(1024)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 100):
                yield body[start : start + 100]

        response = await client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        assert engine.last_chat_body["messages"][0]["content"] == json.loads(body)["messages"][0]["content"]


class TestConfiguredLimits:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(max_n=2, max_tokens_cap=100, max_messages=3, max_stop=1, max_top_logprobs=2)

    @pytest.mark.parametrize(
        ("fields", "param"),
        [
            ({"n": 3}, "n"),
            ({"max_tokens": 101}, "max_tokens"),
            ({"max_completion_tokens": 101}, "max_completion_tokens"),
            ({"messages": [USER] * 4}, "messages"),
            ({"stop": ["a", "b"]}, "stop"),
            ({"logprobs": True, "top_logprobs": 3}, "top_logprobs"),
        ],
    )
    async def test_over_a_configured_limit_is_400(
        self, client: httpx.AsyncClient, engine: FakeEngine, fields: dict[str, Any], param: str
    ) -> None:
        response = await client.post(CHAT, json=chat_body(**fields))
        assert_error(response, 400, param=param)
        assert engine.chat_requests == []

    async def test_at_the_configured_limits_is_served(
        self, client: httpx.AsyncClient, engine: FakeEngine
    ) -> None:
        engine.enqueue_completion()
        fields = {
            "n": 2,
            "max_tokens": 100,
            "messages": [USER] * 3,
            "stop": "a",
            "logprobs": True,
            "top_logprobs": 2,
        }
        response = await client.post(CHAT, json=chat_body(**fields))
        assert response.status_code == 200, response.text
        assert engine.last_chat_body["n"] == 2
