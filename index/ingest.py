"""Ingestion: parsed documents to chunks to vectors to the store.

Chunk ids are ``<sha256(source)>-<sha256(document)>-<position>`` (each hash cut to 16 hex
digits): the same document ingested twice yields the same ids, and is not embedded again; a
changed document yields new ids, which replace the old ones. Everything is parsed, chunked and
embedded before the first write, so a request that fails writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from index.chunking import Chunk, ChunkingPolicy, chunk_document, searchable_text
from index.documents import SourceDocument
from index.embedder import Embedder, Vectors
from index.errors import CollectionNotFound, DocumentError
from index.store import NEVER_EXPIRES, ChunkStore, StoredChunk, validate_collection_name

EMBED_SLICE = 128


@dataclass(frozen=True)
class IngestResult:
    documents: int
    chunks: int
    unchanged: int  # documents already stored with the same content: not embedded again
    tokens: int  # embedder tokens of the chunks that were embedded


@dataclass(frozen=True)
class _Prepared:
    document: SourceDocument
    chunks: list[Chunk]
    ids: list[str]


class Ingestor:
    """Writes documents into collections; one writer per collection at a time."""

    def __init__(
        self,
        store: ChunkStore,
        embedder: Embedder,
        policy: ChunkingPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._embedder = embedder
        self.policy = policy or ChunkingPolicy()
        self._clock = clock
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def ingest(
        self, collection: str, documents: Sequence[SourceDocument], *, volatile: bool | None = None
    ) -> IngestResult:
        validate_collection_name(collection)
        if not documents:
            raise DocumentError("no documents to ingest", param="documents")
        sources = [document.source for document in documents]
        if len(set(sources)) != len(sources):
            duplicate = next(source for source in sources if sources.count(source) > 1)
            raise DocumentError(f"source {duplicate!r} appears twice in one request", param="documents")
        prepared = [self._prepare(document) for document in documents]
        with self._lock(collection):
            stored = self._stored_ids(collection, [item.document.source for item in prepared])
            changed = [item for item in prepared if stored.get(item.document.source, set()) != set(item.ids)]
            texts = [
                searchable_text(chunk.text, chunk.heading, item.document.title)
                for item in changed
                for chunk in item.chunks
            ]
            vectors = self._embed(texts)
            expiring = any(item.document.expires_at is not None for item in prepared)
            self._store.ensure_collection(collection, volatile=volatile, expiring=expiring)
            now = self._clock()
            chunks = [
                StoredChunk(id_, chunk.text, _metadata(item.document, chunk, len(item.chunks), now))
                for item in changed
                for id_, chunk in zip(item.ids, item.chunks, strict=True)
            ]
            stale = {
                id_ for item in changed for id_ in stored.get(item.document.source, set()) - set(item.ids)
            }
            # One write for the whole request: per-document round trips cost a third of the
            # embedder's time on 500 abstracts.
            self._store.write_chunks(collection, chunks, vectors, stale)
            # Expired chunks are already hidden from retrieval; this is where they go for good.
            self._store.delete_expired(collection, now)
        return IngestResult(
            documents=len(prepared),
            chunks=sum(len(item.chunks) for item in prepared),
            unchanged=len(prepared) - len(changed),
            tokens=sum(chunk.tokens for item in changed for chunk in item.chunks),
        )

    def delete_document(self, collection: str, source: str) -> int:
        with self._lock(collection):
            return self._store.delete_document(collection, source)

    def delete_collection(self, collection: str) -> None:
        with self._lock(collection):
            self._store.delete_collection(collection)

    def _embed(self, texts: list[str]) -> Vectors:
        # In slices, so that a query's embedding never waits behind a whole large upload.
        if not texts:
            return self._embedder.embed([])
        return np.concatenate(
            [
                self._embedder.embed(texts[start : start + EMBED_SLICE])
                for start in range(0, len(texts), EMBED_SLICE)
            ]
        )

    def _stored_ids(self, collection: str, sources: list[str]) -> dict[str, set[str]]:
        try:
            return self._store.chunk_ids_by_source(collection, sources)
        except CollectionNotFound:
            return {}

    def _prepare(self, document: SourceDocument) -> _Prepared:
        chunks = chunk_document(document, self._embedder.split_tokens, self.policy)
        if not chunks:
            raise DocumentError(f"document {document.source!r} has no text to index", param="documents")
        source_hash = _sha(document.source)
        document_hash = _sha(self._fingerprint(document, chunks))
        ids = [chunk_id(source_hash, document_hash, chunk.position) for chunk in chunks]
        return _Prepared(document, chunks, ids)

    def _fingerprint(self, document: SourceDocument, chunks: list[Chunk]) -> str:
        # Whatever changes what is stored changes the ids: text, metadata, and how it was cut
        # and embedded.
        return json.dumps(
            {
                "title": document.title,
                "metadata": dict(sorted(document.metadata.items())),
                "expires_at": document.expires_at.timestamp() if document.expires_at else None,
                "chunks": [[chunk.heading, chunk.page, chunk.text] for chunk in chunks],
                "policy": [self.policy.size, self.policy.overlap],
                "embedder": self._embedder.name,
            },
            sort_keys=True,
        )

    def _lock(self, collection: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(collection, threading.Lock())


def chunk_id(source_hash: str, document_hash: str, position: int) -> str:
    """A chunk's id: its source, the version of the document it belongs to, its position."""
    return f"{source_hash}-{document_hash}-{position:05d}"


def chunk_version(id_: str) -> str:
    """The document version a :func:`chunk_id` names (an id of another shape stands alone)."""
    parts = id_.split("-")
    return parts[1] if len(parts) == 3 else id_


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _metadata(
    document: SourceDocument, chunk: Chunk, count: int, now: float
) -> dict[str, str | int | float | bool]:
    metadata: dict[str, str | int | float | bool] = dict(document.metadata)
    metadata.update(
        source=document.source,
        position=chunk.position,
        chunks=count,
        ingested_at=now,
        expires_at=document.expires_at.timestamp() if document.expires_at else NEVER_EXPIRES,
    )
    if document.title:
        metadata["title"] = document.title
    if chunk.heading:
        metadata["heading"] = chunk.heading
    if chunk.page is not None:
        metadata["page"] = chunk.page
    return metadata
