"""The scale part of ``bench/retrieval.py``: recall against exact search and retrieval latency with
``--scale-chunks`` chunks indexed, for several HNSW configurations side by side.

Embedding 100k texts would take most of an hour on a small CPU machine, so the filler is
synthetic, built from the real PubMedQA chunks:

- each synthetic vector is a real chunk's vector (its parent) plus Gaussian noise drawn with the
  real vectors' own covariance, scaled so that its cosine to the parent is about
  ``--parent-cosine``. Noise shaped like the data keeps the filler in the directions real
  embeddings take; isotropic noise would spread it over directions text never reaches;
- each synthetic text is ``FILLER_WORDS`` words, half drawn from its parent's words and half from
  the whole corpus's words by frequency, so BM25 sees realistic term statistics and near-misses;
- synthetic documents of ``CHUNKS_PER_DOCUMENT`` chunks, and the real chunks with their stored ids
  and metadata, are written in a shuffled order through ``ChunkStore.write_document``, into a
  collection made by ``ChunkStore.ensure_collection`` (so with the real HNSW configuration).

Every graph (``max_neighbors``, ``ef_construction``) gets its own client and directory, and is
then queried at several ``ef_search`` values (see :class:`Graph`); queries alternate between the
graphs so that the machine's noise falls on all alike, and the first round is run again last to
show how far the machine drifted in between. The gateway's path is measured as the gateway runs
it: ``Retriever.search`` over every collection of its client (there is one).
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from chromadb.api import ClientAPI

from bench.gateway_overhead import percentile
from index.embedder import Embedder, Vectors
from index.lexical import LexicalIndex
from index.retrieval import Retriever
from index.store import NEVER_EXPIRES, ChunkStore, HnswParams, StoredChunk, persistent_client

COLLECTION = "scale"
CHUNKS_PER_DOCUMENT = 100
FILLER_WORDS = 150
# The share of a filler text's words taken from its parent chunk (the rest: the whole corpus).
PARENT_WORD_SHARE = 0.5
HNSW_KEYS = ("max_neighbors", "ef_construction", "ef_search")
GATEWAY_K = 4  # service.settings.rag_top_k's default: what a chat request retrieves
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9-]*")


@dataclass(frozen=True)
class Chunks:
    """Chunks as stored: ids, texts, metadata and vectors, row for row."""

    ids: list[str]
    texts: list[str]
    metadatas: list[dict[str, str | int | float | bool]]
    vectors: Vectors

    @property
    def sources(self) -> list[str]:
        return [str(metadata["source"]) for metadata in self.metadatas]


@dataclass(frozen=True)
class Queries:
    texts: list[str]
    vectors: Vectors
    sources: list[str]  # the relevant document of each


@dataclass(frozen=True)
class Corpus:
    chunks: Chunks
    # (source, first row, last row + 1) per document, in the order they are written.
    documents: list[tuple[str, int, int]]
    parent_cosine: dict[str, float]
    build_s: float


def stored_chunks(client: ClientAPI, name: str) -> Chunks:
    """Everything the ingestor stored in ``name`` (read straight from chromadb: a bench may)."""
    result = client.get_collection(name).get(include=cast(Any, ["documents", "metadatas", "embeddings"]))
    embeddings = result["embeddings"]
    assert embeddings is not None
    return Chunks(
        ids=list(result["ids"]),
        texts=[text or "" for text in result["documents"] or []],
        metadatas=[
            {
                key: value
                for key, value in (metadata or {}).items()
                if isinstance(value, str | int | float | bool)
            }
            for metadata in result["metadatas"] or []
        ],
        vectors=np.asarray(embeddings, dtype=np.float32),
    )


def synthetic_corpus(real: Chunks, total: int, parent_cosine: float, seed: int) -> Corpus:
    """``total`` chunks: the real ones and synthetic filler around them."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    count = max(0, total - len(real.ids))
    parents = rng.integers(0, len(real.ids), count)
    vectors = _perturbed(real.vectors, parents, parent_cosine, rng)
    cosines = np.einsum("ij,ij->i", vectors, real.vectors[parents]) if count else np.zeros(1)
    texts = _filler(real.texts, parents, rng)
    ids = [
        f"synthetic-{row // CHUNKS_PER_DOCUMENT:05d}-{row % CHUNKS_PER_DOCUMENT:03d}" for row in range(count)
    ]
    metadatas: list[dict[str, str | int | float | bool]] = [
        {
            "source": f"synthetic-{row // CHUNKS_PER_DOCUMENT:05d}",
            "position": row % CHUNKS_PER_DOCUMENT,
            "chunks": min(CHUNKS_PER_DOCUMENT, count - row // CHUNKS_PER_DOCUMENT * CHUNKS_PER_DOCUMENT),
            "ingested_at": 0.0,
            "expires_at": NEVER_EXPIRES,
        }
        for row in range(count)
    ]
    chunks = Chunks(
        ids=ids + real.ids,
        texts=texts + real.texts,
        metadatas=metadatas + real.metadatas,
        vectors=np.concatenate([vectors, real.vectors]) if count else real.vectors,
    )
    documents = _documents(chunks.sources)
    # Real and synthetic documents arrive mixed, as they would in a collection that grew.
    order = rng.permutation(len(documents))
    return Corpus(
        chunks=chunks,
        documents=[documents[int(i)] for i in order],
        parent_cosine={
            "target": parent_cosine,
            "mean": float(cosines.mean()),
            "p5": float(np.percentile(cosines, 5)),
            "p95": float(np.percentile(cosines, 95)),
        },
        build_s=time.perf_counter() - started,
    )


def _perturbed(
    real: Vectors, parents: npt.NDArray[np.int64], cosine: float, rng: np.random.Generator
) -> Vectors:
    centred = real - real.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / max(1, len(real) - 1))
    spread = np.sqrt(np.clip(eigenvalues, 0.0, None))
    # Noise nearly orthogonal to a unit parent: cos = 1 / sqrt(1 + |noise|^2), so scale the
    # noise's expected squared norm (the covariance's trace) to 1 / cos^2 - 1.
    scale = np.sqrt((1.0 / cosine**2 - 1.0) / float(eigenvalues.clip(0.0).sum()))
    out = np.empty((len(parents), real.shape[1]), dtype=np.float32)
    for start in range(0, len(parents), 10_000):
        rows = parents[start : start + 10_000]
        noise = (rng.standard_normal((len(rows), real.shape[1])) * spread) @ eigenvectors.T
        block = real[rows] + scale * noise
        out[start : start + len(rows)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def _filler(texts: list[str], parents: npt.NDArray[np.int64], rng: np.random.Generator) -> list[str]:
    words_of = [np.array(_WORD.findall(text)) for text in texts]
    everywhere = np.concatenate(words_of)  # drawn from uniformly: words by their frequency
    own = round(FILLER_WORDS * PARENT_WORD_SHARE)
    filler = []
    for parent in parents:
        mine = words_of[int(parent)]
        words = np.concatenate([rng.choice(mine, own), rng.choice(everywhere, FILLER_WORDS - own)])
        rng.shuffle(words)
        filler.append(" ".join(words.tolist()))
    return filler


def _documents(sources: list[str]) -> list[tuple[str, int, int]]:
    """Runs of equal sources as (source, start, end); each document's chunks are contiguous."""
    documents: list[tuple[str, int, int]] = []
    start = 0
    for row in range(1, len(sources) + 1):
        if row == len(sources) or sources[row] != sources[start]:
            documents.append((sources[start], start, row))
            start = row
    return documents


def exact_top(chunks: Chunks, vectors: Vectors, k: int) -> list[set[str]]:
    """The ids of the ``k`` nearest chunks of each query by brute force (cosine of unit vectors)."""
    found: list[set[str]] = []
    for start in range(0, len(vectors), 64):
        similarity = vectors[start : start + 64] @ chunks.vectors.T
        top = np.argpartition(-similarity, k, axis=1)[:, :k]
        found.extend({chunks.ids[int(i)] for i in row} for row in top)
    return found


@dataclass
class Graph:
    """One collection built with one HNSW configuration, in its own directory and client.

    ``ef_search`` is the one HNSW parameter chroma lets a collection change after creation
    (``collection.modify``); the change reaches queries once the index is loaded again, so the
    sweep closes the client and opens a new one. ``max_neighbors`` and ``ef_construction`` shape
    the graph itself: each pair needs a graph of its own."""

    label: str
    created: HnswParams
    path: str
    lexical: LexicalIndex = field(default_factory=LexicalIndex)
    client: ClientAPI | None = None
    ef_search: int = 0
    insert_s: float = 0.0
    bm25_build_ms: float | None = None
    configuration: dict[str, Any] = field(default_factory=dict)


@dataclass
class Setup:
    """A graph at one ``ef_search``, and what was measured on it."""

    graph: Graph
    params: HnswParams
    store: ChunkStore
    retriever: Retriever
    recall: list[float] = field(default_factory=list)
    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    hits: list[bool] = field(default_factory=list)  # hybrid k=4: the question's own abstract among them
    repeat: bool = False  # the as-created round again, last: how far the machine drifted meanwhile

    @property
    def label(self) -> str:
        p = self.params
        again = " (repeat)" if self.repeat else ""
        return f"{self.graph.label}: M={p.max_neighbors} efC={p.ef_construction} ef={p.ef_search}{again}"


@contextmanager
def built_graphs(
    configs: dict[str, HnswParams], corpus: Corpus, embedder: Embedder, workers: int
) -> Iterator[list[Graph]]:
    """Every configuration's collection, written through ``ChunkStore``, ``workers`` at a time
    (chromadb releases the GIL while it writes, and a graph's sqlite and HNSW work do not use
    two cores on their own)."""
    with ExitStack() as stack:
        graphs = [
            Graph(label, params, stack.enter_context(tempfile.TemporaryDirectory()))
            for label, params in configs.items()
        ]
        for graph in graphs:
            stack.callback(_close, graph)

        def build(graph: Graph) -> None:
            graph.client = persistent_client(graph.path)
            graph.ef_search = graph.created.ef_search
            store = ChunkStore(graph.client, embedder=embedder.name, hnsw=graph.created)
            graph.insert_s = _write(store, corpus)
            # What chromadb recorded, as evidence that the configuration reached the index.
            hnsw = (graph.client.get_collection(COLLECTION).configuration or {}).get("hnsw") or {}
            graph.configuration = {key: hnsw.get(key) for key in ("space", *HNSW_KEYS)}

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(build, graphs))
        yield graphs


