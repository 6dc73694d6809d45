"""Model resolution and the engine's failures as the client sees them: a 4xx from vLLM stays
the client's mistake, anything else is a 5xx in OpenAI's envelope (503 with Retry-After)."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI

from service.settings import Settings
from tests.api.conftest import CHAT, USER, assert_error, chat_body
from tests.fakes import Drop, FakeEngine, RawReply, Stall
from tests.vllm_bodies import BASE_MODEL, model_card

# ---------------------------------------------------------------------------- models


async def test_unknown_model_is_404_model_not_found(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post(CHAT, json=chat_body(model="gpt-4o"))
    error = assert_error(response, 404, param="model", code="model_not_found")
    assert "gpt-4o" in error["message"]
    assert engine.chat_requests == []


@pytest.mark.parametrize("model", ["auto", BASE_MODEL])
async def test_auto_and_base_id_reach_the_engine_as_the_base_model(
    client: httpx.AsyncClient, engine: FakeEngine, model: str
) -> None:
    engine.enqueue_completion()
    response = await client.post(CHAT, json=chat_body(model=model))
    assert response.status_code == 200, response.text
    assert engine.last_chat_body["model"] == BASE_MODEL


async def test_model_defaults_to_auto(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_completion()
    response = await client.post(CHAT, json={"messages": [USER]})
    assert response.status_code == 200, response.text
    assert engine.last_chat_body["model"] == BASE_MODEL


async def test_models_are_learnt_at_start_then_cached(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    # The app fixture waited for the start-up reconciliation, which learnt the base model.
    engine.enqueue_completion()
    engine.enqueue_completion()
    for _ in range(2):
        assert (await client.post(CHAT, json=chat_body())).status_code == 200
    assert [r.path for r in engine.requests if r.method == "GET"] == []


# ---------------------------------------------------------------------------- engine failures


async def test_engine_connect_error_is_503_with_retry_after(
    client: httpx.AsyncClient, engine: FakeEngine, settings: Settings
) -> None:
    engine.enqueue_raise(Drop())
    response = await client.post(CHAT, json=chat_body())
    assert_error(response, 503, param=None, code="engine_unavailable")
    assert response.headers["retry-after"] == str(settings.retry_after_s)


async def test_a_5xx_is_logged_with_its_cause_and_a_4xx_is_not(
    client: httpx.AsyncClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    # The client's envelope says only "unavailable"; the operator needs what the engine did.
    engine.enqueue_raise(Drop())
    engine.enqueue_error(400, CONTEXT_MESSAGE)
    with caplog.at_level(logging.WARNING, logger="service.error_handlers"):
        assert (await client.post(CHAT, json=chat_body())).status_code == 503
        assert (await client.post(CHAT, json=chat_body(max_tokens=1000))).status_code == 400
    [record] = caplog.records
    assert record.getMessage().startswith("POST /v1/chat/completions -> 503 engine_unavailable: ")
    assert "(from ServerDisconnectedError" in record.getMessage()


async def test_engine_down_while_learning_models_is_503(
    client: httpx.AsyncClient, engine: FakeEngine, app: FastAPI
) -> None:
    app.state.catalog.forget()  # as if the engine had never answered since the gateway started
    engine.models_error = Drop()
    response = await client.post(CHAT, json=chat_body())
    assert_error(response, 503, param=None, code="engine_unavailable")
    assert "retry-after" in response.headers
    assert engine.chat_requests == []


async def test_engine_serving_no_model_is_503(
    client: httpx.AsyncClient, engine: FakeEngine, app: FastAPI
) -> None:
    app.state.catalog.forget()
    engine.models = []
    response = await client.post(CHAT, json=chat_body())
    assert_error(response, 503, param=None, code="engine_unavailable")
    assert "retry-after" in response.headers


async def test_engine_read_timeout_is_504(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_raise(Stall())
    response = await client.post(CHAT, json=chat_body())
    assert_error(response, 504, param=None, code="engine_timeout")


async def test_stream_connect_error_is_503_before_any_sse(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_raise(Drop())
    response = await client.post(CHAT, json=chat_body(stream=True))
    assert_error(response, 503, param=None, code="engine_unavailable")
    assert "retry-after" in response.headers


CONTEXT_MESSAGE = (
    "This model's maximum context length is 2048 tokens. However, you requested 3000 tokens "
    "(2000 in the messages, 1000 in the completion). Please reduce the length of the messages "
    "or completion."
)


async def test_engine_context_length_error_is_400_context_length_exceeded(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_error(400, CONTEXT_MESSAGE)
    response = await client.post(CHAT, json=chat_body(max_tokens=1000))
    error = assert_error(response, 400, param=None, code="context_length_exceeded")
    assert "2048" in error["message"]


async def test_stream_context_length_error_is_a_plain_400(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_error(400, CONTEXT_MESSAGE)
    response = await client.post(CHAT, json=chat_body(stream=True))
    assert_error(response, 400, param=None, code="context_length_exceeded")
    assert engine.streams == []


async def test_other_engine_400_keeps_its_message_and_param(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue_error(400, "logit_bias is not supported with this sampler", param="temperature")
    response = await client.post(CHAT, json=chat_body())
    error = assert_error(response, 400, param="temperature", code=None)
    assert error["message"] == "logit_bias is not supported with this sampler"


async def test_engine_404_is_404_model_not_found(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_error(404, "The model `tiny-base` does not exist.", error_type="NotFoundError")
    response = await client.post(CHAT, json=chat_body())
    error = assert_error(response, 404, param="model", code="model_not_found")
    assert "does not exist" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_engine_that_changed_its_model_is_asked_again(
    client: httpx.AsyncClient, engine: FakeEngine, stream: bool
) -> None:
    # The engine restarted with another model: the cached base id is stale. The request that
    # finds out fails (404), the next one learns the new id instead of failing forever.
    assert (await client.get("/ready")).status_code == 200
    engine.models = [model_card("new-base")]
    engine.enqueue_error(404, "The model `tiny-base` does not exist.", error_type="NotFoundError")
    assert_error(
        await client.post(CHAT, json=chat_body(stream=stream)), 404, param="model", code="model_not_found"
    )
    engine.enqueue_completion(model="new-base")
    response = await client.post(CHAT, json=chat_body())
    assert response.status_code == 200, response.text
    assert engine.last_chat_body["model"] == "new-base"


@pytest.mark.parametrize("status", [500, 502])
async def test_engine_5xx_is_502_in_the_envelope(
    client: httpx.AsyncClient, engine: FakeEngine, status: int
) -> None:
    engine.enqueue_error(status, "EngineCore died", error_type="InternalServerError")
    response = await client.post(CHAT, json=chat_body())
    error = assert_error(response, 502, param=None, code="engine_error")
    assert "EngineCore died" in error["message"]


async def test_engine_503_is_503_with_retry_after(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.enqueue_error(503, "The engine is sleeping", error_type="ServiceUnavailableError")
    response = await client.post(CHAT, json=chat_body())
    assert_error(response, 503, param=None, code="engine_unavailable")
    assert "retry-after" in response.headers


@pytest.mark.parametrize(
    "content",
    [b"<html>bad gateway</html>", b'{"id": "x"}', b"[]"],
    ids=["html", "incomplete", "list"],
)
async def test_unusable_engine_completion_is_502(
    client: httpx.AsyncClient, engine: FakeEngine, content: bytes
) -> None:
    engine.enqueue(RawReply(content))
    response = await client.post(CHAT, json=chat_body())
    assert_error(response, 502, param=None, code="engine_error")


async def test_engine_error_without_vllm_body_keeps_the_status_mapping(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.enqueue(RawReply(b"Internal Server Error", status=500, content_type="text/plain"))
    response = await client.post(CHAT, json=chat_body())
    error = assert_error(response, 502, param=None, code="engine_error")
    assert "Internal Server Error" in error["message"]
