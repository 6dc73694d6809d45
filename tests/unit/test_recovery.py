"""Crash recovery of the embedded index: ingestion interrupted where a kill -9 could stop it
(real chromadb on disk, the real embedder), then :func:`recover` as the gateway runs it at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from chromadb.api.models.Collection import Collection

from index.chunking import ChunkingPolicy
from index.embedder import Embedder, load_embedder
from index.ingest import Ingestor
from index.recovery import recover, unfinished_chunks
from index.store import ChunkStore, persistent_client
from tests.unit.test_index import long_document

POLICY = ChunkingPolicy(size=32, overlap=4)


class KilledError(Exception):
    """Stands for the process dying: nothing after the raise runs."""


class _DiesAfterUpserts:
    def __init__(self, collection: Collection, upserts: int) -> None:
        self._collection = collection
        self._left = upserts

    def upsert(self, **kwargs: Any) -> None:
        if self._left == 0:
            raise KilledError
        self._left -= 1
        self._collection.upsert(**kwargs)

    def delete(self, **kwargs: Any) -> None:
        raise KilledError  # the replaced version's chunks are deleted after the new ones landed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)


class DyingStore(ChunkStore):
    """A store whose process dies after ``upserts`` batches of one ingestion request."""

    def __init__(self, path: Path, embedder: Embedder, *, upserts: int, batch: int) -> None:
        super().__init__(persistent_client(str(path)), embedder=embedder.name)
        self._batch = batch
        self._upserts = upserts

    def _collection(self, name: str) -> Collection:
        return _DiesAfterUpserts(super()._collection(name), self._upserts)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder()


def _stored(path: Path, embedder: Embedder) -> tuple[ChunkStore, Ingestor]:
    store = ChunkStore(persistent_client(str(path)), embedder=embedder.name)
    return store, Ingestor(store, embedder, POLICY)


def _versions(store: ChunkStore, collection: str) -> dict[str, set[str]]:
    """source -> the document versions (the middle part of chunk ids) stored for it."""
    found: dict[str, set[str]] = {}
    for id_, metadata in store.chunk_metadata(collection):
        found.setdefault(str(metadata["source"]), set()).add(id_.split("-")[1])
    return found


def test_a_replacement_killed_before_the_old_version_went_keeps_the_new_one(
    tmp_path: Path, embedder: Embedder
) -> None:
    store, ingestor = _stored(tmp_path / "index", embedder)
    ingestor.ingest("notes", [long_document("a.md", "lighthouse"), long_document("b.md", "harbour")])
    old = store.chunk_ids("notes", "a.md")
    dying = DyingStore(tmp_path / "index", embedder, upserts=100, batch=5000)
    with pytest.raises(KilledError):
        Ingestor(dying, embedder, POLICY).ingest("notes", [long_document("a.md", "windmill")])
    store, ingestor = _stored(tmp_path / "index", embedder)
    assert len(_versions(store, "notes")["a.md"]) == 2  # both versions whole: the crash window

    assert recover(store) == len(old)

    assert {source: len(v) for source, v in _versions(store, "notes").items()} == {"a.md": 1, "b.md": 1}
    assert store.chunk_ids("notes", "a.md").isdisjoint(old)  # the new version stayed
    assert recover(store) == 0


def test_a_first_write_killed_halfway_leaves_nothing_of_it(tmp_path: Path, embedder: Embedder) -> None:
    store, ingestor = _stored(tmp_path / "index", embedder)
    ingestor.ingest("notes", [long_document("b.md", "harbour")])
    whole = store.chunk_ids("notes", "b.md")
    dying = DyingStore(tmp_path / "index", embedder, upserts=1, batch=2)
    with pytest.raises(KilledError):
        Ingestor(dying, embedder, POLICY).ingest("notes", [long_document("a.md", "windmill")])
    store, _ = _stored(tmp_path / "index", embedder)
    assert "a.md" in _versions(store, "notes")  # two chunks of it landed

    assert recover(store) == 2

    assert {id_ for id_, _ in store.chunk_metadata("notes")} == whole


def test_a_replacement_killed_halfway_keeps_the_old_version_whole(tmp_path: Path, embedder: Embedder) -> None:
    store, ingestor = _stored(tmp_path / "index", embedder)
    ingestor.ingest("notes", [long_document("a.md", "lighthouse")])
    before = {id_ for id_, _ in store.chunk_metadata("notes")}
    dying = DyingStore(tmp_path / "index", embedder, upserts=1, batch=2)
    with pytest.raises(KilledError):
        Ingestor(dying, embedder, POLICY).ingest("notes", [long_document("a.md", "windmill")])
    store, _ = _stored(tmp_path / "index", embedder)

    assert recover(store) == 2

    assert {id_ for id_, _ in store.chunk_metadata("notes")} == before


def _meta(source: str, position: int, chunks: int, at: float) -> dict[str, Any]:
    return {"source": source, "position": position, "chunks": chunks, "ingested_at": at}


def test_unfinished_chunks_keeps_the_newest_complete_version_of_each_source() -> None:
    chunks = [
        ("s1-old-00000", _meta("a", 0, 2, 1.0)),
        ("s1-old-00001", _meta("a", 1, 2, 1.0)),
        ("s1-new-00000", _meta("a", 0, 2, 2.0)),
        ("s1-new-00001", _meta("a", 1, 2, 2.0)),
        ("s2-half-00000", _meta("b", 0, 3, 3.0)),
        ("s2-half-00002", _meta("b", 2, 3, 3.0)),
        ("s3-one-00000", _meta("c", 0, 1, 1.0)),
    ]
    assert sorted(unfinished_chunks(chunks)) == [
        "s1-old-00000",
        "s1-old-00001",
        "s2-half-00000",
        "s2-half-00002",
    ]
    assert unfinished_chunks([]) == []