def _write(store: ChunkStore, corpus: Corpus) -> float:
    store.ensure_collection(COLLECTION, volatile=False, expiring=False)
    chunks = corpus.chunks
    started = time.perf_counter()
    for source, start, end in corpus.documents:
        stored = [StoredChunk(chunks.ids[i], chunks.texts[i], chunks.metadatas[i]) for i in range(start, end)]
        store.write_document(COLLECTION, source, stored, chunks.vectors[start:end])
    return time.perf_counter() - started


def _close(graph: Graph) -> None:
    if graph.client is not None:
        close(graph.client)
    graph.client = None


def close(client: ClientAPI) -> None:
    # chromadb >= 1.1 clients hold their system (and the loaded index) until closed; the
    # ClientAPI type does not declare it.
    method = getattr(client, "close", None)
    if callable(method):
        method()


@contextmanager
def closing(client: ClientAPI) -> Iterator[ClientAPI]:
    try:
        yield client
    finally:
        close(client)


def at_ef_search(graph: Graph, ef_search: int, embedder: Embedder) -> Setup:
    """``graph`` queried with ``ef_search``; its BM25 index is kept (its revision is unchanged)."""
    if graph.client is None or ef_search != graph.ef_search:
        if graph.client is not None:
            graph.client.get_collection(COLLECTION).modify(
                configuration=cast(Any, {"hnsw": {"ef_search": ef_search}})
            )
            _close(graph)
        graph.client = persistent_client(graph.path)
        graph.ef_search = ef_search
    params = replace(graph.created, ef_search=ef_search)
    store = ChunkStore(graph.client, embedder=embedder.name, hnsw=params)
    return Setup(graph, params, store, Retriever(store, embedder, graph.lexical))


