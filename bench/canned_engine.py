"""A stand-in engine that answers every chat request at once with the same vLLM-shaped body:
with it, what the gateway costs is measured apart from the real engine's competition for the
CPU. Run by ``bench.gateway_overhead`` under uvicorn; never by the service."""

from __future__ import annotations

import json

from starlette.types import Receive, Scope, Send

MODEL = "SmolLM2-135M-Instruct"
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-canned",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!", "refusal": None, "annotations": None},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": 31,
            "total_tokens": 35,
            "completion_tokens": 4,
            "prompt_tokens_details": None,
        },
    }
).encode()
_MODELS = json.dumps(
    {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "vllm", "parent": None}],
    }
).encode()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = _MODELS if scope["path"] == "/v1/models" else _COMPLETION
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})
