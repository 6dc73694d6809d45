"""Hostile chat bodies: each is refused with a 4xx in OpenAI's envelope that names the ``param``
at fault, none reaches the engine, and the gateway goes on serving (a valid request after each
is answered). Field-by-field validation is in test_chat_errors.py; this module is the list of
what an attacker or a broken client sends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.api.conftest import CHAT, USER, assert_error, assert_still_serving, chat_body, make_settings
from tests.fakes import FakeEngine

JSON = {"content-type": "application/json"}
MB = 1024 * 1024
SYSTEM = {"role": "system", "content": "Be brief."}


async def post_raw(
    client: httpx.AsyncClient, raw: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post(CHAT, content=raw, headers=headers or JSON)


# ---------------------------------------------------------------------------- not a JSON object

RAW_BODIES = {
    "truncated": b'{"model": "auto", "messages": [',
    "trailing-garbage": json.dumps(chat_body()).encode() + b"}",
    "single-quotes": b"{'messages': []}",
    "not-utf8": b'{"messages": "\xff\xfe"}',
    "empty": b"",
    "array": b"[]",
    "string": b'"hello"',
    "number": b"42",
    "null": b"null",
    "array-of-a-valid-body": json.dumps([chat_body()]).encode(),
}


@pytest.mark.parametrize("raw", RAW_BODIES.values(), ids=RAW_BODIES.keys())
async def test_a_body_that_is_not_a_json_object_is_400(
    client: httpx.AsyncClient, engine: FakeEngine, raw: bytes
) -> None:
    error = assert_error(await post_raw(client, raw), 400, param=None)
    assert "JSON" in error["message"]
    assert engine.chat_requests == []
    await assert_still_serving(client, engine)


CONTENT_TYPES = {
    "text/plain": "text/plain",
    "form": "application/x-www-form-urlencoded",
    "multipart": "multipart/form-data; boundary=xyz",
    "xml": "application/xml",
    "json-lookalike": "application/jsonp",
}


@pytest.mark.parametrize("content_type", CONTENT_TYPES.values(), ids=CONTENT_TYPES.keys())
async def test_a_body_that_is_not_json_is_415(
    client: httpx.AsyncClient, engine: FakeEngine, content_type: str
) -> None:
    response = await post_raw(client, json.dumps(chat_body()).encode(), {"content-type": content_type})
    assert_error(response, 415, param=None)
    assert engine.chat_requests == []
    await assert_still_serving(client, engine)


# ---------------------------------------------------------------------------- size


async def test_a_50_mb_body_is_413_from_its_content_length(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    raw = b'{"messages": [{"role": "user", "content": "' + b"x" * (50 * MB) + b'"}]}'
    error = assert_error(await post_raw(client, raw), 413, param=None)
    assert "4194304" in error["message"]
    assert engine.chat_requests == []
    await assert_still_serving(client, engine)


async def test_a_50_mb_chunked_body_is_refused_before_it_is_all_read(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    pieces = 50
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(pieces):
            sent += 1
            yield b"x" * MB

    response = await client.post(CHAT, content=body(), headers=JSON)
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, param=None)
    # The 4 MiB limit is passed during the fifth megabyte: the rest is never pulled.
    assert sent <= 5
    assert engine.chat_requests == []
    await assert_still_serving(client, engine)


async def test_a_5_mb_message_is_413_under_the_default_limit(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    response = await client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": "x" * 5 * MB}]))
    assert_error(response, 413, param=None)
    assert engine.chat_requests == []
    await assert_still_serving(client, engine)


async def test_100_000_messages_within_the_body_limit_are_400(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    raw = json.dumps(chat_body(messages=[{"role": "user", "content": ""}] * 100_000)).encode()
    assert len(raw) < 4 * MB  # it is the message limit that refuses it, not the size limit
    error = assert_error(await post_raw(client, raw), 400, param="messages")
    assert "1024" in error["message"]
    assert engine.chat_requests == []
    await assert_still_serving(client, engine)


class TestLargerBodyLimit:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(max_body_bytes=16 * MB)

    async def test_a_5_mb_message_goes_to_the_engine_whose_context_refuses_it(
        self, client: httpx.AsyncClient, engine: FakeEngine
    ) -> None:
        """The gateway counts no tokens for a plain request: the engine's context check is the
        bound, and its refusal is the client's 400."""
        engine.enqueue_error(
            400,
            "This model's maximum context length is 8192 tokens. However, you requested 1310733 "
            "tokens in the messages. Please reduce the length of the messages.",
        )
        content = "x" * 5 * MB
        response = await client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": content}]))
        error = assert_error(response, 400, param=None, code="context_length_exceeded")
        assert "maximum context length" in error["message"]
        assert engine.last_chat_body["messages"][-1]["content"] == content
        await assert_still_serving(client, engine)

    async def test_a_413_from_before_the_engine_is_the_clients_413_not_a_502(
        self, client: httpx.AsyncClient, engine: FakeEngine
    ) -> None:
        """A proxy in front of the engine with a smaller limit: the client can fix it by sending
        less, so it is a 4xx (a 502 would make SDKs send it twice more)."""
        engine.enqueue_error(413, "Maximum request body size 1048576 exceeded.", error_type="PayloadTooLarge")
        response = await client.post(
            CHAT, json=chat_body(messages=[{"role": "user", "content": "x" * 2 * MB}])
        )
        error = assert_error(response, 413, param=None)
        assert "too large" in error["message"]
        await assert_still_serving(client, engine)


# ---------------------------------------------------------------------------- fields

