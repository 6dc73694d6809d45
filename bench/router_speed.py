"""Router decision time against one bare query embedding, per embedder backend, in one run.

Setup (in a temporary directory): an embedded chromadb holding one collection of ``--chunks``
chunks: the 500 PubMedQA abstracts ingested by the real ``Ingestor`` (about 1,100 chunks), then
synthetic filler built as ``bench/retrieval_scale.py`` builds it, written through
``ChunkStore.write_document`` into the same collection; the BM25 index is built before timing
(``Retriever.warm_up``). Eight CLINC150 domains stand for adapters, 20 example prompts each,
picked as ``hybrid-serve router eval`` picks them; thresholds are the defaults (none fitted).

Queries: 300 CLINC150 val / oos_val texts and 100 PubMedQA questions, shuffled together; 30
untimed warm-up queries first. For each query, each backend (ONNX Runtime and PyTorch, the same
model), in an order that rotates from query to query so the machine's noise falls on all alike:

- ``embed``: one bare ``embedder.embed([query])``;
- ``decide``: ``await router.decide(...)`` (``rag: auto``, no pin) on one event loop, timed
  around the await: what the gateway runs per request;
- ``measure``: ``Router._measure`` called directly, the blocking part alone (``decide`` minus
  it is the cost of ``asyncio.to_thread`` and the decision logic).

Then, once per query on the ONNX vector, the parts of the search apart: adapter scores, listing
and describing collections, chromadb's query, BM25, and the whole hybrid search (fusion and
fetching lexical-only hits are the rest). Accuracy: the backends' adapters, top passages and
query vectors compared query by query. Threshold evidence: the best passage score
(``Decision.retrieval_score``) of PubMedQA questions, whose abstract is indexed, against that of
CLINC150 queries, off-topic for a medical corpus.

Writes ``bench/results/router_speed.json`` and ``.png``. Not a test: it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from chromadb.api import ClientAPI

from bench.gateway_overhead import percentile
from bench.retrieval import DATA as PUBMEDQA
from bench.retrieval import load_items
from bench.retrieval_scale import closing, latency, stored_chunks, synthetic_corpus
from bench.router_speed_report import plot, summary
from index.chunking import ChunkingPolicy
from index.embedder import Backend, Embedder, Vectors, load_embedder
from index.ingest import Ingestor
from index.lexical import LexicalIndex
from index.loaders import text_document
from index.retrieval import Retriever
from index.store import ChunkStore, StoredChunk, persistent_client
from service.general_chat import general_chat_prompts
from service.route_fit import BASE
from service.route_learner import ActiveRoute, RouteLearner
from service.router import Router
from service.router_eval import FixedAdapters, Split, build_adapters, load_clinc
from service.settings import Settings

CLINC = Path("../shared/data/clinc150")
COLLECTION = "pubmedqa"
BACKENDS: tuple[Backend, ...] = ("onnx", "torch")
T = TypeVar("T")

PROBES = ("embed", "decide", "measure")
PARTS = ("domain_scores", "list_collections", "describe", "chroma_query", "bm25", "hybrid_search")
TARGETS = {"decide_p50_ms": 8.0, "decide_p99_ms": 20.0, "decide_to_embed_ratio": 1.3}
DEFAULTS = Settings.model_fields
RAG_THRESHOLD = float(DEFAULTS["rag_threshold"].default)
TOP_K = int(DEFAULTS["rag_top_k"].default)
DEPTH = max(4 * TOP_K, 20)  # what Retriever.search asks of each ranking in hybrid mode
STARTED = time.perf_counter()


LOADS: list[tuple[float, float]] = []  # (s since start, 1-minute load average) at each log line


def log(message: str) -> None:
    # The load average goes with every line: on a shared machine it says which figures to doubt.
    LOADS.append((round(time.perf_counter() - STARTED), os.getloadavg()[0]))
    print(f"[{LOADS[-1][0]:6.0f} s, load {LOADS[-1][1]:4.1f}] {message}", flush=True)


@dataclass(frozen=True)
class Query:
    text: str
    kind: str  # "clinc" or "pubmedqa"


@dataclass
class Setup:
    """One backend: its embedder and a router over the shared index."""

    backend: Backend
    embedder: Embedder
    retriever: Retriever
    router: Router
    router_adapters: FixedAdapters
    samples_ms: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PROBES})
    vectors: list[Vectors] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    top: list[list[str]] = field(default_factory=list)  # the router's top-k passage ids
    used: list[list[str]] = field(default_factory=list)  # those it put in the context
    scores: list[float | None] = field(default_factory=list)  # Decision.retrieval_score


def build_index(
    client: ClientAPI, store: ChunkStore, embedder: Embedder, chunks: int, seed: int
) -> dict[str, Any]:
    items = load_items(PUBMEDQA)
    started = time.perf_counter()
    documents = [text_document(item.source, item.abstract) for item in items]
    Ingestor(store, embedder, ChunkingPolicy()).ingest(COLLECTION, documents)
    ingest_s = time.perf_counter() - started
    real = stored_chunks(client, COLLECTION)
    corpus = synthetic_corpus(real, chunks, 0.8, seed)
    started = time.perf_counter()
    c = corpus.chunks
    for source, start, end in corpus.documents:
        if source.startswith("synthetic-"):
            stored = [StoredChunk(c.ids[i], c.texts[i], c.metadatas[i]) for i in range(start, end)]
            store.write_document(COLLECTION, source, stored, c.vectors[start:end])
    return {
        "chunks": store.info(COLLECTION).chunks,
        "real_chunks": len(real.ids),
        "ingest_s": ingest_s,
        "filler_write_s": time.perf_counter() - started,
    }


def adapter_manifests(embedder: Embedder) -> tuple[FixedAdapters, Split]:
    fit, held_out, domains = load_clinc(CLINC)
    rows = [i for i, label in enumerate(fit.labels) if label != BASE]  # only these are picked from
    domain_fit = Split([fit.texts[i] for i in rows], [fit.labels[i] for i in rows])
    return FixedAdapters(build_adapters(domain_fit, embedder.embed(domain_fit.texts), domains)), held_out


def make_queries(held_out: Split, clinc: int, pubmedqa: int, seed: int) -> list[Query]:
    rng = np.random.default_rng(seed)
    questions = [item.question for item in load_items(PUBMEDQA)]
    queries = [Query(held_out.texts[int(i)], "clinc") for i in rng.permutation(len(held_out.texts))[:clinc]]
    queries += [Query(questions[int(i)], "pubmedqa") for i in rng.permutation(len(questions))[:pubmedqa]]
    return [queries[int(i)] for i in rng.permutation(len(queries))]


def rotated(values: Sequence[T], i: int) -> list[T]:
    i %= len(values)
    return [*values[i:], *values[:i]]


def ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def measure(
    setups: list[Setup], store: ChunkStore, lexical: LexicalIndex, queries: list[Query], warmup: int
) -> dict[str, list[float]]:
    signals: dict[str, ActiveRoute] = {}
    for setup in setups:
        # The classifier over the adapters' examples and general chat, as the gateway fits it.
        fitted = await setup.router.learner.refresh(setup.router_adapters.manifests)
        assert fitted is not None
        signals[setup.backend] = fitted
    parts: dict[str, list[float]] = {part: [] for part in PARTS}
    for i in range(-warmup, len(queries)):
        text = queries[i % len(queries)].text
        timed = i >= 0
        for setup in rotated(setups, i):
            for probe in rotated(PROBES, i // len(setups)):
                started = time.perf_counter()
                if probe == "embed":
                    vector = setup.embedder.embed([text])[0]
                elif probe == "decide":
                    messages = [{"role": "user", "content": text}]
                    decision = await setup.router.decide(messages, pin=None, rag="auto")
                else:
                    _, passages, _ = setup.router._measure(signals[setup.backend], text, True)
                elapsed = ms_since(started)
                if timed:
                    setup.samples_ms[probe].append(elapsed)
            if timed:
                setup.vectors.append(vector)
                setup.adapters.append(decision.adapter or BASE)
                setup.top.append([p.id for p in passages])
                setup.used.append([p.id for p in decision.passages])
                setup.scores.append(decision.retrieval_score)
        if i > 0 and i % 100 == 0:
            log(f"{i} queries timed")
        if timed:
            for part, ms in search_parts(setups[0], signals[setups[0].backend], store, lexical, text).items():
                parts[part].append(ms)
    return parts


def search_parts(
    setup: Setup, signal: ActiveRoute, store: ChunkStore, lexical: LexicalIndex, text: str
) -> dict[str, float]:
    """The blocking work of a decision, piece by piece, on this query's vector."""
    vector, revision = setup.vectors[-1], store.describe(COLLECTION).revision
    corpus = functools.partial(store.corpus, COLLECTION)
    work: dict[str, Callable[[], object]] = {
        "domain_scores": lambda: signal.model.scores(vector),
        "list_collections": store.collection_names,
        "describe": lambda: store.describe(COLLECTION),
        "chroma_query": lambda: store.query(COLLECTION, vector, DEPTH, now=None),
        "bm25": lambda: lexical.search(COLLECTION, revision, corpus, text, DEPTH),
        "hybrid_search": lambda: setup.retriever.search(vector, text, TOP_K),
    }
    out = {}
    for part, call in work.items():
        started = time.perf_counter()
        call()
        out[part] = ms_since(started)
    return out