Probe = Callable[[Setup, Vectors, str], list[Any]]
GC_FROZEN = "hybrid_search_k4_gc_frozen"
PROBES: dict[str, Probe] = {
    # The store alone, as the recall figure is taken.
    "store_query_k10": lambda s, v, q: s.store.query(COLLECTION, v, 10, now=None),
    # What a chat request runs after embedding its query, in each of the gateway's two modes.
    "dense_search_k4": lambda s, v, q: s.retriever.search(v, q, GATEWAY_K, mode="dense"),
    "hybrid_search_k4": lambda s, v, q: s.retriever.search(v, q, GATEWAY_K, mode="hybrid"),
    # The same with every object alive beforehand out of the collector's sweeps (gc.freeze(),
    # which a server can call once after start-up): how much of the tail is the collector's.
    GC_FROZEN: lambda s, v, q: s.retriever.search(v, q, GATEWAY_K, mode="hybrid"),
}


def measure(setups: list[Setup], queries: Queries, exact: list[set[str]], warmup: int, passes: int) -> None:
    """Recall against exact search, then latencies over ``passes`` passes of the queries; each
    query runs on every setup, in an order that rotates, so the machine's noise falls on all
    alike."""
    for setup in setups:
        setup.recall = [
            len({m.id for m in setup.store.query(COLLECTION, vector, 10, now=None)} & truth) / 10
            for vector, truth in zip(queries.vectors, exact, strict=True)
        ]
        if setup.graph.bm25_build_ms is None:
            # A collection's first hybrid query builds its BM25 index: timed on its own.
            started = time.perf_counter()
            setup.retriever.search(queries.vectors[0], queries.texts[0], GATEWAY_K, mode="hybrid")
            setup.graph.bm25_build_ms = (time.perf_counter() - started) * 1000
    for key, probe in PROBES.items():
        if key == GC_FROZEN:
            gc.collect()
            gc.freeze()
        try:
            _time_probe(setups, queries, key, probe, warmup, passes)
        finally:
            gc.unfreeze()


