"""BM25 over a collection's chunks (``bm25s``, English stop words, Snowball stemming).

bm25s indexes are immutable, so each collection's index is rebuilt from chromadb when the
collection's revision changes. The first build of a collection blocks the query that needs it;
later rebuilds run in the background while queries keep the previous index, so a large
collection under steady ingestion never makes a query wait for a rebuild. Chunks the previous
index still returns after their deletion are dropped by the caller when it fetches them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import bm25s
import numpy as np
import Stemmer

log = logging.getLogger(__name__)

Corpus = Callable[[], Iterable[tuple[list[str], list[str]]]]


@dataclass(frozen=True)
class _Built:
    revision: str
    ids: list[str]
    bm25: bm25s.BM25 | None  # None: the collection has no indexable text


class LexicalIndex:
    """Per-collection BM25 indexes, built on demand and kept current by revision."""

    def __init__(self) -> None:
        # PyStemmer objects must not be shared between threads: queries share this one under
        # its lock, each build makes its own.
        self._query_stemmer = Stemmer.Stemmer("english")
        self._query_lock = threading.Lock()
        self._built: dict[str, _Built] = {}
        self._building: set[str] = set()
        self._lock = threading.Lock()

    def search(
        self, collection: str, revision: str, corpus: Corpus, query: str, k: int
    ) -> list[tuple[str, float]]:
        """Up to ``k`` (chunk id, BM25 score) pairs with a positive score, best first."""
        built = self._current(collection, revision, corpus)
        if built.bm25 is None:
            return []
        with self._query_lock:
            tokens = _tokenize([query], self._query_stemmer)
        if not tokens[0]:
            return []
        # Scores and a partial sort directly: bm25s's retrieve() adds milliseconds of jitter.
        scores = built.bm25.get_scores(tokens[0])
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top])]
        return [(built.ids[int(index)], float(scores[index])) for index in top if scores[index] > 0]

    def prepare(self, collection: str, revision: str, corpus: Corpus) -> None:
        """Build ``collection``'s index now (at start-up), not in its first query: at 100k
        chunks the build takes about 15 s on 2 cores."""
        self._current(collection, revision, corpus)

    def forget(self, collection: str) -> None:
        with self._lock:
            self._built.pop(collection, None)

    def _current(self, collection: str, revision: str, corpus: Corpus) -> _Built:
        with self._lock:
            built = self._built.get(collection)
            if built is not None and built.revision == revision:
                return built
            rebuild_in_background = built is not None and collection not in self._building
            if rebuild_in_background:
                self._building.add(collection)
        if built is None:
            built = self._build(collection, revision, corpus)
            with self._lock:
                self._built[collection] = built
            return built
        if rebuild_in_background:
            threading.Thread(
                target=self._rebuild,
                args=(collection, revision, corpus),
                name=f"bm25-{collection}",
                daemon=True,
            ).start()
        return built

    def _rebuild(self, collection: str, revision: str, corpus: Corpus) -> None:
        try:
            built = self._build(collection, revision, corpus)
            with self._lock:
                self._built[collection] = built
        except Exception:
            # The stale index keeps serving; the next query tries again.
            log.exception("rebuilding the lexical index of %s failed", collection)
        finally:
            with self._lock:
                self._building.discard(collection)

    def _build(self, collection: str, revision: str, corpus: Corpus) -> _Built:
        ids: list[str] = []
        texts: list[str] = []
        for page_ids, page_texts in corpus():
            ids.extend(page_ids)
            texts.extend(page_texts)
        tokens = _tokenize(texts, Stemmer.Stemmer("english"))
        if not any(tokens):
            return _Built(revision, ids, None)
        bm25 = bm25s.BM25()
        bm25.index(tokens, show_progress=False)
        log.info("lexical index of %s: %d chunks", collection, len(ids))
        return _Built(revision, ids, bm25)


def _tokenize(texts: list[str], stemmer: Stemmer.Stemmer) -> list[list[str]]:
    tokens: list[list[str]] = bm25s.tokenize(
        texts, stopwords="en", stemmer=stemmer.stemWords, return_ids=False, show_progress=False
    )
    return tokens
