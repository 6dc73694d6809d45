"""``POST /v1/completions``: what a legacy completion request becomes on its way to the engine
(allow-listed fields, the model resolved as chat resolves it) and what the engine's answer becomes
on its way back (OpenAI's schema, the client's model name, usage counted); refusals in OpenAI's
envelope before anything reaches the engine; engine failures as chat maps them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from service.adapter_registry import AdapterRegistry
from tests.api.conftest import assert_envelope, assert_error, sse_json
from tests.api.test_models_health_metrics import metric, scrape
from tests.fakes import Drop, FakeEngine, JSONReply, RecordedRequest, Stall
from tests.openai_schema import assert_conforms
from tests.vllm_bodies import BASE_MODEL, CREATED, usage

COMPLETIONS = "/v1/completions"
PROMPT = "Once upon a time"


class CompletionsEngine(FakeEngine):
    """The fake vLLM, answering ``/v1/completions`` from the same scripted replies as chat."""

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST" or request.path != COMPLETIONS:
            return await super()._serve(request)
        raw = await request.read()
        self.requests.append(RecordedRequest(request.method, request.path, json.loads(raw), request.headers))
        if not self._replies:
            self.unexpected += 1
            return web.json_response({"error": "no reply enqueued"}, status=599)
        return await self._reply(request, self._replies.popleft())

    @property
    def last_completion_body(self) -> dict[str, Any]:
        sent = [r.body for r in self.requests if r.path == COMPLETIONS]
        assert sent, "no completion request reached the engine"
        body: dict[str, Any] = sent[-1]
        return body


@pytest.fixture
async def engine() -> AsyncIterator[CompletionsEngine]:
    engine = CompletionsEngine()
    await engine.start()
    yield engine
    await engine.stop()
    assert engine.pending == 0, f"{engine.pending} enqueued engine replies were never used"
    assert engine.unexpected == 0, "the engine got a request with no reply enqueued"


def text_completion(*texts: str, model: str = BASE_MODEL, logprobs: Any = None) -> dict[str, Any]:
    """vLLM's ``CompletionResponse``, its extras and nulls included."""
    return {
        "id": "cmpl-fake0001",
        "object": "text_completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": i,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
            }
            for i, text in enumerate(texts or ("there was a gateway.",))
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(4, 6),
        "kv_transfer_params": None,
    }


def stream_chunk(text: str, *, finish_reason: str | None = None, model: str = BASE_MODEL) -> dict[str, Any]:
    return {
        "id": "cmpl-fake0002",
        "object": "text_completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
        ],
        "usage": None,
    }


def stream_events(*pieces: str, model: str = BASE_MODEL) -> list[dict[str, Any]]:
    """A whole streamed generation, as vLLM sends it with ``include_usage``."""
    chunks = [stream_chunk(piece, model=model) for piece in pieces]
    chunks.append(stream_chunk("", finish_reason="stop", model=model))
    chunks.append({**stream_chunk("", model=model), "choices": [], "usage": usage(4, len(pieces))})
    return chunks


def assert_chunk_conforms(chunk: dict[str, Any]) -> None:
    """OpenAI's one schema for both shapes requires a finish reason, yet OpenAI streams null on
    every chunk but the last: only that is let through."""
    finished = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
    assert_conforms("CreateCompletionResponse", {**chunk, "choices": finished})


# ---------------------------------------------------------------------------- the engine's view


async def test_only_allow_listed_fields_reach_the_engine(
    client: httpx.AsyncClient, engine: CompletionsEngine
) -> None:
    engine.enqueue(JSONReply(text_completion()))
    fields = {
        "prompt": [PROMPT, "Il était une fois"],
        "max_tokens": 16,
        "temperature": 0.7,
        "top_p": 0.9,
        "n": 2,
        "stop": ["\n\n"],
        "seed": -7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logprobs": 2,
        "echo": True,
        "best_of": 1,
        "user": "user-42",
    }
    response = await client.post(COMPLETIONS, json={"model": "auto", **fields})
    assert response.status_code == 200, response.text
    fields.pop("best_of")
    assert engine.last_completion_body == {"model": BASE_MODEL, **fields, "stream": False}


async def test_a_minimal_request_sends_no_unset_fields(
    client: httpx.AsyncClient, engine: CompletionsEngine
) -> None:
    engine.enqueue(JSONReply(text_completion()))
    await client.post(COMPLETIONS, json={"prompt": PROMPT})
    assert engine.last_completion_body == {"model": BASE_MODEL, "prompt": PROMPT, "stream": False}