def _time_probe(
    setups: list[Setup], queries: Queries, key: str, probe: Probe, warmup: int, passes: int
) -> None:
    count = len(queries.texts)
    for i in range(warmup):
        for setup in setups:
            probe(setup, queries.vectors[i % count], queries.texts[i % count])
    for i in range(passes * count):
        vector, text = queries.vectors[i % count], queries.texts[i % count]
        for setup in setups[i % len(setups) :] + setups[: i % len(setups)]:
            started = time.perf_counter()
            result = probe(setup, vector, text)
            setup.samples_ms.setdefault(key, []).append((time.perf_counter() - started) * 1000)
            if key == "hybrid_search_k4" and i < count:
                setup.hits.append(queries.sources[i] in {passage.source for passage in result})


def latency(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "mean_ms": statistics.fmean(samples),
        "p50_ms": percentile(samples, 50),
        "p95_ms": percentile(samples, 95),
        "p99_ms": percentile(samples, 99),
        "max_ms": max(samples),
    }


def report(setup: Setup, targets: dict[str, float]) -> dict[str, Any]:
    recall = statistics.fmean(setup.recall)
    latencies = {key: latency(values) for key, values in setup.samples_ms.items()}
    p = setup.params
    return {
        "label": setup.label,
        "graph": setup.graph.label,
        "hnsw": {
            "max_neighbors": p.max_neighbors,
            "ef_construction": p.ef_construction,
            "ef_search": p.ef_search,
        },
        "as_created": p == setup.graph.created,
        "repeat": setup.repeat,
        "recall_at_10_vs_exact": recall,
        "queries_under_0.9_recall": sum(r < 0.9 for r in setup.recall),
        "latency": latencies,
        "hybrid_context_hit_rate_at_4": statistics.fmean(setup.hits),
        "met": {
            "recall_at_10_vs_exact": recall >= targets["recall_at_10_vs_exact"],
            "hybrid_search_p99_ms": latencies["hybrid_search_k4"]["p99_ms"] <= targets["search_p99_ms"],
            "dense_search_p99_ms": latencies["dense_search_k4"]["p99_ms"] <= targets["search_p99_ms"],
        },
        "samples_ms": setup.samples_ms,
    }


