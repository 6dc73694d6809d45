"""OpenAI Responses API wire types (``POST /v1/responses``): what clients send and what they get
back. Translation to and from chat completions is in :mod:`service.responses_api`.

Requests are parsed as chat requests are (unknown fields refused, no type coercion), narrowed
to what the gateway can honour: text, function tools, no server-side state. Response objects
follow OpenAI's ``Response`` schema; ``route`` is the gateway's extension, as on chat.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_serializer,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.protocol import FunctionName, ReasoningEffort, RouteDecision

# ---------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


ItemStatus = Literal["in_progress", "completed", "incomplete"]
CallId = Annotated[str, Field(min_length=1, max_length=256)]  # chat's bound on a tool call id


class InputText(_Request):
    type: Literal["input_text"]
    text: str


class OutputTextParam(_Request):
    """An earlier answer's text, as clients send the output back (annotations and logprobs
    included, and ignored)."""

    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None


TextPartParam = Annotated[InputText | OutputTextParam, Field(discriminator="type")]


def _by_shape(adapter: TypeAdapter[Any], tags: frozenset[str]) -> WrapValidator:
    """Validate a ``str | list[...]`` field by what the value is, so that a bad list element is
    reported at its own path (``input[2].call_id``) rather than as "not a string"; union tags
    are dropped from error paths, which ``service.parsing`` would otherwise show."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if not isinstance(value, list):
            return handler(value)
        try:
            return adapter.validate_python(value, strict=True)
        except ValidationError as exc:
            errors = [_untagged(error, tags) for error in exc.errors()]
            raise ValidationError.from_exception_data(exc.title, errors) from None

    return WrapValidator(validate)


def _untagged_errors(tags: frozenset[str]) -> WrapValidator:
    """Union tags dropped from the error paths of a tagged union field (``text.format.name``,
    not ``text.format.json_schema.name``)."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            errors = [_untagged(error, tags) for error in exc.errors()]
            raise ValidationError.from_exception_data(exc.title, errors) from None

    return WrapValidator(validate)


def _untagged(error: Any, tags: frozenset[str]) -> InitErrorDetails:
    loc = error["loc"]
    # A tag names the union member: first in the path, or right after a list index.
    kept = tuple(s for i, s in enumerate(loc) if not (s in tags and (i == 0 or isinstance(loc[i - 1], int))))
    kind = error["type"]
    # The element's own ``type`` is what is wrong (unless an inner list's validator said so).
    wrong_type = kind in {"union_tag_invalid", _UNSUPPORTED_ITEM} and isinstance(error["input"], dict)
    if wrong_type and kept and isinstance(kept[-1], int):
        kept = (*kept, "type")
    # pydantic re-raises only the error types it knows by name; ours travels as a custom error.
    details: InitErrorDetails = {
        "type": PydanticCustomError(kind, error["msg"]) if kind == _UNSUPPORTED_ITEM else kind,
        "loc": kept,
        "input": error["input"],
    }
    if "ctx" in error:
        details["ctx"] = error["ctx"]
    return details


_PART_TAGS = frozenset({"input_text", "output_text"})
TextContent = Annotated[str | list[TextPartParam], _by_shape(TypeAdapter(list[TextPartParam]), _PART_TAGS)]


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: TextContent
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallItem(_Request):
    """A call the model made earlier (the client sends the conversation back whole)."""

    type: Literal["function_call"]
    call_id: CallId
    name: FunctionName
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(_Request):
    """A function's result, answering the call ``call_id``."""

    type: Literal["function_call_output"]
    call_id: CallId
    output: TextContent
    id: str | None = None
    status: ItemStatus | None = None


def _item_type(value: Any) -> str | None:
    # A message may leave ``type`` out (OpenAI's EasyInputMessage).
    if isinstance(value, dict):
        kind = value.get("type", "message")
        return kind if isinstance(kind, str) else None
    return getattr(value, "type", None)


_ITEM_TAGS = frozenset({"message", "function_call", "function_call_output"})
_UNSUPPORTED_ITEM = "unsupported_input_item"
InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(
        _item_type,
        custom_error_type=_UNSUPPORTED_ITEM,
        custom_error_message="an input item must be an object of type 'message', 'function_call' or "
        "'function_call_output'",
    ),
]
Input = Annotated[str | list[InputItem], _by_shape(TypeAdapter(list[InputItem]), _ITEM_TAGS)]


