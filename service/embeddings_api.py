"""Embeddings (``POST /v1/embeddings``) from the gateway's own embedder, the one retrieval uses,
in OpenAI's wire format: a client that indexes its own documents gets the vectors the router and
the knowledge base compare against, without a second model to run.

What differs from OpenAI, and why:

- ``input`` is text only. Token arrays are refused (they would be ids of OpenAI's tokenizer,
  meaningless to this model); LangChain's ``OpenAIEmbeddings`` sends them unless told
  ``check_embedding_ctx_length=False``, which the refusal says.
- An input longer than the embedder's window (254 of its tokens for all-MiniLM-L6-v2) is
  refused, as OpenAI refuses one over 8,192: the model would silently embed only
  its beginning, and a vector that misrepresents its text is worse than an error.
- ``dimensions`` may only be the embedder's own: the model was not trained to be shortened.

Embedding is CPU work on the embedder the chat router also uses (its calls are serialised): it
runs in a worker thread, in slices, so that a large request does not hold the router's queries
back for its whole duration.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from index.embedder import Embedder, Vectors
from service.errors import InvalidRequestError, NotFoundError
from service.metrics import Metrics
from service.protocol import Usage, _Wire

MAX_INPUTS = 2048
"""Inputs per request, OpenAI's own limit."""
SLICE = 64
"""Inputs embedded per hold of the embedder: between two slices the router may embed a query."""

# ---------------------------------------------------------------------------- wire types


class EmbeddingRequest(BaseModel):
    """The allow-list, parsed strictly like a chat request. Token arrays parse (OpenAI's schema
    has them) so that they can be refused in words rather than as a type error."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, lt=2**63)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None


class Embedding(_Wire):
    object: Literal["embedding"] = "embedding"
    index: int
    # floats, or with ``encoding_format: base64`` the little-endian float32 bytes in base64
    embedding: list[float] | str


class EmbeddingUsage(_Wire):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Wire):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# ---------------------------------------------------------------------------- the service


class EmbeddingService:
    def __init__(self, embedder: Embedder, metrics: Metrics) -> None:
        self._embedder = embedder
        self._metrics = metrics

    @property
    def model(self) -> str:
        """The id a request names: the embedder's, as collections record it."""
        return self._embedder.name

    async def create(self, request: EmbeddingRequest) -> EmbeddingList:
        self._check_model(request)
        texts = _texts(request.input)
        vectors, tokens = await asyncio.to_thread(self._embed, texts)
        self._metrics.count_usage(self.model, Usage(prompt_tokens=sum(tokens), total_tokens=sum(tokens)))
        encode = _base64 if request.encoding_format == "base64" else _floats
        return EmbeddingList(
            data=[Embedding(index=i, embedding=encode(vector)) for i, vector in enumerate(vectors)],
            model=self.model,
            usage=EmbeddingUsage(prompt_tokens=sum(tokens), total_tokens=sum(tokens)),
        )

    def _check_model(self, request: EmbeddingRequest) -> None:
        if request.model != self.model:
            raise NotFoundError(
                f"The model '{request.model}' does not exist or is not an embedding model. "
                f"Embeddings are served by '{self.model}'.",
                param="model",
                code="model_not_found",
            )
        dimension = self._embedder.dimension
        if request.dimensions is not None and request.dimensions != dimension:
            raise InvalidRequestError(
                f"'{self.model}' makes vectors of {dimension} dimensions and cannot shorten them: "
                f"omit 'dimensions' or send {dimension}.",
                param="dimensions",
            )

    def _embed(self, texts: Sequence[str]) -> tuple[Vectors, list[int]]:
        """Blocking: every input's token count (refusing one over the window), then the vectors."""
        limit = self._embedder.max_tokens
        tokens = [self._embedder.count_tokens(text) for text in texts]
        for index, count in enumerate(tokens):
            if count > limit:
                raise InvalidRequestError(
                    f"This model's maximum context length is {limit} tokens, however input[{index}] "
                    f"has {count} tokens. Split the text, or shorten it.",
                    param=f"input[{index}]",
                    code="context_length_exceeded",
                )
        slices = [self._embedder.embed(texts[i : i + SLICE]) for i in range(0, len(texts), SLICE)]
        return np.concatenate(slices), tokens


def _texts(given: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    """The texts to embed; a 400 naming the input at fault otherwise."""
    if isinstance(given, str):
        if not given:
            raise InvalidRequestError("'input' must not be an empty string.", param="input")
        return [given]
    if not given:
        raise InvalidRequestError("'input' must not be an empty list.", param="input")
    if len(given) > MAX_INPUTS:
        raise InvalidRequestError(
            f"'input' may hold at most {MAX_INPUTS} texts, got {len(given)}.", param="input"
        )
    texts: list[str] = []
    for index, item in enumerate(given):
        if not isinstance(item, str):
            raise InvalidRequestError(
                "'input' must be text: token arrays are not accepted, since this embedder has its own "
                "tokenizer (LangChain's OpenAIEmbeddings: set check_embedding_ctx_length=False).",
                param="input",
            )
        if not item:
            raise InvalidRequestError(f"input[{index}] must not be an empty string.", param=f"input[{index}]")
        texts.append(item)
    return texts


def _floats(vector: Vectors) -> list[float]:
    values: list[float] = vector.tolist()
    return values


def _base64(vector: Vectors) -> str:
    """What OpenAI sends for ``encoding_format: base64`` (and its SDKs decode)."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
