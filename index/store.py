"""Chunks in chromadb: one collection per name, created with HNSW parameters chosen here.

Every call blocks; the gateway runs them in a thread. Request data never reaches chromadb as an
embedding function or a raw ``where`` filter: collections are created without an embedding
function (vectors come from our embedder) and the only filters are built below.

Collection metadata records what a collection was embedded with, whether it is volatile, and a
``revision`` that every write changes, so caches built from a collection (the lexical index)
can tell when they are stale, even when another gateway wrote to the same Chroma server.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import chromadb
import httpx
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.config import Settings as ChromaSettings
from chromadb.errors import ChromaError, NotFoundError

from index.chunking import searchable_text
from index.embedder import Vectors
from index.errors import CollectionNotFound, DocumentError, DocumentNotFound, IndexUnavailable

# Chroma's own rule is 3-512 characters; 63 keeps names readable in URLs and metrics.
_COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")
_IPV4 = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
# Stored on chunks without an expiry so one numeric filter covers every chunk (9999-12-31).
NEVER_EXPIRES = 253402300799.0
ChunkMetadata = Mapping[str, str | int | float | bool]
# Sources looked up per metadata query when an ingestion checks what is stored.
_SOURCES_PER_QUERY = 500


@dataclass(frozen=True)
class HnswParams:
    """Fixed when a collection is created (changing them here affects new collections only).
    Chroma 1.5.9's defaults (M=16, ef_construction=100, ef_search=100) gave recall@10 0.934
    against exact search at 100k chunks in ``bench/retrieval.py``; these gave 0.991, with a
    hybrid search p99 near 11 ms."""

    max_neighbors: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def configuration(self) -> dict[str, Any]:
        return {
            "hnsw": {
                "space": "cosine",
                "max_neighbors": self.max_neighbors,
                "ef_construction": self.ef_construction,
                "ef_search": self.ef_search,
            }
        }


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    chunks: int
    documents: int
    volatile: bool
    revision: str
    embedder: str
    expiring: bool


@dataclass(frozen=True)
class StoredChunk:
    id: str
    text: str
    metadata: ChunkMetadata


@dataclass(frozen=True)
class Match:
    id: str
    text: str
    metadata: ChunkMetadata
    similarity: float


def validate_collection_name(name: str) -> str:
    # Chroma also refuses ".." and names shaped like IPv4 addresses: refuse them here, as a
    # 400 that says so, rather than let chroma's refusal surface as a 503.
    if not _COLLECTION_NAME.fullmatch(name) or ".." in name or _IPV4.fullmatch(name):
        raise DocumentError(
            f"invalid collection name {name!r}: use 3-63 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit, without '..' and not shaped like an IP address",
            param="name",
        )
    return name


def persistent_client(path: str) -> ClientAPI:
    return chromadb.PersistentClient(path=path, settings=ChromaSettings(anonymized_telemetry=False))


def http_client(url: str) -> ClientAPI:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"HYBRID_CHROMA_URL must be an http(s) URL, got {url!r}")
    return chromadb.HttpClient(
        host=parts.hostname,
        port=parts.port or (443 if parts.scheme == "https" else 80),
        ssl=parts.scheme == "https",
        settings=ChromaSettings(anonymized_telemetry=False),
    )


class ChunkStore:
    """The chunks of every collection, with what retrieval and ingestion need of them."""

    def __init__(self, client: ClientAPI, *, embedder: str, hnsw: HnswParams | None = None) -> None:
        self._client = client
        self._embedder = embedder
        self._hnsw = hnsw or HnswParams()
        self._batch = max(1, min(client.get_max_batch_size(), 5000))

    # -- collections

    def collection_names(self) -> list[str]:
        with _translated():
            return sorted(collection.name for collection in self._client.list_collections())

    def info(self, name: str) -> CollectionInfo:
        collection = self._collection(name)
        with _translated():
            chunks = collection.count()
            documents = len(collection.get(where={"position": 0}, include=[])["ids"])
        return _info(name, collection.metadata, chunks=chunks, documents=documents)

    def describe(self, name: str) -> CollectionInfo:
        """Flags and revision only (no counting): cheap enough for every query."""
        return _info(name, self._collection(name).metadata, chunks=-1, documents=-1)

    def ensure_collection(self, name: str, *, volatile: bool | None, expiring: bool) -> None:
        """Create ``name`` if needed; set ``volatile`` when given; remember expiring chunks."""
        validate_collection_name(name)
        with _translated():
            collection = self._client.get_or_create_collection(
                name,
                embedding_function=None,
                configuration=cast(Any, self._hnsw.configuration()),
                metadata={"volatile": bool(volatile), "embedder": self._embedder, "revision": _revision()},
            )
        metadata = dict(collection.metadata or {})
        embedder = metadata.get("embedder")
        if embedder != self._embedder:
            raise DocumentError(
                f"collection {name!r} was embedded with {embedder!r}, not {self._embedder!r}; "
                "delete it and ingest again to change the embedder",
                param="name",
            )
        changed = dict(metadata)
        if volatile is not None:
            changed["volatile"] = volatile
        if expiring:
            changed["expiring"] = True
        if changed != metadata:
            with _translated():
                collection.modify(metadata=changed)

    def delete_collection(self, name: str) -> None:
        validate_collection_name(name)
        try:
            with _translated():
                self._client.delete_collection(name)
        except CollectionNotFound:
            raise
        except NotFoundError as exc:
            raise CollectionNotFound(name) from exc

    # -- documents

    def chunk_ids(self, name: str, source: str) -> set[str]:
        return self.chunk_ids_by_source(name, [source]).get(source, set())

    def chunk_ids_by_source(self, name: str, sources: Sequence[str]) -> dict[str, set[str]]:
        """The stored chunk ids of each of ``sources`` that has any, in few round trips."""
        collection = self._collection(name)
        found: dict[str, set[str]] = {}
        unique = sorted(set(sources))
        for start in range(0, len(unique), _SOURCES_PER_QUERY):
            wanted = unique[start : start + _SOURCES_PER_QUERY]
            with _translated():
                result = collection.get(
                    where=cast(Any, {"source": {"$in": wanted}}), include=cast(Any, ["metadatas"])
                )
            for id_, metadata in zip(result["ids"], result["metadatas"] or [], strict=True):
                found.setdefault(str((metadata or {}).get("source", "")), set()).add(id_)
        return found

    def write_chunks(
        self, name: str, chunks: Sequence[StoredChunk], vectors: Vectors, stale: Iterable[str] = ()
    ) -> None:
        """Put ``chunks`` in, then delete the ``stale`` ids (the replaced versions' chunks).

        New chunks land before old ones go, so a replaced document is never missing from
        search; a crash in between leaves both versions until its next ingestion."""
        stale = sorted(stale)
        if not chunks and not stale:
            return  # nothing changed: the revision (and the caches keyed on it) stays
        collection = self._collection(name)
        with _translated():
            for start in range(0, len(chunks), self._batch):
                batch = chunks[start : start + self._batch]
                collection.upsert(
                    ids=[chunk.id for chunk in batch],
                    embeddings=vectors[start : start + len(batch)],
                    documents=[chunk.text for chunk in batch],
                    metadatas=[dict(chunk.metadata) for chunk in batch],
                )
            self._delete_ids(collection, stale)
        self._touch(collection)

    def write_document(self, name: str, source: str, chunks: Sequence[StoredChunk], vectors: Vectors) -> None:
        """One document's chunks, replacing whatever that source had."""
        stale = self.chunk_ids(name, source) - {chunk.id for chunk in chunks}
        self.write_chunks(name, chunks, vectors, stale)

    def delete_document(self, name: str, source: str) -> int:
        collection = self._collection(name)
        ids = sorted(self.chunk_ids(name, source))
        if not ids:
            raise DocumentNotFound(name, source)
        with _translated():
            self._delete_ids(collection, ids)
        self._touch(collection)
        return len(ids)

    def delete_expired(self, name: str, now: float) -> int:
        collection = self._collection(name)
        with _translated():
            ids = collection.get(where=cast(Any, {"expires_at": {"$lte": now}}), include=[])["ids"]
            self._delete_ids(collection, ids)
        if ids:
            self._touch(collection)
        return len(ids)

    # -- reading

    def query(self, name: str, vector: Vectors, k: int, *, now: float | None) -> list[Match]:
        """The ``k`` nearest chunks; ``now`` set: only those not expired at that time."""
        collection = self._collection(name)
        where = {"expires_at": {"$gt": now}} if now is not None else None
        with _translated():
            result = collection.query(
                query_embeddings=vector.reshape(1, -1),
                n_results=k,
                where=cast(Any, where),
                include=cast(Any, ["documents", "metadatas", "distances"]),
            )
        ids = result["ids"][0]
        documents = (result["documents"] or [[]])[0]
        metadatas = (result["metadatas"] or [[]])[0]
        distances = (result["distances"] or [[]])[0]
        return [
            Match(id_, text or "", _scalars(metadata), 1.0 - float(distance))
            for id_, text, metadata, distance in zip(ids, documents, metadatas, distances, strict=True)
        ]

    def fetch(self, name: str, ids: Sequence[str], vector: Vectors) -> list[Match]:
        """Chunks by id, scored against ``vector``; ids that are gone are left out."""
        if not ids:
            return []
        with _translated():
            result = self._collection(name).get(
                ids=list(ids), include=cast(Any, ["documents", "metadatas", "embeddings"])
            )
        documents = result["documents"] or []
        metadatas = result["metadatas"] or []
        embeddings = result["embeddings"]
        matches = []
        for index, id_ in enumerate(result["ids"]):
            stored = embeddings[index] if embeddings is not None else None
            similarity = float(vector @ stored) if stored is not None else 0.0
            matches.append(Match(id_, documents[index] or "", _scalars(metadatas[index]), similarity))
        return matches

    def corpus(self, name: str, page: int = 10_000) -> Iterator[tuple[list[str], list[str]]]:
        """(ids, texts) of every chunk, a page at a time, for the lexical index. A chunk's text
        is led by its heading path (or title), as its embedding is."""
        collection = self._collection(name)
        offset = 0
        while True:
            with _translated():
                result = collection.get(
                    include=cast(Any, ["documents", "metadatas"]), limit=page, offset=offset
                )
            ids = result["ids"]
            if not ids:
                return
            documents = result["documents"] or [""] * len(ids)
            metadatas = result["metadatas"] or [{}] * len(ids)
            texts = [
                searchable_text(
                    text or "", _optional_str(metadata, "heading"), _optional_str(metadata, "title")
                )
                for text, metadata in zip(documents, metadatas, strict=True)
            ]
            yield ids, texts
            offset += len(ids)

    def chunk_metadata(self, name: str, page: int = 10_000) -> Iterator[tuple[str, ChunkMetadata]]:
        """(id, metadata) of every chunk of ``name``, read a page at a time."""
        collection = self._collection(name)
        offset = 0
        while True:
            with _translated():
                result = collection.get(include=cast(Any, ["metadatas"]), limit=page, offset=offset)
            if not result["ids"]:
                return
            metadatas = result["metadatas"] or [{}] * len(result["ids"])
            for id_, metadata in zip(result["ids"], metadatas, strict=True):
                yield id_, _scalars(metadata)
            offset += len(result["ids"])

    def delete_chunks(self, name: str, ids: Sequence[str]) -> None:
        collection = self._collection(name)
        with _translated():
            self._delete_ids(collection, ids)
        self._touch(collection)

    # -- helpers

    def _collection(self, name: str) -> Collection:
        validate_collection_name(name)
        try:
            with _translated():
                return self._client.get_collection(name, embedding_function=None)
        except NotFoundError as exc:
            raise CollectionNotFound(name) from exc

    def _delete_ids(self, collection: Collection, ids: Sequence[str]) -> None:
        for start in range(0, len(ids), self._batch):
            collection.delete(ids=list(ids[start : start + self._batch]))

    def _touch(self, collection: Collection) -> None:
        metadata = dict(collection.metadata or {})
        metadata["revision"] = _revision()
        with _translated():
            collection.modify(metadata=metadata)


def _info(name: str, metadata: Mapping[str, object] | None, *, chunks: int, documents: int) -> CollectionInfo:
    metadata = metadata or {}
    return CollectionInfo(
        name=name,
        chunks=chunks,
        documents=documents,
        volatile=bool(metadata.get("volatile", False)),
        revision=str(metadata.get("revision", "")),
        embedder=str(metadata.get("embedder", "")),
        expiring=bool(metadata.get("expiring", False)),
    )


def _revision() -> str:
    # Random, not a counter: two gateways bumping a counter at once could both write n+1.
    return f"{time.time():.6f}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Chroma's failures other than 'not found' become IndexUnavailable (the gateway's 503)."""
    try:
        yield
    except (NotFoundError, CollectionNotFound, DocumentError):
        raise
    except (ChromaError, httpx.HTTPError, OSError) as error:
        raise IndexUnavailable(f"the vector store failed: {error}") from error


def _optional_str(metadata: Mapping[str, object] | None, key: str) -> str | None:
    value = (metadata or {}).get(key)
    return str(value) if value else None


def _scalars(metadata: Mapping[str, object] | None) -> ChunkMetadata:
    return {k: v for k, v in (metadata or {}).items() if isinstance(v, str | int | float | bool)}
