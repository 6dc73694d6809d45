"""Retrieval: quality on PubMedQA, ingestion throughput against the embedder's own, and recall
against exact search and latency at 100k chunks, in one run, through the real index code.

- quality: the abstracts of every PubMedQA item (``CONTEXTS`` joined) are ingested; each
  ``QUESTION`` is a query whose one relevant document is its own abstract. recall@1/5/10,
  nDCG@10 and MRR on documents (a document ranks where its best chunk does), for dense, BM25
  and fused retrieval; and how often the 4 passages a chat request gets hold the abstract;
- ingestion: ``Ingestor.ingest`` of those abstracts against ``embedder.embed`` alone on exactly
  the texts the ingestor embeds, the embedder timed before and after the ingest so that the
  machine's noise falls on both; chunks/s and embedder tokens/s;
- scale (``bench/retrieval_scale.py``): the real chunks plus synthetic filler up to
  ``--scale-chunks``, one collection per HNSW graph (chromadb's defaults and ``HnswParams()``),
  ``ef_search`` swept on each: recall@10 against brute force, latency of the store's query and
  of the gateway's dense and hybrid search (query embedding excluded; timed on its own), and
  hybrid search again with ``gc.freeze()`` in force, to show the garbage collector's share.

Writes ``bench/results/retrieval.json`` and ``.png``. Not a test: it reports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import retrieval_scale
from index.chunking import ChunkingPolicy, chunk_document, searchable_text
from index.documents import SourceDocument
from index.embedder import Embedder, Vectors, load_embedder
from index.ingest import Ingestor
from index.lexical import LexicalIndex
from index.loaders import text_document
from index.retrieval import Mode, Passage, Retriever
from index.store import ChunkStore, HnswParams, persistent_client

DATA = Path("../shared/data/pubmedqa/train_dev.json")
COLLECTION = "pubmedqa"
MODES: tuple[Mode, ...] = ("dense", "lexical", "hybrid")
# Chunks asked for per query: enough distinct abstracts (about 2 chunks each) to rank 10 of them.
RANKED_CHUNKS = 50
TARGETS = {
    "recall_at_5": 0.95,
    "ingest_to_embedder_ratio": 0.8,
    "recall_at_10_vs_exact": 0.95,
    "search_p99_ms": 15.0,
}
STARTED = time.perf_counter()


def log(message: str) -> None:
    # The load average goes with every line: on a shared machine it says which figures to doubt.
    load = os.getloadavg()[0]
    print(f"[{time.perf_counter() - STARTED:6.0f} s, load {load:4.1f}] {message}", flush=True)


@dataclass(frozen=True)
class Item:
    source: str  # the PMID: the abstract's source in the index
    question: str
    abstract: str


def load_items(path: Path) -> list[Item]:
    data = json.loads(path.read_text())
    return [Item(pmid, item["QUESTION"], " ".join(item["CONTEXTS"])) for pmid, item in data.items()]


def chroma_defaults() -> HnswParams:
    """chromadb's own defaults for a collection created without HNSW settings (this version's)."""
    from chromadb.api.collection_configuration import populate_create_hnsw_defaults

    defaults = populate_create_hnsw_defaults({})
    return HnswParams(defaults["max_neighbors"], defaults["ef_construction"], defaults["ef_search"])


# -- ingestion against the embedder


def embedded_texts(
    documents: Sequence[SourceDocument], embedder: Embedder, policy: ChunkingPolicy
) -> tuple[list[str], int]:
    """What ``Ingestor.ingest`` embeds, and its tokens; built with the function the ingestor
    uses, so that the two timings cover exactly the same texts."""
    texts, tokens = [], 0
    for document in documents:
        for chunk in chunk_document(document, embedder.split_tokens, policy):
            texts.append(searchable_text(chunk.text, chunk.heading, document.title))
            tokens += chunk.tokens
    return texts, tokens


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def ingestion(
    store: ChunkStore, embedder: Embedder, documents: Sequence[SourceDocument], rounds: int
) -> dict[str, Any]:
    """Embedder alone, then (ingest, embedder alone) ``rounds`` times; the first ingest leaves
    ``COLLECTION`` behind for the quality queries, later ones are deleted."""
    policy = ChunkingPolicy()
    chunking_s = timed(lambda: embedded_texts(documents, embedder, policy))
    texts, tokens = embedded_texts(documents, embedder, policy)
    embedder.embed(texts[:32])  # the first forward passes pay for lazy initialisation
    ingestor = Ingestor(store, embedder, policy)
    embed_s = [timed(lambda: embedder.embed(texts))]
    log(f"embedder alone: {len(texts)} chunks in {embed_s[-1]:.0f} s")
    ingest_s = []
    for round_ in range(rounds):
        name = COLLECTION if round_ == 0 else f"{COLLECTION}-{round_}"
        started = time.perf_counter()
        result = ingestor.ingest(name, documents)
        ingest_s.append(time.perf_counter() - started)
        log(f"ingest: {result.chunks} chunks in {ingest_s[-1]:.0f} s")
        if (result.chunks, result.tokens, result.unchanged) != (len(texts), tokens, 0):
            raise AssertionError(f"the ingestor embedded other chunks than the bench's: {result}")
        if round_:
            store.delete_collection(name)
        embed_s.append(timed(lambda: embedder.embed(texts)))
        log(f"embedder alone: {len(texts)} chunks in {embed_s[-1]:.0f} s")
    embed_mean, ingest_mean = statistics.fmean(embed_s), statistics.fmean(ingest_s)
    return {
        "documents": len(documents),
        "chunks": len(texts),
        "tokens": tokens,
        "tokens_per_chunk": tokens / len(texts),
        "chunking": {"size": policy.size, "overlap": policy.overlap},
        "chunking_s": chunking_s,
        "embedder_s": embed_s,
        "ingest_s": ingest_s,
        "embedder": {"chunks_per_s": len(texts) / embed_mean, "tokens_per_s": tokens / embed_mean},
        "ingest": {"chunks_per_s": len(texts) / ingest_mean, "tokens_per_s": tokens / ingest_mean},
        "ratio": embed_mean / ingest_mean,
        "met": embed_mean / ingest_mean >= TARGETS["ingest_to_embedder_ratio"],
    }


# -- quality


def embed_queries(embedder: Embedder, questions: list[str]) -> tuple[Vectors, list[float]]:
    """Each question embedded on its own, as a chat request does; with its latency in ms."""
    embedder.embed(questions[:1])
    vectors, samples = [], []
    for question in questions:
        started = time.perf_counter()
        vectors.append(embedder.embed([question])[0])
        samples.append((time.perf_counter() - started) * 1000)
    return np.stack(vectors), samples


def document_rank(passages: list[Passage], source: str) -> int | None:
    """1-based rank of ``source`` among the documents, each placed at its first chunk."""
    seen: list[str] = []
    for passage in passages:
        if passage.source not in seen:
            seen.append(passage.source)
            if passage.source == source:
                return len(seen)
    return None


def rank_metrics(ranks: list[int | None]) -> dict[str, float]:
    def share(condition: Callable[[int], bool]) -> float:
        return statistics.fmean(rank is not None and condition(rank) for rank in ranks)

    # One relevant document: the ideal DCG is 1, so nDCG@10 is its discounted gain.
    return {
        "recall_at_1": share(lambda r: r <= 1),
        "recall_at_5": share(lambda r: r <= 5),
        "recall_at_10": share(lambda r: r <= 10),
        "ndcg_at_10": statistics.fmean(
            1 / math.log2(rank + 1) if rank is not None and rank <= 10 else 0.0 for rank in ranks
        ),
        "mrr": statistics.fmean(1 / rank if rank is not None else 0.0 for rank in ranks),
    }


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: how likely a split this uneven is if neither mode is better."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / (1 << n)
    return min(1.0, 2 * tail)


def quality(retriever: Retriever, items: list[Item], vectors: Vectors) -> dict[str, Any]:
    ranks: dict[Mode, list[int | None]] = {mode: [] for mode in MODES}
    hits: dict[Mode, list[bool]] = {mode: [] for mode in MODES}
    for item, vector in zip(items, vectors, strict=True):
        for mode in MODES:
            passages = retriever.search(
                vector, item.question, RANKED_CHUNKS, collections=[COLLECTION], mode=mode
            )
            ranks[mode].append(document_rank(passages, item.source))
            context = retriever.search(
                vector, item.question, retrieval_scale.GATEWAY_K, collections=[COLLECTION], mode=mode
            )
            hits[mode].append(any(passage.source == item.source for passage in context))
    modes = {
        mode: rank_metrics(ranks[mode]) | {"context_hit_rate_at_4": statistics.fmean(hits[mode])}
        for mode in MODES
    }
    for figures in modes.values():
        figures["met_recall_at_5"] = figures["recall_at_5"] >= TARGETS["recall_at_5"]
    reciprocal = {mode: [1 / r if r else 0.0 for r in ranks[mode]] for mode in MODES}
    pairs = list(zip(reciprocal["hybrid"], reciprocal["dense"], strict=True))
    return {
        "queries": len(items),
        "ranked_chunks": RANKED_CHUNKS,
        "modes": modes,
        "best_by_recall_at_5": max(MODES, key=lambda m: (modes[m]["recall_at_5"], modes[m]["ndcg_at_10"])),
        "best_by_ndcg_at_10": max(MODES, key=lambda m: modes[m]["ndcg_at_10"]),
        "hybrid_vs_dense": {
            "recall_at_5_delta": modes["hybrid"]["recall_at_5"] - modes["dense"]["recall_at_5"],
            "ndcg_at_10_delta": modes["hybrid"]["ndcg_at_10"] - modes["dense"]["ndcg_at_10"],
            # Per question: which of the two put the abstract higher (a paired view of the same).
            "questions_hybrid_higher": sum(h > d for h, d in pairs),
            "questions_dense_higher": sum(d > h for h, d in pairs),
            "sign_test_p": sign_test(sum(h > d for h, d in pairs), sum(d > h for h, d in pairs)),
        },
        "ranks": {mode: ranks[mode] for mode in MODES},
    }


# -- the run


def machine() -> dict[str, Any]:
    import chromadb
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "chromadb": chromadb.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "targets": TARGETS}
    items = load_items(args.data)[: args.items]
    documents = [text_document(item.source, item.abstract) for item in items]
    embedder = load_embedder()
    log(f"{len(items)} PubMedQA items; embedder {embedder.name}")
    with tempfile.TemporaryDirectory() as data, retrieval_scale.closing(persistent_client(data)) as client:
        store = ChunkStore(client, embedder=embedder.name)
        result["ingestion"] = ingestion(store, embedder, documents, args.ingest_rounds)
        vectors, embed_ms = embed_queries(embedder, [item.question for item in items])
        result["query_embedding"] = retrieval_scale.latency(embed_ms) | {"samples_ms": embed_ms}
        retriever = Retriever(store, embedder, LexicalIndex())
        result["quality"] = quality(retriever, items, vectors)
        log(
            "quality: "
            + ", ".join(f"{m} R@5 {f['recall_at_5']:.3f}" for m, f in result["quality"]["modes"].items())
        )
        if not args.skip_scale:
            real = retrieval_scale.stored_chunks(client, COLLECTION)
            chosen = np.random.default_rng(args.seed).permutation(len(items))[: args.queries]
            queries = retrieval_scale.Queries(
                texts=[items[i].question for i in chosen],
                vectors=vectors[chosen],
                sources=[items[i].source for i in chosen],
            )
            result["scale"] = retrieval_scale.run(real, queries, embedder, args, TARGETS, log)
    result["parameters"] = {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }
    result["met"] = met(result)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["runtime_s"] = time.perf_counter() - STARTED
    return result


def met(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets, for what the gateway runs: hybrid retrieval over ``HnswParams()``."""
    hybrid = result["quality"]["modes"]["hybrid"]
    met = {
        "recall_at_5 (hybrid)": hybrid["recall_at_5"] >= TARGETS["recall_at_5"],
        "ingest_to_embedder_ratio": result["ingestion"]["met"],
    }
    repo = HnswParams()
    shipped = {
        "max_neighbors": repo.max_neighbors,
        "ef_construction": repo.ef_construction,
        "ef_search": repo.ef_search,
    }
    measured = [c for c in result.get("scale", {}).get("configs", []) if c["hnsw"] == shipped]
    # Measured twice (first and last): met only if met both times.
    for key in ("recall_at_10_vs_exact", "hybrid_search_p99_ms"):
        if measured:
            met[f"{key} (HnswParams())"] = all(config["met"][key] for config in measured)
    return met