def run(
    real: Chunks,
    queries: Queries,
    embedder: Embedder,
    args: argparse.Namespace,
    targets: dict[str, float],
    log: Callable[[str], None],
) -> dict[str, Any]:
    corpus = synthetic_corpus(real, args.scale_chunks, args.parent_cosine, args.seed)
    log(f"scale: {len(corpus.chunks.ids)} chunks ({len(real.ids)} real) in {corpus.build_s:.0f} s")
    started = time.perf_counter()
    exact = exact_top(corpus.chunks, queries.vectors, 10)
    exact_ms = (time.perf_counter() - started) * 1000 / len(queries.texts)
    configs = {label: HnswParams(*values) for label, values in args.graphs}
    results: list[dict[str, Any]] = []
    with built_graphs(configs, corpus, embedder, args.build_workers) as graphs:
        for graph in graphs:
            log(f"  {graph.label}: written in {graph.insert_s:.0f} s")
        created = [graph.created.ef_search for graph in graphs]
        sweep = [[ef] * len(graphs) for ef in args.ef_search if ef not in created]
        rounds = [(created, False), *((efs, False) for efs in sweep), (created, True)]
        for efs, repeat in rounds:
            setups = [at_ef_search(graph, ef, embedder) for graph, ef in zip(graphs, efs, strict=True)]
            for setup in setups:
                setup.repeat = repeat
            measure(setups, queries, exact, args.warmup, args.passes)
            for setup in setups:
                results.append(report(setup, targets))
                figures = results[-1]
                log(
                    f"  {setup.label}: recall@10 {figures['recall_at_10_vs_exact']:.3f}, hybrid p99 "
                    f"{figures['latency']['hybrid_search_k4']['p99_ms']:.1f} ms"
                )
        build = {
            graph.label: {
                "insert_s": graph.insert_s,
                "insert_chunks_per_s": len(corpus.chunks.ids) / graph.insert_s,
                "bm25_build_ms": graph.bm25_build_ms,
                "chroma_configuration_as_created": graph.configuration,
            }
            for graph in graphs
        }
    return {
        "chunks": len(corpus.chunks.ids),
        "real_chunks": len(real.ids),
        "synthetic": {
            "chunks_per_document": CHUNKS_PER_DOCUMENT,
            "filler_words": FILLER_WORDS,
            "parent_word_share": PARENT_WORD_SHARE,
            "parent_cosine": corpus.parent_cosine,
            "build_s": corpus.build_s,
            "noise": "Gaussian with the real chunk vectors' covariance",
        },
        "queries": len(queries.texts),
        "passes": args.passes,
        "exact_search_ms_per_query": exact_ms,
        "graphs": build,
        "build_workers": args.build_workers,
        "configs": results,
        "meeting_both_targets": [
            r["label"]
            for r in results
            if r["met"]["recall_at_10_vs_exact"] and r["met"]["hybrid_search_p99_ms"]
        ],
    }
