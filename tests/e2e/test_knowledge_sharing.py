"""The index outside one gateway: a Chroma server shared by two gateways, and documents that
survive the gateway being killed.

The extra gateways attach to the session's engine (``HYBRID_ENGINE_URL``) instead of starting
their own, which keeps these tests to seconds."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ChromaServer
from tests.harness import ADMIN_TOKEN, RunningService, running_service

pytestmark = pytest.mark.e2e

FACT = "The Zentoria loyalty programme gives 3 points per 17 euros spent."
QUESTION = "How many points per euros spent does the Zentoria loyalty programme give?"


def ingest(gateway: RunningService, collection: str, source: str, text: str) -> httpx.Response:
    with gateway.admin() as admin:
        return admin.post(
            f"/admin/collections/{collection}/documents",
            json={"documents": [{"source": source, "text": text}]},
        )


def retrieved_sources(gateway: RunningService, question: str) -> list[str]:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": question}], "rag": "on", "max_tokens": 8},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return [source["source"] for source in response.json()["route"]["rag"]["sources"]]


def test_two_gateways_share_a_chroma_server(
    service: RunningService, chroma_server: ChromaServer, tmp_path: Path
) -> None:
    settings = {"admin_token": ADMIN_TOKEN, "chroma_url": chroma_server.url}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        running_service(tmp_path / "a", engine_url=service.engine_url, **settings) as first,
        running_service(tmp_path / "b", engine_url=service.engine_url, **settings) as second,
    ):
        assert ingest(first, "loyalty", "loyalty.txt", FACT).status_code == 200
        # Written through one gateway, found through the other: the index is the server's.
        assert retrieved_sources(second, QUESTION)[0] == "loyalty.txt"
        with second.admin() as admin:
            listed = admin.get("/admin/collections").json()["data"]
            assert [(c["name"], c["documents"]) for c in listed] == [("loyalty", 1)]
            assert admin.delete("/admin/collections/loyalty/documents/loyalty.txt").status_code == 200
        assert "loyalty.txt" not in retrieved_sources(first, QUESTION)
    # Nothing was written under either gateway's own data directory.
    assert not (tmp_path / "a" / "index").exists()
    assert not (tmp_path / "b" / "index").exists()


def test_acknowledged_documents_survive_a_killed_gateway(service: RunningService, tmp_path: Path) -> None:
    data_dir = tmp_path / "gateway"
    data_dir.mkdir()
    settings = {"admin_token": ADMIN_TOKEN}
    with running_service(data_dir, engine_url=service.engine_url, **settings) as gateway:
        acknowledged = [f"note-{n}.txt" for n in range(5)]
        for n, source in enumerate(acknowledged):
            assert ingest(gateway, "notes", source, f"Memo {n}: {FACT}").status_code == 200
        # No clean shutdown: whatever chromadb had not put on disk by now is lost.
        os.kill(gateway.process.pid, signal.SIGKILL)
        gateway.process.wait(timeout=30)
    with running_service(data_dir, engine_url=service.engine_url, **settings) as restarted:
        with restarted.admin() as admin:
            listed = admin.get("/admin/collections").json()["data"]
        assert [(c["name"], c["documents"], c["chunks"]) for c in listed] == [("notes", 5, 5)]
        assert set(retrieved_sources(restarted, QUESTION)) <= set(acknowledged)
        assert retrieved_sources(restarted, QUESTION)
