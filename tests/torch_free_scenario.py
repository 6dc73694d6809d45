"""What ``python -m tests.torch_free gateway`` does, once torch and the extras are blocked: the
gateway built over the fake engine on a loopback port, through its HTTP surface (chat, an adapter
uploaded and validated, a collection ingested and retrieved with the real ONNX embedder, the
embeddings route, a router fit), then each entry point that needs an extra, which must say which.

Imported only after :mod:`tests.torch_free` installed its blocker.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from adapters.extras import MissingExtraError
from adapters.manifest import WEIGHTS_FILE
from index.bundled_embedder import BundledEmbedderMissingError
from service.app import build_app
from service.bundled_model import HF_ID, SERVED_NAME, ensure_bundled_model
from service.settings import Settings
from tests.api.admin_support import AUTH, TOKEN, upload
from tests.fakes import FakeEngine
from tests.safetensors_layout import LAYOUTS, rewritten
from tests.vllm_bodies import model_card

CHAT = "/v1/chat/completions"
REFUNDS = "Refunds are paid back to the original card within fourteen days of the returned parcel arriving."
SHIPPING = "Standard shipping takes three to five working days; express delivery arrives the next day."
LABELLED = [
    {"text": "Arr, tell me about the seven seas, matey", "label": "pirate"},
    {"text": "Talk like a buccaneer about buried treasure", "label": "pirate"},
    {"text": "Where did the pirates hide their gold doubloons?", "label": "pirate"},
    {"text": "Who wrote Pride and Prejudice?", "label": "base"},
    {"text": "What is the capital of Norway?", "label": "base"},
    {"text": "How many days are in a leap year?", "label": "base"},
]
REPORT_MARK = "TORCH-FREE-REPORT "


def run(spec_file: str, attempts: set[str], loaded: Callable[[], list[str]]) -> None:
    """Run the scenario of ``spec_file`` and print the report as one marked line."""
    spec = json.loads(Path(spec_file).read_text())
    report = asyncio.run(_gateway(spec))
    report["attempted_by_gateway"] = sorted(attempts)
    report["extras"] = _extras(spec)
    report["attempted"] = sorted(attempts)
    report["loaded"] = loaded()
    print(REPORT_MARK + json.dumps(report), flush=True)


async def _gateway(spec: dict[str, str]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    adapter = Path(spec["adapter_dir"])
    engine = FakeEngine(models=[model_card(SERVED_NAME)])
    await engine.start()
    try:
        settings = Settings(
            engine_url=engine.url,
            data_dir=Path(spec["data_dir"]),
            cache_dir=Path(spec["cache_dir"]),
            admin_token=TOKEN,
            base_model_dir=Path(spec["base_dir"]),
            base_model_hf_id=HF_ID,
            max_lora_rank=16,
        )
        app = build_app(settings)
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app.state.adapters.wait_reconciled(), timeout=30)
            report["embedder"] = app.state.knowledge.embedder.name
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
                engine.enqueue_completion("Hello from a gateway without torch.")
                chat = await client.post(CHAT, json=_chat("Say hello.", rag="off"))
                report["chat"] = [chat.status_code, chat.json()["choices"][0]["message"]["content"]]

                added = await upload(client, "pirate", adapter, description="Pirate talk")
                report["upload"] = [added.status_code, added.json().get("target_modules")]
                report["engine_loaded"] = [body.get("lora_name") for body in engine.load_requests]
                broken = rewritten(adapter / WEIGHTS_FILE, LAYOUTS["gap"])
                refused = await upload(client, "broken", adapter, weights=broken)
                report["refused"] = [refused.status_code, refused.json()]

                documents = [
                    {"source": "refunds.md", "text": REFUNDS},
                    {"source": "shipping.md", "text": SHIPPING},
                ]
                ingest = await client.post(
                    "/admin/collections/handbook/documents", json={"documents": documents}, headers=AUTH
                )
                report["ingest"] = [ingest.status_code, ingest.json().get("chunks")]
                engine.enqueue_completion("Fourteen days.")
                rag = await client.post(CHAT, json=_chat("How long does a refund take?", rag="on"))
                sources = rag.json()["route"]["rag"]["sources"] if rag.status_code == 200 else []
                report["retrieved"] = [rag.status_code, [source["source"] for source in sources]]

                vectors = await client.post(
                    "/v1/embeddings", json={"model": report["embedder"], "input": ["refunds", "shipping"]}
                )
                report["embeddings"] = [
                    vectors.status_code,
                    [len(d["embedding"]) for d in vectors.json()["data"]],
                ]

                fit = await client.post("/admin/router/fit", json={"examples": LABELLED}, headers=AUTH)
                report["fit"] = [fit.status_code, fit.json().get("classes")]
    finally:
        await engine.stop()
    return report


def _chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": content}], **fields}


def _extras(spec: dict[str, str]) -> dict[str, Any]:
    """Each entry point that needs an extra, called here: the error it raised (type, extra,
    message), or what it returned."""
    empty = Path(spec["empty_cache"])
    copy = Path(spec["embedder_copy"])

    def bundled_model() -> object:
        return ensure_bundled_model(empty)

    def onnx_export() -> object:
        from index.onnx_embedder import ensure_onnx_model

        return ensure_onnx_model(copy, empty)

    def torch_backend() -> object:
        from index.embedder import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder(copy)

    def router_eval_plot() -> object:
        import service.router_eval_plot

        return service.router_eval_plot

    def no_embedder_files() -> object:
        from index.embedder import bundled_embedder_path

        return bundled_embedder_path(empty)

    calls: Iterable[tuple[str, Callable[[], object]]] = [
        ("bundled_model", bundled_model),
        ("onnx_export", onnx_export),
        ("torch_backend", torch_backend),
        ("router_eval_plot", router_eval_plot),
        ("no_embedder_files", no_embedder_files),
    ]
    outcomes: dict[str, Any] = {}
    for name, call in calls:
        try:
            outcomes[name] = {"returned": repr(call())}
        except MissingExtraError as error:
            outcomes[name] = {"error": type(error).__name__, "extra": error.extra, "message": str(error)}
        except BundledEmbedderMissingError as error:
            outcomes[name] = {"error": type(error).__name__, "message": str(error)}
        except Exception as error:
            print(traceback.format_exc(), file=sys.stderr)
            outcomes[name] = {"error": type(error).__name__, "message": str(error)}
    return outcomes
