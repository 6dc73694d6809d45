"""Embeddings and legacy completions end to end: the unmodified OpenAI SDK and LangChain's
``OpenAIEmbeddings`` against the gateway over the real engine and the real embedder; every body
validated against OpenAI's published schemas."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from langchain_core.embeddings import Embeddings
from langchain_openai import OpenAIEmbeddings
from langchain_tests.integration_tests import EmbeddingsIntegrationTests

from tests.e2e.test_adapters import upload
from tests.harness import RunningService
from tests.openai_schema import assert_conforms

pytestmark = pytest.mark.e2e

BASE = "SmolLM2-135M-Instruct"
EMBEDDER = "all-MiniLM-L6-v2"
DIMENSION = 384
TEXTS = ["The cat sat on the mat.", "A kitten naps on the rug.", "Bond yields rose sharply."]
PROMPT = "The capital of France is"


# ---------------------------------------------------------------------------- embeddings


def test_the_sdks_default_base64_and_floats_are_the_same_vectors(service: RunningService) -> None:
    client = service.client()
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    default = client.embeddings.create(model=EMBEDDER, input=TEXTS)
    raw = client.embeddings.with_raw_response.create(model=EMBEDDER, input=TEXTS, encoding_format="float")
    assert_conforms("CreateEmbeddingResponse", raw.http_response.json())
    floats = raw.parse()
    assert default.model == floats.model == EMBEDDER
    decoded = np.array([item.embedding for item in default.data], dtype=np.float32)
    plain = np.array([item.embedding for item in floats.data], dtype=np.float32)
    assert decoded.shape == (len(TEXTS), DIMENSION)
    np.testing.assert_array_equal(decoded, plain)
    np.testing.assert_allclose(np.linalg.norm(plain, axis=1), 1.0, atol=1e-5)
    assert plain[0] @ plain[1] > plain[0] @ plain[2]
    assert default.usage.prompt_tokens == floats.usage.prompt_tokens > 0


def test_base64_on_the_wire_is_little_endian_float32(service: RunningService) -> None:
    body = {"model": EMBEDDER, "input": TEXTS[0], "encoding_format": "base64"}
    answer = httpx.post(f"{service.url}/v1/embeddings", json=body, timeout=60).json()
    vector = np.frombuffer(base64.b64decode(answer["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (DIMENSION,)
    floats = service.client().embeddings.create(model=EMBEDDER, input=TEXTS[0], encoding_format="float")
    np.testing.assert_array_equal(vector, np.array(floats.data[0].embedding, dtype=np.float32))


def langchain_embeddings(service: RunningService) -> OpenAIEmbeddings:
    # check_embedding_ctx_length=False: LangChain would otherwise send OpenAI's token ids. The
    # options go as a dict: base_url and api_key are aliases, which the type checker does not see.
    options: dict[str, Any] = {"base_url": f"{service.url}/v1", "api_key": "unused"}
    return OpenAIEmbeddings(model=EMBEDDER, check_embedding_ctx_length=False, **options)


def test_langchain_embeds_documents_and_queries(service: RunningService) -> None:
    embeddings = langchain_embeddings(service)
    documents = embeddings.embed_documents(TEXTS)
    query = embeddings.embed_query(TEXTS[0])
    assert len(documents) == len(TEXTS)
    assert {len(vector) for vector in documents} == {DIMENSION}
    np.testing.assert_allclose(query, documents[0], atol=1e-6)


def test_langchains_token_ids_are_refused_in_words(service: RunningService) -> None:
    body = {"model": EMBEDDER, "input": [[791, 8415, 7731]]}  # what LangChain sends without the flag
    response = httpx.post(f"{service.url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 400
    assert "check_embedding_ctx_length=False" in response.json()["error"]["message"]


class TestGatewayEmbeddings(EmbeddingsIntegrationTests):
    """LangChain's own standard suite for an embeddings integration, pointed at the gateway."""

    @pytest.fixture
    def model(self, service: RunningService) -> Embeddings:
        """The suite's own fixture, with the gateway's address (known once it runs)."""
        return self.embeddings_class(**{"base_url": f"{service.url}/v1", **self.embedding_model_params})

    @property
    def embeddings_class(self) -> type[OpenAIEmbeddings]:
        return OpenAIEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": EMBEDDER, "api_key": "unused", "check_embedding_ctx_length": False}


# ---------------------------------------------------------------------------- completions


def test_a_completion_through_the_sdk(service: RunningService) -> None:
    raw = service.client().completions.with_raw_response.create(
        model=BASE, prompt=PROMPT, max_tokens=8, temperature=0
    )
    assert_conforms("CreateCompletionResponse", raw.http_response.json())
    completion = raw.parse()
    assert completion.model == BASE
    assert completion.choices[0].text
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0


def test_a_stream_reassembles_to_the_plain_completion(service: RunningService) -> None:
    client = service.client()
    plain = client.completions.create(model="auto", prompt=PROMPT, max_tokens=12, temperature=0)
    assert plain.model == BASE
    stream = client.completions.create(
        model="auto",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        pieces.extend(choice.text for choice in chunk.choices)
    assert "".join(pieces) == plain.choices[0].text
    assert usage is not None
    assert plain.usage is not None
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_every_stream_chunk_conforms(service: RunningService) -> None:
    body = {"model": BASE, "prompt": [PROMPT, "Once upon a time"], "max_tokens": 6, "logprobs": 2}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{service.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        payloads = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        # OpenAI's one schema for both shapes requires a finish reason that OpenAI itself streams
        # as null until a choice's last chunk: only that is let through.
        choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
        assert_conforms("CreateCompletionResponse", {**chunk, "choices": choices})
    assert {c["index"] for chunk in chunks for c in chunk["choices"]} == {0, 1}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_a_registered_adapter_completes_by_name(service: RunningService, lora_adapter: Path) -> None:
    with service.admin() as admin:
        created = upload(admin, "completion-poet", lora_adapter)
        assert created.status_code == 201, created.text
        try:
            client = service.client()
            card = client.models.retrieve("completion-poet")
            assert card.id == "completion-poet"
            base = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=16, temperature=0)
            tuned = client.completions.create(
                model="completion-poet", prompt=PROMPT, max_tokens=16, temperature=0
            )
            assert tuned.model == "completion-poet"
            assert tuned.choices[0].text != base.choices[0].text, (
                "the adapter's weights must change the output"
            )
        finally:
            assert admin.delete("/admin/adapters/completion-poet").status_code == 204


def test_models_retrieve(service: RunningService) -> None:
    client = service.client()
    for model in (BASE, "auto"):
        raw = client.models.with_raw_response.retrieve(model)
        assert_conforms("Model", raw.http_response.json())
        assert raw.parse().id == model
    missing = httpx.get(f"{service.url}/v1/models/{EMBEDDER}", timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