def speed(setup: Setup) -> dict[str, Any]:
    f = {probe: latency(setup.samples_ms[probe]) for probe in PROBES}
    ratio = {q: f["decide"][f"{q}_ms"] / f["embed"][f"{q}_ms"] for q in ("p50", "p99")}
    paired = [d / e for d, e in zip(setup.samples_ms["decide"], setup.samples_ms["embed"], strict=True)]
    met = {f"decide_{q}_ms": f["decide"][f"{q}_ms"] <= TARGETS[f"decide_{q}_ms"] for q in ("p50", "p99")}
    return {
        **f,
        **{f"decide_to_embed_ratio_{q}": r for q, r in ratio.items()},
        "paired_ratio_median": statistics.median(paired),
        "to_thread_and_logic_p50_ms": f["decide"]["p50_ms"] - f["measure"]["p50_ms"],
        "met": met | {f"ratio_{q}": r <= TARGETS["decide_to_embed_ratio"] for q, r in ratio.items()},
    }


def agreement(a: Setup, b: Setup) -> dict[str, Any]:
    def share(x: Sequence[Any], y: Sequence[Any]) -> float:
        return statistics.fmean(p == q for p, q in zip(x, y, strict=True))

    cosines = np.einsum("ij,ij->i", np.stack(a.vectors), np.stack(b.vectors))
    gaps = [abs(x - y) for x, y in zip(a.scores, b.scores, strict=True) if x is not None and y is not None]
    return {
        "adapter": share(a.adapters, b.adapters),
        "top_passage": share([t[:1] for t in a.top], [t[:1] for t in b.top]),
        "top_k_passages_in_order": share(a.top, b.top),
        "context_passages": share(a.used, b.used),
        "min_query_cosine": float(cosines.min()),
        "max_query_vector_difference": float(np.abs(np.stack(a.vectors) - np.stack(b.vectors)).max()),
        "max_retrieval_score_difference": max(gaps, default=0.0),
    }