def _function_only(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError(
            "unsupported_tool",
            "only function tools are supported; built-in tools (web_search, file_search, "
            "code_interpreter, computer_use...) are not",
        ) from None


class FunctionToolParam(_Request):
    type: Annotated[Literal["function"], WrapValidator(_function_only)]
    name: FunctionName
    description: str | None = None
    # A JSON Schema object; vLLM compiles it into the grammar that constrains forced calls.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Request):
    type: Literal["function"]
    name: FunctionName


class TextFormatText(_Request):
    type: Literal["text"]


class TextFormatJsonObject(_Request):
    type: Literal["json_object"]


class TextFormatJsonSchema(_Request):
    type: Literal["json_schema"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")]
    strict: bool | None = None


TextFormat = Annotated[
    TextFormatText | TextFormatJsonObject | TextFormatJsonSchema,
    Field(discriminator="type"),
    _untagged_errors(frozenset({"text", "json_object", "json_schema"})),
]


class TextConfig(_Request):
    format: TextFormat | None = None
    # Accepted and echoed; an open model has no verbosity control to pass it to.
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Request):
    effort: ReasoningEffort | None = None
    # Accepted and echoed; no reasoning summary is produced (no reasoning items are returned).
    summary: Literal["auto", "concise", "detailed"] | None = None


class StreamOptions(_Request):
    include_obfuscation: bool | None = None  # the gateway never pads events, so nothing to turn off


# Known ``include`` values that ask for nothing the gateway could return: items of built-in
# tools (refused), images (refused), reasoning (no reasoning items are produced). Log
# probabilities are refused instead: the answer would silently lack them.
Includable = Literal[
    "reasoning.encrypted_content",
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "message.input_image.image_url",
]
# OpenAI's bounds: at most 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]
_INT64 = 2**63


class ResponsesRequest(_Request):
    """The allow-list of ``POST /v1/responses``; anything else is a 400. Bounds that depend on
    configuration are checked by the chat request it becomes."""

    model: str = "auto"
    input: Input
    instructions: str | None = None
    tools: Annotated[list[FunctionToolParam], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Field(ge=1, lt=_INT64)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: Metadata | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # Accepted, nothing is stored either way: the gateway keeps no state between requests.
    store: bool | None = None
    include: list[Includable] | None = None
    truncation: Literal["disabled"] | None = None
    # Refused by the translation with a message saying why (the gateway keeps no state).
    previous_response_id: str | None = None
    # Caching and abuse-tracking hints for OpenAI's own servers: accepted and ignored (vLLM
    # caches prefixes by itself).
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: Annotated[str, Field(max_length=64)] | None = None
    # hybrid-serve extension: retrieval-augmented answer, as on chat completions
    rag: Literal["auto", "on", "off"] = "auto"


# ---------------------------------------------------------------------------- responses


class _Wire(BaseModel):
    """On the way out ``None`` is omitted, except where OpenAI's schema requires the field
    present even when null."""

    keep_null: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in self.keep_null}


class OutputText(_Wire):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputMessage(_Wire):
    id: str
    type: Literal["message"] = "message"
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(_Wire):
    id: str
    type: Literal["function_call"] = "function_call"
    status: ItemStatus
    call_id: str
    name: str
    arguments: str


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(_Wire):
    cached_tokens: int = 0
    cache_write_tokens: int = 0  # an OpenAI billing figure; vLLM's prefix cache reports none


class OutputTokensDetails(_Wire):
    reasoning_tokens: int = 0


class ResponseUsage(_Wire):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(_Wire):
    code: Literal["server_error"] = "server_error"
    message: str


class IncompleteDetails(_Wire):
    reason: Literal["max_output_tokens", "content_filter"]


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseObject(_Wire):
    """OpenAI's ``Response``: the result, and the request's settings echoed as OpenAI does."""

    keep_null: ClassVar[frozenset[str]] = frozenset(
        {
            "error",
            "incomplete_details",
            "instructions",
            "metadata",
            "temperature",
            "top_p",
            "completed_at",
            "reasoning",
            "max_output_tokens",
            "previous_response_id",
        }
    )
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled"] = "disabled"
    metadata: dict[str, str] | None = None
    user: str | None = None
    previous_response_id: None = None  # never anything else: the gateway keeps no state
    store: Literal[False] = False  # nothing is stored, whatever the request said
    usage: ResponseUsage | None = None
    route: RouteDecision | None = None  # hybrid-serve extension
