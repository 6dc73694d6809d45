"""Crash recovery of an embedded index: what an ingestion request left half-done is removed
before the gateway serves.

An ingestion request writes its chunks (in batches of up to 5,000), then deletes the chunks of
the versions it replaced, then answers. A gateway killed in between leaves a source with a
version that is missing chunks, or with two whole versions. Neither was acknowledged: at start
each source keeps its newest complete version (a chunk's id names its version, its metadata
its position and the version's chunk count), and everything else goes.

Only for the embedded index, which one gateway owns: on a shared Chroma server another
gateway's request in progress looks exactly like a half-written one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from index.ingest import chunk_version
from index.store import ChunkMetadata, ChunkStore

logger = logging.getLogger(__name__)


@dataclass
class _Version:
    ids: list[str] = field(default_factory=list)
    positions: set[int] = field(default_factory=set)
    declared: int = -1  # the chunk count each chunk says its version has
    ingested_at: float = 0.0

    @property
    def complete(self) -> bool:
        return self.declared > 0 and self.positions == set(range(self.declared))


def unfinished_chunks(chunks: Iterable[tuple[str, ChunkMetadata]]) -> list[str]:
    """The ids of every chunk that is not part of its source's newest complete version."""
    sources: dict[str, dict[str, _Version]] = {}
    for id_, metadata in chunks:
        versions = sources.setdefault(str(metadata.get("source", "")), {})
        version = versions.setdefault(chunk_version(id_), _Version())
        version.ids.append(id_)
        position, declared = metadata.get("position"), metadata.get("chunks")
        version.positions.add(position if isinstance(position, int) else -1)
        if isinstance(declared, int):
            version.declared = declared
        stamp = metadata.get("ingested_at")
        if isinstance(stamp, int | float):
            version.ingested_at = max(version.ingested_at, float(stamp))
    unfinished: list[str] = []
    for versions in sources.values():
        whole = [v for v in versions.values() if v.complete]
        keep = max(whole, key=lambda v: v.ingested_at) if whole else None
        unfinished += [id_ for v in versions.values() if v is not keep for id_ in v.ids]
    return unfinished


def recover(store: ChunkStore) -> int:
    """Remove the unfinished chunks of every collection; return how many went."""
    removed = 0
    for name in store.collection_names():
        ids = unfinished_chunks(store.chunk_metadata(name))
        if ids:
            logger.warning(
                "collection %r: removing %d chunks an interrupted ingestion left behind", name, len(ids)
            )
            store.delete_chunks(name, ids)
            removed += len(ids)
    return removed
