"""``POST /v1/embeddings``: the gateway's own embedder (the one retrieval uses) in OpenAI's wire
format, floats or base64; every refusal a 4xx in OpenAI's envelope naming its ``param``, and
nothing ever reaches the engine."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from index.embedder import Embedder
from service.embeddings_api import MAX_INPUTS
from service.settings import Settings
from tests.api.conftest import assert_error, make_settings
from tests.api.test_models_health_metrics import metric, scrape
from tests.fakes import FakeEngine
from tests.openai_schema import assert_conforms

EMBEDDINGS = "/v1/embeddings"
TEXTS = ["The cat sat on the mat.", "Quarterly revenue grew by four percent.", "Le chat dort."]


@pytest.fixture
def embedder(app: FastAPI) -> Embedder:
    embedder: Embedder = app.state.knowledge.embedder
    return embedder


def body(embedder: Embedder, **fields: Any) -> dict[str, Any]:
    """A valid request, with ``fields`` added or replaced."""
    return {"model": embedder.name, "input": TEXTS, **fields}


def vectors(response: httpx.Response) -> np.ndarray[Any, np.dtype[np.float32]]:
    data = response.json()["data"]
    assert [item["index"] for item in data] == list(range(len(data)))
    rows = [
        np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        if isinstance(item["embedding"], str)
        else np.asarray(item["embedding"], dtype=np.float32)
        for item in data
    ]
    return np.stack(rows)


# ---------------------------------------------------------------------------- answers


async def test_floats_are_the_retrieval_embedders_vectors(
    client: httpx.AsyncClient, engine: FakeEngine, embedder: Embedder
) -> None:
    response = await client.post(EMBEDDINGS, json=body(embedder))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert_conforms("CreateEmbeddingResponse", answer)
    assert answer["object"] == "list"
    assert answer["model"] == embedder.name
    assert {item["object"] for item in answer["data"]} == {"embedding"}
    got = vectors(response)
    assert got.shape == (len(TEXTS), embedder.dimension)
    np.testing.assert_allclose(got, embedder.embed(TEXTS), atol=1e-6)
    tokens = sum(embedder.count_tokens(text) for text in TEXTS)
    assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert engine.requests == []


async def test_base64_is_little_endian_float32_of_the_same_vectors(
    client: httpx.AsyncClient, embedder: Embedder
) -> None:
    floats = await client.post(EMBEDDINGS, json=body(embedder, encoding_format="float"))
    encoded = await client.post(EMBEDDINGS, json=body(embedder, encoding_format="base64"))
    assert encoded.status_code == 200, encoded.text
    assert all(isinstance(item["embedding"], str) for item in encoded.json()["data"])
    np.testing.assert_array_equal(vectors(encoded), vectors(floats).astype(np.float32))
    assert encoded.json()["usage"] == floats.json()["usage"]


async def test_a_string_input_is_one_embedding(client: httpx.AsyncClient, embedder: Embedder) -> None:
    single = await client.post(EMBEDDINGS, json=body(embedder, input=TEXTS[1]))
    listed = await client.post(EMBEDDINGS, json=body(embedder))
    assert len(single.json()["data"]) == 1
    np.testing.assert_allclose(vectors(single)[0], vectors(listed)[1], atol=1e-6)


async def test_vectors_are_normalised_and_similar_texts_are_closer(
    client: httpx.AsyncClient, embedder: Embedder
) -> None:
    texts = ["A kitten naps on the rug.", "The cat sleeps on the carpet.", "Bond yields rose sharply."]
    got = vectors(await client.post(EMBEDDINGS, json=body(embedder, input=texts)))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert got[0] @ got[1] > got[0] @ got[2]


async def test_the_embedders_own_dimension_and_a_user_are_accepted(
    client: httpx.AsyncClient, embedder: Embedder
) -> None:
    response = await client.post(EMBEDDINGS, json=body(embedder, dimensions=embedder.dimension, user="u-1"))
    assert response.status_code == 200, response.text


async def test_an_input_at_the_window_is_embedded(client: httpx.AsyncClient, embedder: Embedder) -> None:
    text = " ".join(["word"] * embedder.max_tokens)
    assert embedder.count_tokens(text) == embedder.max_tokens
    response = await client.post(EMBEDDINGS, json=body(embedder, input=[text]))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == embedder.max_tokens


async def test_tokens_are_counted_in_the_metrics(client: httpx.AsyncClient, embedder: Embedder) -> None:
    await client.post(EMBEDDINGS, json=body(embedder))
    text = await scrape(client)
    tokens = sum(embedder.count_tokens(t) for t in TEXTS)
    assert metric(text, "hybrid_tokens_total", kind="prompt", model=embedder.name) == tokens
    assert metric(text, "hybrid_requests_total", route=EMBEDDINGS, method="POST", status="200") == 1


# ---------------------------------------------------------------------------- refusals


async def test_an_unknown_model_is_404_naming_the_embedder(
    client: httpx.AsyncClient, embedder: Embedder
) -> None:
    for model in ("text-embedding-3-small", "auto", embedder.name.upper()):
        response = await client.post(EMBEDDINGS, json=body(embedder, model=model))
        error = assert_error(response, 404, param="model", code="model_not_found")
        assert embedder.name in error["message"]


async def test_another_dimension_is_400(client: httpx.AsyncClient, embedder: Embedder) -> None:
    response = await client.post(EMBEDDINGS, json=body(embedder, dimensions=256))
    error = assert_error(response, 400, param="dimensions")
    assert str(embedder.dimension) in error["message"]


@pytest.mark.parametrize("tokens", [[1212, 318, 257], [[1212, 318], [257]], [[]]])
async def test_token_arrays_are_refused_in_words(
    client: httpx.AsyncClient, embedder: Embedder, tokens: Any
) -> None:
    response = await client.post(EMBEDDINGS, json=body(embedder, input=tokens))
    error = assert_error(response, 400, param="input")
    assert "check_embedding_ctx_length=False" in error["message"]


async def test_an_input_over_the_window_is_400_naming_it(
    client: httpx.AsyncClient, embedder: Embedder
) -> None:
    too_long = " ".join(["word"] * (embedder.max_tokens + 1))
    response = await client.post(EMBEDDINGS, json=body(embedder, input=["short", too_long]))
    error = assert_error(response, 400, param="input[1]", code="context_length_exceeded")
    assert str(embedder.max_tokens) in error["message"]


async def test_more_inputs_than_openai_allows_is_400(client: httpx.AsyncClient, embedder: Embedder) -> None:
    response = await client.post(EMBEDDINGS, json=body(embedder, input=["a"] * (MAX_INPUTS + 1)))
    assert_error(response, 400, param="input")


# Bad bodies, each with the param the 400 must name: OpenAI's SDKs show it to the developer.
BAD_BODIES: list[tuple[dict[str, Any], str | None]] = [
    ({"input": "x"}, "model"),
    ({"model": "$embedder"}, "input"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input[1]"),
    ({"input": 42}, "input"),
    ({"input": None}, "input"),
    ({"input": {"text": "x"}}, "input"),
    # a list of the wrong things fits none of the union's members: pydantic cannot say which
    # item was meant, so the param is the field
    ({"input": ["ok", 3.5]}, "input"),
    ({"input": ["ok", None]}, "input"),
    ({"model": 7}, "model"),
    ({"model": None}, "model"),
    ({"encoding_format": "int8"}, "encoding_format"),
    ({"encoding_format": None}, "encoding_format"),
    ({"dimensions": 0}, "dimensions"),
    ({"dimensions": "384"}, "dimensions"),
    ({"dimensions": 384.0}, "dimensions"),
    ({"dimensions": True}, "dimensions"),
    ({"user": 5}, "user"),
    ({"user": "u" * 257}, "user"),
    ({"input_type": "query"}, "input_type"),
    ({"truncate": True}, "truncate"),
    ({"encoding_format": "float", "normalize": False}, "normalize"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_BODIES, ids=[json.dumps(f)[:60] for f, _ in BAD_BODIES])
async def test_bad_bodies_are_400_naming_the_param(
    client: httpx.AsyncClient, engine: FakeEngine, embedder: Embedder, fields: dict[str, Any], param: str
) -> None:
    request = body(embedder, **fields)
    for key in ("model", "input"):
        if key not in fields and key == param:
            del request[key]
    if request.get("model") == "$embedder":
        request["model"] = embedder.name
    response = await client.post(EMBEDDINGS, json=request)
    assert_error(response, 400, param=param)
    assert engine.requests == []
    # and the gateway goes on embedding
    assert (await client.post(EMBEDDINGS, json=body(embedder))).status_code == 200


@pytest.mark.parametrize("raw", [b"{", b"[]", b'"input"', b"", b"null"])
async def test_a_body_that_is_no_json_object_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post(EMBEDDINGS, content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, param=None)


async def test_a_form_body_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(EMBEDDINGS, data={"model": "x", "input": "y"})
    assert_error(response, 415, param=None)


async def test_get_is_405(client: httpx.AsyncClient) -> None:
    assert_error(await client.get(EMBEDDINGS), 405, param=None)


class TestApiKeys:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(api_keys="key-one-0123456789")

    async def test_the_api_key_is_required(self, client: httpx.AsyncClient, embedder: Embedder) -> None:
        refused = await client.post(EMBEDDINGS, json=body(embedder))
        assert_error(refused, 401, param=None, code="invalid_api_key", error_type="authentication_error")
        headers = {"Authorization": "Bearer key-one-0123456789"}
        assert (await client.post(EMBEDDINGS, json=body(embedder), headers=headers)).status_code == 200
