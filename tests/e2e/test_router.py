"""``model: auto`` end to end: real adapters in the real engine, documents in a real Chroma
server, the real embedder. A domain prompt goes to its adapter, a question only a document
answers gets the document, small talk goes to the base model; overrides; the classifier refitted by
``hybrid-serve router fit``; and the index going away falls back to the base model.

The gateway is this test's own (attached to the session's engine), so that its adapters and
collections do not change where other tests' ``auto`` requests go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.bundled_model import HF_ID
from tests.api.test_router import BANKING, COOKING, EGG, SMALL_TALK, TRANSFER
from tests.e2e.conftest import ChromaServer
from tests.e2e.test_adapters import upload
from tests.harness import ADMIN_TOKEN, RunningService, running_service, wait_for_router
from tests.openai_schema import assert_conforms

pytestmark = pytest.mark.e2e

FACT = "The Quillmoor ferry to Ostrel Island leaves at 7:15am and returns at 2:40pm."

FERRY = "When does the Quillmoor ferry to Ostrel Island leave?"
BANKING_TRAFFIC = [
    "Send 50 euros to my brother's account",
    "Why was my debit card declined?",
    "How much money is in my savings account?",
    "I lost my bank card, block it please",
    "Open a new checking account for me",
]
COOKING_TRAFFIC = [
    "How do I make a fluffy omelette?",
    "What temperature should I roast a chicken at?",
    "Can I freeze cooked rice?",
    "Give me a quick pasta sauce recipe",
    "How do I caramelise onions?",
]
BASE_TRAFFIC = [
    "Good morning! How is your day going?",
    "Tell me a joke about penguins",
    "Who wrote Pride and Prejudice?",
    "Thanks, that's all for now",
    "What's your favourite colour?",
]


@pytest.fixture
def gateway(
    service: RunningService,
    chroma_server: ChromaServer,
    tmp_path: Path,
    lora_adapter: Path,
    other_lora_adapter: Path,
    bundled_base_dir: Path,
) -> Iterator[RunningService]:
    """A gateway with two adapters and one collection, its index on a Chroma server."""
    settings = {
        "admin_token": ADMIN_TOKEN,
        "chroma_url": chroma_server.url,
        # An external engine's model is not on this gateway's command line: say what it is, so
        # that adapters are checked against it.
        "base_model_dir": str(bundled_base_dir),
        "base_model_hf_id": HF_ID,
    }
    with running_service(tmp_path, engine_url=service.engine_url, **settings) as running:
        with running.admin() as admin:
            for name, adapter, examples in (
                ("e2e-banking", lora_adapter, BANKING),
                ("e2e-cooking", other_lora_adapter, COOKING),
            ):
                response = upload(
                    admin, name, adapter, examples=examples, description=f"{name[4:]} questions"
                )
                assert response.status_code == 201, response.text
            ingested = admin.post(
                "/admin/collections/ferries/documents",
                json={"documents": [{"source": "ferries.txt", "text": FACT}]},
            )
            assert ingested.status_code == 200, ingested.text
            wait_for_router(admin, {"e2e-banking", "e2e-cooking"})
        try:
            yield running
        finally:
            # The engine is shared with the rest of the session: leave it as it was.
            with running.admin() as admin:
                for name in ("e2e-banking", "e2e-cooking"):
                    admin.delete(f"/admin/adapters/{name}")


def chat(gateway: RunningService, prompt: str, **fields: Any) -> dict[str, Any]:
    """A real generation; the route it took, checked against the header."""
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 24,
    }
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json={**body, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert_conforms("CreateChatCompletionResponse", completion)
    assert completion["choices"][0]["message"]["content"]
    route: dict[str, Any] = completion["route"]
    assert response.headers["x-route"].startswith(f"adapter={route['adapter'] or 'none'}; ")
    return route


def test_auto_routes_each_request_where_it_belongs(gateway: RunningService) -> None:
    banking = chat(gateway, TRANSFER)
    assert banking["adapter"] == "e2e-banking"
    assert banking["rag"]["used"] is False
    assert banking["reason"].startswith("adapter 'e2e-banking'")

    assert chat(gateway, EGG)["adapter"] == "e2e-cooking"

    ferry = chat(gateway, FERRY)
    assert ferry["adapter"] is None
    assert [source["source"] for source in ferry["rag"]["sources"]] == ["ferries.txt"]
    assert ferry["scores"]["retrieval"] >= 0.45

    small_talk = chat(gateway, SMALL_TALK)
    assert small_talk == {**small_talk, "adapter": None, "rag": {"used": False, "sources": []}}
    assert small_talk["reason"].startswith("base model: best adapter")
    assert small_talk["scores"]["base"] > 0.5


def test_overrides_pin_the_adapter_and_force_retrieval(gateway: RunningService) -> None:
    pinned = chat(gateway, TRANSFER, model="e2e-cooking")
    assert pinned["adapter"] == "e2e-cooking"
    assert pinned["reason"].startswith("model names adapter 'e2e-cooking'")
    assert chat(gateway, FERRY, rag="off")["rag"]["used"] is False
    forced = chat(gateway, SMALL_TALK, rag="on")
    assert forced["rag"]["used"] is True


def test_a_stream_says_its_route_first(gateway: RunningService) -> None:
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": TRANSFER}],
        "stream": True,
        "max_tokens": 8,
    }
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["x-route"] == "adapter=e2e-banking; rag=off; sources=0"
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(first.removeprefix("data: "))["route"]["adapter"] == "e2e-banking"


def test_explain_and_fit_drive_the_router(gateway: RunningService, tmp_path: Path) -> None:
    with gateway.admin() as admin:
        explained = admin.post(
            "/admin/router/explain", json={"messages": [{"role": "user", "content": TRANSFER}]}
        )
        assert explained.status_code == 200, explained.text
        assert explained.json()["route"]["adapter"] == "e2e-banking"

    # Labelled traffic: more banking and cooking prompts, and small talk for the base model.
    data = tmp_path / "labels.jsonl"
    rows = [{"text": text, "label": "e2e-banking"} for text in BANKING_TRAFFIC]
    rows += [{"text": text, "label": "e2e-cooking"} for text in COOKING_TRAFFIC]
    rows += [{"text": text, "label": "base"} for text in BASE_TRAFFIC]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with gateway.admin() as admin:
        before = admin.get("/admin/router").json()["classifier"]["version"]
    env = {**os.environ, "HYBRID_GATEWAY_URL": gateway.url, "HYBRID_ADMIN_TOKEN": ADMIN_TOKEN}
    fitted = subprocess.run(
        [sys.executable, "-m", "service", "router", "fit", str(data)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fitted.returncode == 0, fitted.stderr
    assert f"stored as version {before + 1}" in fitted.stdout
    assert "out of fold (5 folds)" in fitted.stdout

    with gateway.admin() as admin:
        classifier = admin.get("/admin/router").json()["classifier"]
    # In force at once, no restart, and stored with the prompts it learnt from.
    assert classifier["version"] == before + 1
    assert classifier["fit_rows"] == len(rows)
    assert classifier["data"]["e2e-banking"]["fit"] == len(BANKING_TRAFFIC)
    assert classifier["data"]["base"]["fit"] == len(BASE_TRAFFIC)
    assert chat(gateway, TRANSFER)["adapter"] == "e2e-banking"
    assert chat(gateway, EGG)["adapter"] == "e2e-cooking"
    assert chat(gateway, "Good night, talk to you tomorrow!")["adapter"] is None


def test_the_index_going_away_falls_back_to_the_base_model(
    gateway: RunningService, chroma_server: ChromaServer
) -> None:
    chroma_server.process.terminate()
    chroma_server.process.wait(timeout=30)
    route = chat(gateway, TRANSFER)
    assert route["adapter"] is None
    assert route["rag"]["used"] is False
    assert route["reason"].startswith("router failed (index unavailable")
    # Retrieval demanded: a clear 503, not a 500.
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": FERRY}], "rag": "on", "max_tokens": 8},
        timeout=120,
    )
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "index_unavailable"
