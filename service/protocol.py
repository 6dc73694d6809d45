"""OpenAI wire types: what clients send and what they get back.

Requests are parsed strictly (unknown fields refused, no type coercion). Responses mirror
OpenAI's published schemas: the engine's (vLLM's) extra fields are dropped and nulls it sends
where OpenAI allows none are omitted, so every body validates against ``openapi.yaml``.

Extension fields (not in OpenAI's API) are fenced below under "hybrid-serve extensions".
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

# ---------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class SystemMessage(_Request):
    role: Literal["system"]
    content: Content
    name: str | None = None


class DeveloperMessage(_Request):
    role: Literal["developer"]
    content: Content
    name: str | None = None


class UserMessage(_Request):
    role: Literal["user"]
    content: Content
    name: str | None = None


_NAME = r"^[A-Za-z0-9_-]{1,64}$"
FunctionName = Annotated[str, Field(pattern=_NAME)]


class FunctionCallParam(_Request):
    name: FunctionName
    arguments: str  # JSON text, as the model wrote it (OpenAI never parses it either)


class ToolCallParam(_Request):
    """A call the assistant made earlier in the conversation."""

    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"]
    function: FunctionCallParam


class AssistantMessage(_Request):
    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: Annotated[list[ToolCallParam], Field(min_length=1)] | None = None


class ToolMessage(_Request):
    """A tool's result, answering the assistant's call ``tool_call_id``."""

    role: Literal["tool"]
    content: Content
    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)]


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = None
    # A JSON Schema object; vLLM compiles it into the grammar that constrains forced calls.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: FunctionName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class StreamOptions(_Request):
    include_usage: bool = False


class TextFormat(_Request):
    type: Literal["text"]


class JsonObjectFormat(_Request):
    type: Literal["json_object"]


class JsonSchemaSpec(_Request):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class JsonSchemaFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]

_INT64 = 2**63


class ChatCompletionRequest(_Request):
    """The allow-list: only these fields exist for the gateway; anything else is a 400.

    Bounds that depend on configuration (``n``, ``max_tokens``, ``top_logprobs``, ``stop``,
    message count) are checked by :mod:`service.limits`."""

    model: str = "auto"
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, lt=_INT64)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, lt=_INT64)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, lt=_INT64)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-_INT64, lt=_INT64)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, lt=_INT64)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[FunctionTool], Field(min_length=1, max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Passed to the engine; a model without reasoning (or an engine without a reasoning
    # parser) ignores it, as OpenAI's non-reasoning models do.
    reasoning_effort: ReasoningEffort | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # hybrid-serve extension: retrieval-augmented answer (see RouteDecision below)
    rag: Literal["auto", "on", "off"] = "auto"

    def engine_payload(self, engine_model: str) -> dict[str, Any]:
        """The body sent to vLLM: the allowed fields, ``model`` resolved, ``developer`` sent
        as ``system`` (open models' chat templates know no developer role)."""
        payload = self.model_dump(
            exclude_none=True, by_alias=True, exclude={"model", "max_completion_tokens", "rag"}
        )
        payload["model"] = engine_model
        budget = self.max_completion_tokens or self.max_tokens
        if budget is not None:
            payload["max_tokens"] = budget
        for message in payload["messages"]:
            if message["role"] == "developer":
                message["role"] = "system"
        return payload


# ---------------------------------------------------------------------------- responses


class _Wire(BaseModel):
    """A response object: engine extras are ignored on the way in; on the way out, ``None``
    is omitted except for the fields OpenAI requires to be present even when null."""

    model_config = ConfigDict(extra="ignore")
    keep_null: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in self.keep_null}


class TopLogprob(_Wire):
    keep_null: ClassVar[frozenset[str]] = frozenset({"bytes"})
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Wire):
    keep_null: ClassVar[frozenset[str]] = frozenset({"content", "refusal"})
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class PromptTokensDetails(_Wire):
    cached_tokens: int | None = None
    audio_tokens: int | None = None


class CompletionTokensDetails(_Wire):
    reasoning_tokens: int | None = None
    audio_tokens: int | None = None
    accepted_prediction_tokens: int | None = None
    rejected_prediction_tokens: int | None = None