async def test_an_adapter_is_sent_by_its_engine_id_and_answered_by_name(
    client: httpx.AsyncClient, engine: CompletionsEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the registry knows once an adapter is registered; with the filesystem resolver the
    # engine serves it under its stored version's id.
    monkeypatch.setattr(AdapterRegistry, "is_registered", lambda self, name: name == "poet")
    monkeypatch.setattr(AdapterRegistry, "check_servable", lambda self, name: None)
    monkeypatch.setattr(AdapterRegistry, "engine_id", lambda self, name: f"{name}@v3")
    engine.enqueue(JSONReply(text_completion(model="poet@v3")))
    response = await client.post(COMPLETIONS, json={"model": "poet", "prompt": PROMPT})
    assert response.status_code == 200, response.text
    assert engine.last_completion_body["model"] == "poet@v3"
    assert response.json()["model"] == "poet"


async def test_the_base_model_by_name(client: httpx.AsyncClient, engine: CompletionsEngine) -> None:
    engine.enqueue(JSONReply(text_completion()))
    response = await client.post(COMPLETIONS, json={"model": BASE_MODEL, "prompt": PROMPT})
    assert response.json()["model"] == BASE_MODEL


# ---------------------------------------------------------------------------- answers


async def test_a_completion_is_normalised_to_openai_schema(
    client: httpx.AsyncClient, engine: CompletionsEngine
) -> None:
    logprobs = {
        "text_offset": [0, 5],
        "token_logprobs": [None, -0.5],
        "tokens": ["Once", " upon"],
        "top_logprobs": [None, {" upon": -0.5}],
    }
    engine.enqueue(JSONReply(text_completion("a", "b", logprobs=logprobs)))
    response = await client.post(COMPLETIONS, json={"prompt": PROMPT, "n": 2, "logprobs": 1, "echo": True})
    answer = response.json()
    assert answer == {
        "id": "cmpl-fake0001",
        "object": "text_completion",
        "created": CREATED,
        "model": BASE_MODEL,
        "choices": [
            {"index": 0, "text": "a", "logprobs": logprobs, "finish_reason": "length"},
            {"index": 1, "text": "b", "logprobs": logprobs, "finish_reason": "length"},
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10},
    }


async def test_a_plain_completion_conforms(client: httpx.AsyncClient, engine: CompletionsEngine) -> None:
    engine.enqueue(JSONReply(text_completion()))
    answer = (await client.post(COMPLETIONS, json={"prompt": PROMPT})).json()
    assert_conforms("CreateCompletionResponse", answer)
    assert answer["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_conforms_and_ends_with_done(
    client: httpx.AsyncClient, engine: CompletionsEngine, include_usage: bool
) -> None:
    engine.enqueue_stream(stream_events(" there", " was"))
    fields = {"stream_options": {"include_usage": True}} if include_usage else {}
    response = await client.post(COMPLETIONS, json={"prompt": PROMPT, "stream": True, **fields})
    assert response.status_code == 200, response.text
    chunks, last = sse_json(response)
    assert last == "[DONE]"
    for chunk in chunks:
        assert_chunk_conforms(chunk)
        assert chunk["model"] == BASE_MODEL
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == " there was"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, None, "stop"]
    with_usage = [c for c in chunks if "usage" in c]
    assert len(with_usage) == include_usage
    # The engine is always asked for usage, for the metrics.
    assert engine.last_completion_body["stream_options"] == {"include_usage": True}


