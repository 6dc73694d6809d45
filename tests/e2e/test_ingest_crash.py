"""A gateway killed with SIGKILL in the middle of ingestion (new documents and replacements):
after a restart on the same data directory every acknowledged document is there, and every
stored document is one whole version, never a mix or a part. The gateway attaches to the
session's engine; the index is the embedded chromadb under its data directory."""

from __future__ import annotations

import re
import signal
import threading
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from index.store import ChunkStore, persistent_client
from tests.harness import ADMIN_TOKEN, RunningService, running_service

pytestmark = pytest.mark.e2e

WORKERS = 3
DOCUMENTS = 4
KILL_AFTER = 8
COLLECTION = "manuals"
TAG = re.compile(r"(?<![\w-])w\d+-d\d+-r\d+\.txt@\d+(?!\d)")
"""A version tag, ``<source>@<request round>``: every chunk of a version names it several times."""


def _text(tag: str) -> str:
    """A document of several chunks, each of which names its version ``tag``."""
    return "\n\n".join(
        f"Section {n} of {tag}. The pump in model {tag} is serviced every {n + 3} months; the filter "
        f"is replaced when its pressure drop passes {n + 12} kilopascals, as printed in {tag}."
        for n in range(12)
    )


def _stored_versions(data_dir: Path) -> dict[str, list[tuple[int, int, str]]]:
    """source -> (position, declared chunk count, version tag) of each stored chunk."""
    # Only read: the embedder's name matters to writes alone.
    store = ChunkStore(persistent_client(str(data_dir / "index")), embedder="unused")
    found: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    texts = dict(zip(*_ids_and_texts(store), strict=True))
    for id_, metadata in store.chunk_metadata(COLLECTION):
        tags = set(TAG.findall(texts[id_]))
        assert len(tags) == 1, f"chunk {id_} names versions {tags}: {texts[id_]!r}"
        found[str(metadata["source"])].append(
            (int(metadata["position"]), int(metadata["chunks"]), tags.pop())
        )
    return found


def _ids_and_texts(store: ChunkStore) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    for page_ids, page_texts in store.corpus(COLLECTION):
        ids += page_ids
        texts += page_texts
    return ids, texts


def test_kill_9_during_ingestion_loses_nothing_acknowledged(service: RunningService, tmp_path: Path) -> None:
    data_dir = tmp_path / "gateway"
    data_dir.mkdir()
    settings = {"admin_token": ADMIN_TOKEN, "chunk_tokens": "64", "chunk_overlap_tokens": "8"}
    acknowledged: dict[str, str] = {}  # source -> the version tag last acknowledged
    attempted: dict[str, set[str]] = defaultdict(set)  # source -> every tag sent for it
    count = 0
    enough = threading.Event()
    lock = threading.Lock()

    with running_service(data_dir, engine_url=service.engine_url, **settings) as gateway:

        def keep_ingesting(worker: int) -> None:
            nonlocal count
            with gateway.admin() as admin:
                for round_ in range(1000):
                    # Every other request replaces the worker's previous documents.
                    sources = [f"w{worker}-d{d}-r{round_ // 2}.txt" for d in range(DOCUMENTS)]
                    tags = [f"{source}@{round_}" for source in sources]
                    with lock:
                        for source, tag in zip(sources, tags, strict=True):
                            attempted[source].add(tag)
                    documents = [
                        {"source": source, "text": _text(tag)}
                        for source, tag in zip(sources, tags, strict=True)
                    ]
                    try:
                        response = admin.post(
                            f"/admin/collections/{COLLECTION}/documents", json={"documents": documents}
                        )
                    except httpx.HTTPError:
                        return  # the gateway died under this request: not acknowledged
                    assert response.status_code == 200, response.text
                    with lock:
                        acknowledged.update(zip(sources, tags, strict=True))
                        count += 1
                        if count >= KILL_AFTER:
                            enough.set()

        workers = [threading.Thread(target=keep_ingesting, args=(w,)) for w in range(WORKERS)]
        for worker in workers:
            worker.start()
        assert enough.wait(timeout=300), "ingestion requests did not go through"
        gateway.process.send_signal(signal.SIGKILL)
        for worker in workers:
            worker.join(timeout=60)

    in_flight = {tag for tags in attempted.values() for tag in tags} - set(acknowledged.values())
    assert in_flight, "no ingestion was in flight when the gateway was killed: nothing tested"
    with (
        running_service(data_dir, engine_url=service.engine_url, **settings) as restarted,
        restarted.admin() as admin,
    ):
        listed = {c["name"]: c for c in admin.get("/admin/collections").json()["data"]}
    # Inspected once the restarted gateway is gone (an embedded index has one owner).
    stored = _stored_versions(data_dir)
    assert set(acknowledged) <= set(stored), "an acknowledged document is missing"
    assert set(stored) <= set(attempted)
    assert listed[COLLECTION]["documents"] == len(stored)
    for source, chunks in stored.items():
        tags = {tag for _, _, tag in chunks}
        assert len(tags) == 1, f"{source}: a mix of versions {tags}"
        (declared,) = {count for _, count, _ in chunks}
        assert sorted(position for position, _, _ in chunks) == list(range(declared)), f"{source}: partial"
        # The last acknowledged version, or one sent after it that was in flight.
        (tag,) = tags
        assert tag == acknowledged.get(source) or tag in in_flight, f"{source}: {tag}"