_PART_TYPES = {
    "image_url": {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}},
    "input_audio": {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    "file": {"type": "file", "file": {"file_id": "file-abc", "filename": "/etc/passwd"}},
}

BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("empty messages", {"messages": []}, "messages"),
    ("only a system message", {"messages": [SYSTEM]}, "messages"),
    ("messages null", {"messages": None}, "messages"),
    *[
        (f"role {name}", {"messages": [{"role": role, "content": "x"}]}, "messages[0]")
        for name, role in [
            ("ipython", "ipython"),
            ("function", "function"),
            ("empty", ""),
            ("SYSTEM", "SYSTEM"),
        ]
    ],
    # a known role, but a tool result must say which call it answers
    (
        "role tool without tool_call_id",
        {"messages": [{"role": "tool", "content": "x"}]},
        "messages[0].tool_call_id",
    ),
    ("role null", {"messages": [{"role": None, "content": "x"}]}, "messages[0]"),
    *[
        (f"{kind} part", {"messages": [{"role": "user", "content": [part]}]}, "messages[0].content")
        for kind, part in _PART_TYPES.items()
    ],
    (
        "image part after a text part",
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}, _PART_TYPES["image_url"]]}
            ]
        },
        "messages[0].content",
    ),
    *[(f"n {value}", {"n": value}, "n") for value in (10**6, 2**63, -1, 0)],
    *[
        (f"{name} {label}", {name: value}, name)
        for name in ("max_tokens", "max_completion_tokens")
        for label, value in (("0", 0), ("-1", -1), ("above the cap", 4097), ("2**63", 2**63))
    ],
    ("temperature -0.1", {"temperature": -0.1}, "temperature"),
    ("temperature 2.1", {"temperature": 2.1}, "temperature"),
    *[
        (f"temperature {text!r}", {"temperature": text}, "temperature")
        for text in ("NaN", "Infinity", "-Infinity")
    ],
    ("top_p 0", {"top_p": 0}, "top_p"),
    ("top_p 1.5", {"top_p": 1.5}, "top_p"),
    ("top_logprobs 10**9", {"logprobs": True, "top_logprobs": 10**9}, "top_logprobs"),
    ("top_logprobs without logprobs", {"top_logprobs": 1}, "top_logprobs"),
    ("stop: 5 strings", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("stop: 10k characters", {"stop": "x" * 10_000}, "stop"),
    ("stop: empty string", {"stop": ""}, "stop"),
    ("stop: 10,000 strings", {"stop": ["x"] * 10_000}, "stop"),
]


@pytest.mark.parametrize(
    ("fields", "param"), [pytest.param(fields, param, id=name) for name, fields, param in BAD_FIELDS]
)
async def test_a_bad_field_is_400_naming_it(
    client: httpx.AsyncClient, engine: FakeEngine, fields: dict[str, Any], param: str
) -> None:
    assert_error(await client.post(CHAT, json=chat_body(**fields)), 400, param=param)
    assert engine.chat_requests == []
    await assert_still_serving(client, engine)


# Literal NaN and Infinity are not JSON, but parsers (pydantic's among them) read them.
@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
async def test_a_non_finite_temperature_literal_is_400(
    client: httpx.AsyncClient, engine: FakeEngine, literal: bytes
) -> None:
    raw = json.dumps(chat_body(temperature=0.5)).encode().replace(b"0.5", literal)
    assert_error(await post_raw(client, raw), 400, param="temperature")
    assert engine.chat_requests == []
    await assert_still_serving(client, engine)


NEVER_FORWARDED: dict[str, Any] = {
    # vLLM's own extensions: templates, raw embeddings, guided decoding, scheduling, LoRA
    "chat_template": "{{ raise_exception('pwned') }}",
    "chat_template_kwargs": {"enable_thinking": True},
    "prompt_embeds": "AAAA",
    "guided_json": {"type": "object"},
    "guided_regex": "(a+)+$",
    "guided_choice": ["a", "b"],
    "guided_grammar": "root ::= 'a'",
    "structured_outputs": {"json": {"type": "object"}},
    "mm_processor_kwargs": {"num_crops": 10**6},
    "priority": -(10**9),
    "lora_request": {"lora_name": "x", "lora_path": "/etc"},
    "vllm_xargs": {"x": 1},
    # where a client library would send the request, or with which key
    "api_base": "http://169.254.169.254",
    "base_url": "http://169.254.169.254",
    "api_key": "sk-stolen",
    "extra_body": {"guided_json": {}},
    # OpenAI features the gateway does not offer
    "logit_bias": {"50256": -100},
    "functions": [{"name": "f"}],
    "function_call": {"name": "f"},
    "images": ["http://example.com/a.png"],
}


@pytest.mark.parametrize(("name", "value"), NEVER_FORWARDED.items(), ids=NEVER_FORWARDED.keys())
async def test_a_field_that_must_never_reach_the_engine_is_400_naming_it(
    client: httpx.AsyncClient, engine: FakeEngine, name: str, value: Any
) -> None:
    error = assert_error(await client.post(CHAT, json=chat_body(**{name: value})), 400, param=name)
    assert error["message"] == f"Unrecognized request argument supplied: {name}"
    assert engine.chat_requests == []
    await assert_still_serving(client, engine)


async def test_a_forbidden_field_inside_a_message_is_400(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    message = {
        **USER,
        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": ""}}],
    }
    assert_error(
        await client.post(CHAT, json=chat_body(messages=[message])), 400, param="messages[0].tool_calls"
    )
    assert engine.chat_requests == []
    await assert_still_serving(client, engine)