def summary(result: dict[str, Any]) -> dict[str, Any]:
    quality_ = result["quality"]
    out: dict[str, Any] = {
        "quality": {
            mode: {key: round(value, 3) for key, value in figures.items() if not key.startswith("met")}
            for mode, figures in quality_["modes"].items()
        },
        "hybrid_vs_dense": quality_["hybrid_vs_dense"],
        "ingestion": {
            "embedder_chunks_per_s": result["ingestion"]["embedder"]["chunks_per_s"],
            "ingest_chunks_per_s": result["ingestion"]["ingest"]["chunks_per_s"],
            "embedder_tokens_per_s": result["ingestion"]["embedder"]["tokens_per_s"],
            "ingest_tokens_per_s": result["ingestion"]["ingest"]["tokens_per_s"],
            "ratio": result["ingestion"]["ratio"],
        },
        "query_embedding_p50_p99_ms": [
            result["query_embedding"]["p50_ms"],
            result["query_embedding"]["p99_ms"],
        ],
        "runtime_s": result["runtime_s"],
        "met": result["met"],
    }
    if "scale" in result:
        out["scale"] = {
            config["label"]: {
                "recall_at_10_vs_exact": round(config["recall_at_10_vs_exact"], 4),
                "store_query_p99_ms": round(config["latency"]["store_query_k10"]["p99_ms"], 2),
                "hybrid_p50_ms": round(config["latency"]["hybrid_search_k4"]["p50_ms"], 2),
                "hybrid_p99_ms": round(config["latency"]["hybrid_search_k4"]["p99_ms"], 2),
                "hybrid_gc_frozen_p99_ms": round(
                    config["latency"]["hybrid_search_k4_gc_frozen"]["p99_ms"], 2
                ),
            }
            for config in result["scale"]["configs"]
        }
        out["bm25_build_ms"] = {label: g["bm25_build_ms"] for label, g in result["scale"]["graphs"].items()}
        out["meeting_both_scale_targets"] = result["scale"]["meeting_both_targets"]
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    modes = result["quality"]["modes"]
    metrics = ["recall_at_1", "recall_at_5", "recall_at_10", "ndcg_at_10"]
    width = 0.8 / len(modes)
    for i, (mode, figures) in enumerate(modes.items()):
        axes[0, 0].bar(
            [m + i * width for m in range(len(metrics))], [figures[k] for k in metrics], width, label=mode
        )
    axes[0, 0].axhline(TARGETS["recall_at_5"], color="red", linestyle=":", label="recall@5 target")
    axes[0, 0].set_xticks([m + width for m in range(len(metrics))], metrics)
    axes[0, 0].set_ylim(0, 1.15)
    axes[0, 0].set_title(f"PubMedQA ({result['quality']['queries']} questions): abstract retrieval")
    axes[0, 0].legend(loc="upper center", ncol=4)
    ingestion_ = result["ingestion"]
    axes[0, 1].bar(
        ["embedder alone", "Ingestor.ingest"],
        [ingestion_["embedder"]["chunks_per_s"], ingestion_["ingest"]["chunks_per_s"]],
    )
    axes[0, 1].set_ylabel("chunks / s")
    axes[0, 1].set_title(
        f"Ingestion vs embedder on the same {ingestion_['chunks']} chunks (ratio {ingestion_['ratio']:.2f})"
    )
    if "scale" in result:
        configs = result["scale"]["configs"]
        for config in configs:
            ordered = sorted(config["samples_ms"]["hybrid_search_k4"])
            axes[1, 0].plot(ordered, [i / len(ordered) for i in range(len(ordered))], label=config["label"])
        axes[1, 0].axvline(TARGETS["search_p99_ms"], color="red", linestyle=":")
        axes[1, 0].set_xlabel("ms (query embedding excluded)")
        axes[1, 0].set_ylabel("fraction of queries")
        axes[1, 0].set_title(f"Hybrid search, k=4, {result['scale']['chunks']} chunks")
        axes[1, 0].legend(fontsize=7)
        for config in configs:
            axes[1, 1].scatter(
                config["latency"]["hybrid_search_k4"]["p99_ms"],
                config["recall_at_10_vs_exact"],
                label=config["label"],
            )
        axes[1, 1].axhline(TARGETS["recall_at_10_vs_exact"], color="red", linestyle=":")
        axes[1, 1].axvline(TARGETS["search_p99_ms"], color="red", linestyle=":")
        axes[1, 1].set_xlabel("hybrid search p99 ms")
        axes[1, 1].set_ylabel("recall@10 against exact search")
        axes[1, 1].set_title("HNSW configurations (targets dotted)")
        axes[1, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def hnsw(value: str) -> tuple[str, tuple[int, int, int]]:
    """``label=max_neighbors,ef_construction,ef_search``."""
    label, _, numbers = value.partition("=")
    m, construction, search = (int(n) for n in numbers.split(","))
    return label, (m, construction, search)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    repo, chroma = HnswParams(), chroma_defaults()
    parser.add_argument("--data", type=Path, default=DATA, help="PubMedQA train_dev.json")
    parser.add_argument(
        "--items", type=int, default=None, help="the first N PubMedQA items only (a quick run)"
    )
    parser.add_argument(
        "--ingest-rounds", type=int, default=1, help="ingests, each followed by an embedder run"
    )
    parser.add_argument("--skip-scale", action="store_true", help="quality and ingestion only")
    parser.add_argument(
        "--scale-chunks", type=int, default=100_000, help="chunks indexed at scale, real included"
    )
    parser.add_argument(
        "--queries", type=int, default=300, help="PubMedQA questions used as queries at scale"
    )
    parser.add_argument("--passes", type=int, default=2, help="timed passes over the queries per setup")
    parser.add_argument("--warmup", type=int, default=20, help="untimed queries per setup before each probe")
    parser.add_argument(
        "--graph",
        dest="graphs",
        type=hnsw,
        action="append",
        help="label=max_neighbors,ef_construction,ef_search, repeatable "
        f"(default: chroma-default={chroma.max_neighbors},{chroma.ef_construction},{chroma.ef_search} "
        f"and repo-default={repo.max_neighbors},{repo.ef_construction},{repo.ef_search})",
    )
    parser.add_argument("--ef-search", type=int, nargs="*", default=[16, 32, 64, 256], help="ef_search sweep")
    parser.add_argument("--build-workers", type=int, default=2, help="graphs written at once")
    parser.add_argument(
        "--parent-cosine", type=float, default=0.8, help="synthetic vector to its real parent"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not args.graphs:
        args.graphs = [
            ("chroma-default", (chroma.max_neighbors, chroma.ef_construction, chroma.ef_search)),
            ("repo-default", (repo.max_neighbors, repo.ef_construction, repo.ef_search)),
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "retrieval.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "retrieval.png")
    print(json.dumps(summary(result), indent=2))


if __name__ == "__main__":
    main()