def thresholds(setup: Setup, queries: list[Query]) -> dict[str, Any]:
    out: dict[str, Any] = {"rag_threshold": RAG_THRESHOLD}
    for kind in ("pubmedqa", "clinc"):
        scores = [s for s, q in zip(setup.scores, queries, strict=True) if q.kind == kind and s is not None]
        out[kind] = {
            "n": len(scores),
            **{f"p{q}": percentile(scores, q) for q in (1, 5, 25, 50, 75, 95, 99)},
            "min": min(scores),
            "max": max(scores),
            "share_at_or_above_threshold": statistics.fmean(s >= RAG_THRESHOLD for s in scores),
            "share_with_context": statistics.fmean(
                bool(used) for used, q in zip(setup.used, queries, strict=True) if q.kind == kind
            ),
            "scores": scores,
            "on_the_wrong_side": [
                (q.text, s)
                for s, q in zip(setup.scores, queries, strict=True)
                if q.kind == kind and s is not None and (s >= RAG_THRESHOLD) != (kind == "pubmedqa")
            ],
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_start = os.getloadavg()
    embedders = {b: load_embedder(threads=args.threads, backend=b) for b in BACKENDS}
    builder = embedders["onnx"]  # the same vectors as torch's, faster (checked below)
    adapters, held_out = adapter_manifests(builder)
    queries = make_queries(held_out, args.clinc, args.pubmedqa, args.seed)
    log(f"{len(queries)} queries; 8 adapters x {len(adapters.manifests()[0].examples)} examples")
    with tempfile.TemporaryDirectory() as path, closing(persistent_client(path)) as client:
        store = ChunkStore(client, embedder=builder.name)
        index = build_index(client, store, builder, args.chunks, args.seed)
        lexical = LexicalIndex()
        router = functools.partial(
            Router,
            top_k=TOP_K,
            rag_threshold=RAG_THRESHOLD,
            retry_after_s=1,
        )
        setups = []
        for backend, embedder in embedders.items():
            retriever = Retriever(store, embedder, lexical)
            learner = RouteLearner(embedder, None, general_chat_prompts())
            setups.append(
                Setup(backend, embedder, retriever, router(embedder, retriever, adapters, learner), adapters)
            )
        started = time.perf_counter()
        Retriever(store, builder, lexical).warm_up()
        index["bm25_build_ms"] = ms_since(started)
        log(f"index: {index}")
        parts = asyncio.run(measure(setups, store, lexical, queries, args.warmup))
    backends = {s.backend: speed(s) for s in setups}
    meeting = [b for b in BACKENDS if all(backends[b]["met"].values())]
    by = {s.backend: s for s in setups}
    accuracy = agreement(by["onnx"], by["torch"])
    return {
        "setup": {
            "chunks": index,
            "adapters": len(adapters.manifests()),
            "examples_per_adapter": len(adapters.manifests()[0].examples),
            "queries": {"clinc": args.clinc, "pubmedqa": args.pubmedqa, "warmup": args.warmup},
            "top_k": TOP_K,
            "router": "classifier: 20 examples and a description per adapter, bundled general chat",
            "seed": args.seed,
        },
        "targets": TARGETS,
        "backends": backends,
        "search_parts": {
            **{part: latency(samples) for part, samples in parts.items()},
            # What the parts timed apart leave of the whole search: fusion, fetching lexical-only
            # hits (one more chromadb get), building the passages.
            "rest_of_hybrid_search_median_ms": statistics.median(
                whole - sum(parts[p][n] for p in PARTS[1:-1])
                for n, whole in enumerate(parts["hybrid_search"])
            ),
        },
        "accuracy": accuracy,
        "backends_meeting_all_targets": meeting,
        "routing": {
            kind: Counter(a for a, q in zip(by["onnx"].adapters, queries, strict=True) if q.kind == kind)
            for kind in ("clinc", "pubmedqa")
        },
        "thresholds": thresholds(by["onnx"], queries),
        "samples_ms": {s.backend: s.samples_ms for s in setups},
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "threads": args.threads,
            "load_average_at_start": load_start,
            "load_average_at_end": os.getloadavg(),
            "load_average_at_log_lines": LOADS,
        },
        "runtime_s": time.perf_counter() - STARTED,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=10_000, help="chunks indexed, real included")
    parser.add_argument("--clinc", type=int, default=300, help="CLINC150 val queries")
    parser.add_argument("--pubmedqa", type=int, default=100, help="PubMedQA questions")
    parser.add_argument("--warmup", type=int, default=30, help="untimed queries first")
    parser.add_argument("--threads", type=int, default=None, help="embedder threads (default: the backend's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "router_speed.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "router_speed.png")
    summary(result)


if __name__ == "__main__":
    main()