async def test_a_stream_shows_the_adapter_name(
    client: httpx.AsyncClient, engine: CompletionsEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(AdapterRegistry, "is_registered", lambda self, name: name == "poet")
    monkeypatch.setattr(AdapterRegistry, "check_servable", lambda self, name: None)
    monkeypatch.setattr(AdapterRegistry, "engine_id", lambda self, name: f"{name}@v3")
    engine.enqueue_stream(stream_events("x", model="poet@v3"))
    response = await client.post(COMPLETIONS, json={"model": "poet", "prompt": PROMPT, "stream": True})
    chunks, _ = sse_json(response)
    assert {c["model"] for c in chunks} == {"poet"}


async def test_tokens_are_counted(client: httpx.AsyncClient, engine: CompletionsEngine) -> None:
    engine.enqueue(JSONReply(text_completion()))
    engine.enqueue_stream(stream_events("a", "b"))
    await client.post(COMPLETIONS, json={"prompt": PROMPT})
    await client.post(COMPLETIONS, json={"prompt": PROMPT, "stream": True})
    text = await scrape(client)
    assert metric(text, "hybrid_tokens_total", kind="prompt", model=BASE_MODEL) == 4 + 4
    assert metric(text, "hybrid_tokens_total", kind="completion", model=BASE_MODEL) == 6 + 2


# ---------------------------------------------------------------------------- engine failures


@pytest.mark.parametrize(
    ("status", "message", "expected", "code"),
    [
        (400, "This model's maximum context length is 2048 tokens.", 400, "context_length_exceeded"),
        (404, "The model `x` does not exist.", 404, "model_not_found"),
        (503, "Service Unavailable", 503, "engine_unavailable"),
        (500, "boom", 502, "engine_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_engine_errors_map_as_for_chat(
    client: httpx.AsyncClient,
    engine: CompletionsEngine,
    status: int,
    message: str,
    expected: int,
    code: str,
    stream: bool,
) -> None:
    engine.enqueue_error(status, message)
    response = await client.post(COMPLETIONS, json={"prompt": PROMPT, "stream": stream})
    param = "model" if expected == 404 else None
    assert_error(response, expected, param=param, code=code)


@pytest.mark.parametrize("failure", [Drop(), Stall()])
async def test_an_engine_lost_before_answering_is_5xx(
    client: httpx.AsyncClient, engine: CompletionsEngine, failure: Drop | Stall
) -> None:
    engine.enqueue_raise(failure)
    response = await client.post(COMPLETIONS, json={"prompt": PROMPT})
    assert response.status_code in {503, 504}
    assert_envelope(response.json(), param=None, code=response.json()["error"]["code"], status=503)


async def test_a_stream_that_fails_part_way_ends_with_one_error_then_done(
    client: httpx.AsyncClient, engine: CompletionsEngine
) -> None:
    engine.enqueue_stream([stream_chunk("Once")], fail_with=Drop())
    response = await client.post(COMPLETIONS, json={"prompt": PROMPT, "stream": True})
    chunks, last = sse_json(response)
    assert last == "[DONE]"
    assert chunks[0]["choices"][0]["text"] == "Once"
    assert_envelope(chunks[-1], param=None, code="engine_unavailable", status=503)


async def test_an_unreadable_answer_is_502(client: httpx.AsyncClient, engine: CompletionsEngine) -> None:
    engine.enqueue(JSONReply({"id": "x", "object": "text_completion"}))
    assert_error(
        await client.post(COMPLETIONS, json={"prompt": PROMPT}), 502, param=None, code="engine_error"
    )


# ---------------------------------------------------------------------------- refusals

# Bad bodies, each with the param the 400 must name; none reaches the engine.
BAD_BODIES: list[tuple[dict[str, Any], str | None]] = [
    ({}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt[1]"),
    ({"prompt": ["a"] * 17}, "prompt"),
    ({"prompt": [1212, 318]}, "prompt"),
    ({"prompt": [[1212, 318]]}, "prompt"),
    ({"model": 3}, "model"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"max_tokens": "16"}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"seed": 2**64}, "seed"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"echo": "yes"}, "echo"),
    ({"suffix": "The end."}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"stream": "true"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    ({"user": ["u"]}, "user"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"lora_request": {"lora_name": "x"}}, "lora_request"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_BODIES, ids=[json.dumps(f)[:60] for f, _ in BAD_BODIES])
async def test_bad_bodies_are_400_naming_the_param(
    client: httpx.AsyncClient, engine: CompletionsEngine, fields: dict[str, Any], param: str
) -> None:
    request = {"prompt": PROMPT, **fields}
    if param == "prompt" and not fields:
        del request["prompt"]
    response = await client.post(COMPLETIONS, json=request)
    assert_error(response, 400, param=param)
    assert engine.requests == []


async def test_an_unknown_model_is_404(client: httpx.AsyncClient, engine: CompletionsEngine) -> None:
    response = await client.post(COMPLETIONS, json={"model": "gpt-3.5-turbo-instruct", "prompt": PROMPT})
    assert_error(response, 404, param="model", code="model_not_found")
    assert [r.path for r in engine.requests if r.method == "POST"] == []


@pytest.mark.parametrize("raw", [b"{", b"[]", b"", b"null"])
async def test_a_body_that_is_no_json_object_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post(COMPLETIONS, content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, param=None)


async def test_a_form_body_is_415(client: httpx.AsyncClient) -> None:
    assert_error(await client.post(COMPLETIONS, data={"prompt": "x"}), 415, param=None)
