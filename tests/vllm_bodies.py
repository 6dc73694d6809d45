"""vLLM's response bodies as the fake engine and the tests build them: model cards, completions,
stream chunks, usage and errors, nulls and extra fields included, as vLLM sends them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

BASE_MODEL = "tiny-base"
MAX_MODEL_LEN = 2048
CREATED = 1_700_000_000


def model_card(model_id: str = BASE_MODEL, *, parent: str | None = None) -> dict[str, Any]:
    """One entry of vLLM's ``/v1/models``, with its ``root`` and ``permission`` extensions."""
    return {
        "id": model_id,
        "object": "model",
        "created": CREATED,
        "owned_by": "vllm",
        "root": f"/models/{model_id}",
        "parent": parent,
        "max_model_len": MAX_MODEL_LEN,
        "permission": [
            {
                "id": f"modelperm-{model_id}",
                "object": "model_permission",
                "created": CREATED,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


def lora_card(name: str, path: str, *, parent: str | None) -> dict[str, Any]:
    """A loaded LoRA adapter in vLLM's ``/v1/models``: its path as ``root``, the base as ``parent``."""
    return {
        "id": name,
        "object": "model",
        "created": CREATED,
        "owned_by": "vllm",
        "root": path,
        "parent": parent,
        "max_model_len": None,
        "permission": model_card(name)["permission"],
    }


def usage(prompt_tokens: int = 12, completion_tokens: int = 5) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def completion(
    content: str = "Hello there!",
    *,
    model: str = BASE_MODEL,
    finish_reason: str = "stop",
    prompt_tokens: int = 12,
    completion_tokens: int = 5,
) -> dict[str, Any]:
    """A non-streamed completion as vLLM sends it: nulls OpenAI's schema forbids included."""
    return {
        "id": "chatcmpl-fake0001",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning": None,
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "token_ids": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens),
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "kv_transfer_params": None,
    }


def chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish_reason: str | None = None,
    model: str = BASE_MODEL,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` as vLLM streams it."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-fake0002",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
                "token_ids": None,
            }
        ],
    }


def usage_chunk(
    prompt_tokens: int = 12, completion_tokens: int = 3, *, model: str = BASE_MODEL
) -> dict[str, Any]:
    """vLLM's last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {
        "id": "chatcmpl-fake0002",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def stream_chunks(*pieces: str, with_usage: bool = True) -> list[dict[str, Any]]:
    """A whole generation: the role chunk, one chunk per piece, the finish chunk, the usage."""
    chunks = [chunk("", role="assistant")]
    chunks += [chunk(piece) for piece in pieces]
    chunks.append(chunk("", finish_reason="stop"))
    if with_usage:
        chunks.append(usage_chunk(completion_tokens=len(pieces)))
    return chunks


def error_body(message: str, *, status: int, error_type: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's error body (``code`` is the HTTP status, an int)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def prompt_tokens(messages: Sequence[Any]) -> int:
    """The fake's token count of a chat prompt: a character count over four, plus four tokens
    of chat template per message (deterministic, so a test can predict what fits)."""
    characters = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            characters += len(content)
        elif isinstance(content, list):
            characters += sum(len(str(part.get("text", ""))) for part in content if isinstance(part, dict))
    return characters // 4 + 4 * len(messages)


def tool_call(name: str, arguments: str, *, call_id: str = "chatcmpl-tool-0001") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_call_completion(*calls: dict[str, Any], finish_reason: str = "tool_calls") -> dict[str, Any]:
    """A completion that calls tools, as vLLM's tool parser sends it: ``content`` is ""."""
    body = completion("", finish_reason=finish_reason)
    body["choices"][0]["message"]["tool_calls"] = list(calls)
    return body


def tool_call_chunks(
    name: str, *argument_pieces: str, call_id: str = "chatcmpl-tool-0001"
) -> list[dict[str, Any]]:
    """A streamed call as vLLM sends it: the role, the call's id and name, its arguments in
    pieces (content null beside them), the finish chunk, the usage."""

    def piece(call: dict[str, Any]) -> dict[str, Any]:
        event = chunk()
        event["choices"][0]["delta"] = {"content": None, "tool_calls": [{"index": 0, **call}]}
        return event

    events = [
        chunk("", role="assistant"),
        piece({"id": call_id, "type": "function", "function": {"name": name}}),
    ]
    events += [piece({"function": {"arguments": arguments}}) for arguments in argument_pieces]
    events.append(chunk(finish_reason="tool_calls"))
    events.append(usage_chunk(completion_tokens=len(argument_pieces)))
    return events