class Usage(_Wire):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class FunctionCall(_Wire):
    name: str
    arguments: str


class ToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(_Wire):
    keep_null: ClassVar[frozenset[str]] = frozenset({"content", "refusal"})
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    # The model's reasoning, where the engine separates it (vLLM with a reasoning parser):
    # ``reasoning`` is vLLM's name, ``reasoning_content`` the one most clients read.
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _openai_shape(self) -> ResponseMessage:
        """No empty tool-call list; content null beside tool calls when the model wrote none
        (vLLM sends ""); the reasoning under both names."""
        if self.tool_calls is not None and not self.tool_calls:
            self.tool_calls = None
        elif self.tool_calls and not self.content:
            self.content = None
        self.reasoning = self.reasoning_content = self.reasoning or self.reasoning_content
        return self


class Choice(_Wire):
    keep_null: ClassVar[frozenset[str]] = frozenset({"logprobs"})
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


# ---------------------------------------------------------------- hybrid-serve extensions


class RouteSource(_Wire):
    """A passage given to the model; the answer cites it as ``[id]``."""

    id: int
    source: str
    title: str | None = None
    score: float  # cosine similarity of the passage to the query
    text: str  # the passage as the model saw it (marker look-alikes defused)
    collection: str
    chunk_id: str
    volatile: bool  # from a volatile collection (news, prices): fresher than what models know
    heading: str | None = None  # heading path of the passage's section ("Release notes > 2.4")
    page: int | None = None  # the PDF page it comes from, 1-based; None for other formats


class RagRoute(_Wire):
    used: bool
    sources: list[RouteSource] = Field(default_factory=list)


class RouteScores(_Wire):
    """The signals a decision was made from: the router's calibrated probability of each adapter
    and of the base model (absent: no classifier is fitted), and the best retrieved passage's
    cosine similarity (None: nothing was searched)."""

    keep_null: ClassVar[frozenset[str]] = frozenset({"retrieval"})
    adapters: dict[str, float] = Field(default_factory=dict)
    base: float | None = None
    retrieval: float | None = None


class RouteDecision(_Wire):
    """How a request was answered: which adapter (None: the base model), which sources, and
    why. Frozen: it is made once per request and then only read."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    keep_null: ClassVar[frozenset[str]] = frozenset({"adapter"})
    adapter: str | None = None
    rag: RagRoute
    scores: RouteScores = Field(default_factory=RouteScores)
    reason: str

    @property
    def kind(self) -> str:
        """``base``, ``adapter``, ``base+rag`` or ``adapter+rag`` (the metrics label)."""
        return ("adapter" if self.adapter else "base") + ("+rag" if self.rag.used else "")

    def header(self) -> str:
        """The ``X-Route`` header: the decision in one line, for logs and proxies."""
        rag = "on" if self.rag.used else "off"
        return f"adapter={self.adapter or 'none'}; rag={rag}; sources={len(self.rag.sources)}"


class ChatCompletion(_Wire):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    route: RouteDecision | None = None  # hybrid-serve extension


class FunctionCallDelta(_Wire):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Wire):
    """A piece of a streamed call: the first carries ``id``, ``type`` and the name; the
    arguments follow in pieces, all under the call's ``index``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class Delta(_Wire):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _both_reasoning_names(self) -> Delta:
        self.reasoning = self.reasoning_content = self.reasoning or self.reasoning_content
        return self


class ChunkChoice(_Wire):
    keep_null: ClassVar[frozenset[str]] = frozenset({"finish_reason"})
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Wire):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    route: RouteDecision | None = None  # hybrid-serve extension: on the first chunk only


class ModelCard(_Wire):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # vLLM's extensions, kept because clients of vLLM read them
    parent: str | None = None
    # Where the engine loaded a model or adapter from: read by the gateway (to see which
    # adapter version the engine holds), never sent to clients (a path on the engine's disk).
    root: str | None = Field(default=None, exclude=True)
    max_model_len: int | None = None


class ModelList(_Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptSize(_Wire):
    """vLLM's ``/tokenize`` answer (engine-facing, not part of the public API)."""

    count: int
    max_model_len: int | None = None
