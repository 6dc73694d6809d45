"""The gateway's view of the index: ingestion, collections and retrieval, off the event loop.

Embedding and chromadb calls block, so each runs in a worker thread. ``index`` errors become
the gateway's API errors here, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from index.chunking import ChunkingPolicy
from index.documents import SourceDocument
from index.embedder import Embedder, load_embedder
from index.errors import (
    CollectionNotFound,
    DocumentError,
    DocumentNotFound,
    IndexUnavailable,
    UnsupportedFormat,
)
from index.ingest import Ingestor, IngestResult
from index.lexical import LexicalIndex
from index.loaders import load_file
from index.recovery import recover
from index.retrieval import Retriever
from index.store import ChunkStore, CollectionInfo, http_client, persistent_client
from service.errors import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    UnsupportedMediaTypeError,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class IndexUnavailableError(APIError):
    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, code="index_unavailable", headers={"Retry-After": str(retry_after_s)})


@dataclass(frozen=True)
class UploadedFile:
    filename: str
    content_type: str | None
    data: bytes


class Knowledge:
    """Documents in, passages out."""

    def __init__(
        self,
        store: ChunkStore,
        embedder: Embedder,
        policy: ChunkingPolicy,
        retriever: Retriever,
        retry_after_s: int,
    ) -> None:
        self._store = store
        self.embedder = embedder
        self._ingestor = Ingestor(store, embedder, policy)
        self.retriever = retriever
        self._retry_after_s = retry_after_s

    @classmethod
    def from_settings(cls, settings: Settings) -> Knowledge:
        """Blocking (loads the embedder, opens chromadb): call it in a thread."""
        policy = ChunkingPolicy(settings.chunk_tokens, settings.chunk_overlap_tokens)
        embedder = embedder_from_settings(settings)
        if settings.chroma_url is not None:
            client = http_client(settings.chroma_url)
        else:
            settings.index_path.mkdir(parents=True, exist_ok=True)
            client = persistent_client(str(settings.index_path))
        store = ChunkStore(client, embedder=embedder.name)
        if settings.chroma_url is None:
            recover(store)  # before anything is served: a killed gateway may have left half a write
        retriever = Retriever(store, embedder, LexicalIndex(), mode=settings.retrieval_mode)
        return cls(store, embedder, policy, retriever, settings.retry_after_s)

    def start_warm_up(self) -> None:
        """Build the lexical indexes in the background, so the first hybrid query of a large
        collection does not wait for it. A daemon thread: shutdown never waits for it."""

        def warm_up() -> None:
            try:
                self.retriever.warm_up()
            except Exception:
                # Queries build what is missing on their own; this was only a head start.
                logger.exception("warming up the lexical indexes failed")

        threading.Thread(target=warm_up, name="lexical-warm-up", daemon=True).start()

    async def ingest_documents(
        self, collection: str, documents: Sequence[SourceDocument], *, volatile: bool | None
    ) -> IngestResult:
        return await self._run(lambda: self._ingestor.ingest(collection, documents, volatile=volatile))

    async def ingest_files(
        self, collection: str, files: Sequence[UploadedFile], *, volatile: bool | None
    ) -> IngestResult:
        def parse_and_ingest() -> IngestResult:
            documents = [
                doc for file in files for doc in load_file(file.data, file.filename, file.content_type)
            ]
            return self._ingestor.ingest(collection, documents, volatile=volatile)

        return await self._run(parse_and_ingest)

    async def collections(self) -> list[CollectionInfo]:
        def infos() -> list[CollectionInfo]:
            found = []
            for name in self._store.collection_names():
                with contextlib.suppress(CollectionNotFound):
                    found.append(self._store.info(name))
            return found

        return await self._run(infos)

    async def delete_document(self, collection: str, source: str) -> int:
        return await self._run(lambda: self._ingestor.delete_document(collection, source))

    async def delete_collection(self, collection: str) -> None:
        await self._run(lambda: self._ingestor.delete_collection(collection))
        self.retriever.forget(collection)

    async def _run(self, work: Callable[[], T]) -> T:
        with self._translated():
            return await asyncio.to_thread(work)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except UnsupportedFormat as exc:
            raise UnsupportedMediaTypeError(
                exc.message, param=exc.param, code="unsupported_document"
            ) from None
        except DocumentError as exc:
            raise InvalidRequestError(exc.message, param=exc.param, code="invalid_document") from None
        except CollectionNotFound as exc:
            raise NotFoundError(str(exc), param="name", code="collection_not_found") from None
        except DocumentNotFound as exc:
            raise NotFoundError(str(exc), param="source", code="document_not_found") from None
        except IndexUnavailable as exc:
            logger.error("index unavailable: %s", exc)
            raise IndexUnavailableError(str(exc), retry_after_s=self._retry_after_s) from None


def embedder_from_settings(settings: Settings) -> Embedder:
    """The configured embedder (blocking: loads the model)."""
    return load_embedder(
        settings.embedder_dir,
        batch_size=settings.embedder_batch_size,
        threads=settings.embedder_threads,
        backend=settings.embedder_backend,
        cache_dir=settings.cache_dir,
    )
