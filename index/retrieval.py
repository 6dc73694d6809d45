"""Retrieval: dense search in chromadb, optionally fused with BM25 by reciprocal rank.

Every passage carries its cosine similarity to the query as ``score``: unlike BM25 or fused
scores it means the same in every collection, so it is what callers threshold on. The order is
the fused order when fusion is on (``bench/retrieval.py`` measures whether it helps).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from index.embedder import Embedder, Vectors
from index.errors import CollectionNotFound
from index.lexical import LexicalIndex
from index.store import NEVER_EXPIRES, ChunkStore, Match

Mode = Literal["hybrid", "dense", "lexical"]
# Cormack et al.'s constant: damps the head of each list so neither ranking dominates.
RRF_K = 60
_Key = tuple[str, str]


@dataclass(frozen=True)
class Passage:
    id: str
    collection: str
    source: str
    title: str | None
    heading: str | None
    page: int | None
    text: str
    score: float
    volatile: bool


class Retriever:
    """Finds the passages of the index closest to a query."""

    def __init__(
        self,
        store: ChunkStore,
        embedder: Embedder,
        lexical: LexicalIndex | None = None,
        *,
        mode: Mode = "hybrid",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._embedder = embedder
        self._lexical = lexical or LexicalIndex()
        self.mode: Mode = mode
        self._clock = clock

    def retrieve(
        self, query: str, k: int, *, collections: Sequence[str] | None = None, mode: Mode | None = None
    ) -> list[Passage]:
        """The ``k`` best passages for ``query`` across ``collections`` (all when None)."""
        vector = self._embedder.embed([query])[0]
        return self.search(vector, query, k, collections=collections, mode=mode)

    def search(
        self,
        vector: Vectors,
        query: str,
        k: int,
        *,
        collections: Sequence[str] | None = None,
        mode: Mode | None = None,
    ) -> list[Passage]:
        """As :meth:`retrieve`, for a query already embedded (the router embeds once)."""
        mode = mode or self.mode
        depth = k if mode == "dense" else max(4 * k, 20)
        now = self._clock()
        # Keyed by (collection, chunk id): the same document may sit in two collections.
        found: dict[_Key, Passage] = {}
        volatile: dict[str, bool] = {}
        dense: list[tuple[float, _Key]] = []
        lexical: list[tuple[float, _Key]] = []
        for name in collections if collections is not None else self._store.collection_names():
            try:
                info = self._store.describe(name)
            except CollectionNotFound:
                continue  # deleted since it was listed
            volatile[name] = info.volatile
            if mode != "lexical":
                matches = self._store.query(name, vector, depth, now=now if info.expiring else None)
                for match in matches:
                    found[name, match.id] = _passage(name, info.volatile, match)
                    dense.append((match.similarity, (name, match.id)))
            if mode != "dense":
                corpus = functools.partial(self._store.corpus, name)
                hits = self._lexical.search(name, info.revision, corpus, query, depth)
                lexical.extend((score, (name, chunk_id)) for chunk_id, score in hits)
        rankings = []
        if mode != "lexical":
            rankings.append([key for _, key in sorted(dense, key=lambda pair: -pair[0])[:depth]])
        if mode != "dense":
            rankings.append([key for _, key in sorted(lexical, key=lambda pair: -pair[0])[:depth]])
        return self._best(_fuse(rankings), found, volatile, vector, k, now)

    def _best(
        self,
        ranked: list[_Key],
        found: dict[_Key, Passage],
        volatile: dict[str, bool],
        vector: Vectors,
        k: int,
        now: float,
    ) -> list[Passage]:
        """The first ``k`` of ``ranked`` that still exist and have not expired. Lexical-only hits
        are fetched here, and only as many as can make the cut: fetching every BM25 hit cost
        more than the dense search at 100k chunks."""
        best: list[Passage] = []
        position = 0
        while len(best) < k and position < len(ranked):
            window = ranked[position : position + k - len(best)]
            position += len(window)
            missing: dict[str, list[str]] = {}
            for name, chunk_id in window:
                if (name, chunk_id) not in found:
                    missing.setdefault(name, []).append(chunk_id)
            for name, ids in missing.items():
                for match in self._store.fetch(name, ids, vector):
                    # The lexical index may be a revision behind: gone chunks are not fetched,
                    # expired ones are dropped here.
                    if float(match.metadata.get("expires_at", NEVER_EXPIRES)) > now:
                        found[name, match.id] = _passage(name, volatile[name], match)
            best.extend(found[key] for key in window if key in found)
        return best

    def warm_up(self) -> None:
        """Build the lexical index of every collection (blocking; hybrid mode only)."""
        if self.mode == "dense":
            return
        for name in self._store.collection_names():
            try:
                revision = self._store.describe(name).revision
            except CollectionNotFound:
                continue
            self._lexical.prepare(name, revision, functools.partial(self._store.corpus, name))

    def forget(self, collection: str) -> None:
        self._lexical.forget(collection)


def _fuse(rankings: list[list[_Key]]) -> list[_Key]:
    if len(rankings) == 1:
        return rankings[0]
    fused: dict[_Key, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking):
            fused[key] = fused.get(key, 0.0) + 1.0 / (RRF_K + rank + 1)
    return sorted(fused, key=lambda key: -fused[key])


def _passage(collection: str, volatile: bool, match: Match) -> Passage:
    metadata = match.metadata
    page = metadata.get("page")
    return Passage(
        id=match.id,
        collection=collection,
        source=str(metadata.get("source", "")),
        title=_optional(metadata.get("title")),
        heading=_optional(metadata.get("heading")),
        page=int(page) if isinstance(page, int | float) and page > 0 else None,
        text=match.text,
        score=round(match.similarity, 6),
        volatile=volatile,
    )


def _optional(value: object) -> str | None:
    return str(value) if value not in (None, "") else None
