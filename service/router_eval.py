"""``hybrid-serve router eval``: routing accuracy on CLINC150, with the gateway's own router.

Eight CLINC150 domains stand for adapters (banking, credit_cards, travel, auto_and_commute,
kitchen_and_dining, home, utility, work); small talk, meta and out-of-scope queries belong to
the base model. Each adapter gets at most 20 example prompts from ``train``, picked to cover its
domain (greedy facility location: each pick is the query that most raises every training
query's similarity to its nearest pick), and a description made of its intents' names; they
are untrained (routing is measured, not generation). Thresholds are fitted on ``train`` and
``oos_train`` with :func:`~service.route_fit.fit_thresholds`, exactly as ``router fit`` does;
the figures come from ``val`` and ``oos_val``, each query decided by :meth:`Router.decide`.

Reported in the same run: the router with its default threshold, the router with fitted
thresholds, and the naive baseline (each adapter's centroid, one threshold fitted for all).
Writes ``router_eval.json`` and ``router_eval.png`` (confusion matrices).
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from adapters.manifest import AdapterManifest
from index.embedder import Embedder, Vectors
from service.knowledge import embedder_from_settings
from service.route_fit import BASE, RoutingScore, Scored, fit_thresholds
from service.router import Router, profile_texts
from service.settings import load_settings

logger = logging.getLogger(__name__)

DOMAINS = (
    "banking",
    "credit_cards",
    "travel",
    "auto_and_commute",
    "kitchen_and_dining",
    "home",
    "utility",
    "work",
)
EXAMPLES_PER_ADAPTER = 20
TARGETS = {"in_domain_accuracy": 0.97, "base_recall": 0.90}


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[str]


class FixedAdapters:
    """The evaluation's adapters: manifests only (nothing is loaded into an engine)."""

    def __init__(self, manifests: Sequence[AdapterManifest]) -> None:
        self._manifests = list(manifests)
        self.generation = 0

    def manifests(self) -> list[AdapterManifest]:
        return list(self._manifests)

    def is_servable(self, name: str) -> bool:
        return True

    def set_thresholds(self, thresholds: dict[str, float | None]) -> None:
        self._manifests = [replace(m, threshold=thresholds.get(m.name)) for m in self._manifests]
        self.generation += 1


def load_clinc(folder: Path) -> tuple[Split, Split, dict[str, list[str]]]:
    """(fit split: train + oos_train, evaluation split: val + oos_val, intents of each domain)."""
    domains: dict[str, list[str]] = json.loads((folder / "domains.json").read_text())
    rows = json.loads((folder / "train_val.json").read_text())
    domain_of = {intent: domain for domain, intents in domains.items() for intent in intents}

    def split(*names: str) -> Split:
        texts, labels = [], []
        for name in names:
            for text, intent in rows[name]:
                domain = domain_of.get(intent)
                texts.append(text)
                labels.append(domain if domain in DOMAINS else BASE)
        return Split(texts, labels)

    return split("train", "oos_train"), split("val", "oos_val"), domains


def pick_examples(vectors: Vectors, count: int) -> list[int]:
    """Greedy facility location: ``count`` rows that together are close to every row."""
    similarity = vectors @ vectors.T
    nearest = np.full(len(vectors), -1.0, dtype=np.float32)
    chosen: list[int] = []
    for _ in range(min(count, len(vectors))):
        gain = np.maximum(similarity, nearest[None, :]).sum(axis=1)
        gain[chosen] = -np.inf
        best = int(np.argmax(gain))
        chosen.append(best)
        nearest = np.maximum(nearest, similarity[best])
    return chosen


def build_adapters(fit: Split, fit_vectors: Vectors, domains: dict[str, list[str]]) -> list[AdapterManifest]:
    labels = np.array(fit.labels)
    manifests = []
    for domain in DOMAINS:
        rows = np.flatnonzero(labels == domain)
        picked = [fit.texts[rows[i]] for i in pick_examples(fit_vectors[rows], EXAMPLES_PER_ADAPTER)]
        intents = ", ".join(intent.replace("_", " ") for intent in domains[domain])
        manifests.append(_manifest(domain, f"{domain.replace('_', ' ')}: {intents}", picked))
    return manifests


def _manifest(name: str, description: str, examples: list[str]) -> AdapterManifest:
    return AdapterManifest(
        name=name,
        description=description,
        examples=tuple(examples),
        threshold=None,
        allow_retrieval=True,
        sha256="untrained",
        rank=8,
        alpha=16.0,
        target_modules=("q_proj", "v_proj"),
        base_model="evaluation",
        created_at=datetime.now(UTC),
    )


def centroid_baseline(
    embedder: Embedder,
    manifests: Sequence[AdapterManifest],
    fit: Split,
    fit_vectors: Vectors,
    queries: Vectors,
) -> tuple[list[str], float]:
    """Nearest centroid of each adapter's examples and description, one threshold for all
    (the one that routes the most fit examples right)."""
    centroids = []
    for manifest in manifests:
        mean = embedder.embed(profile_texts(manifest)).mean(axis=0)
        centroids.append(mean / np.linalg.norm(mean))
    matrix = np.vstack(centroids)
    names = np.array([m.name for m in manifests])

    def decide(vectors: Vectors, threshold: float) -> list[str]:
        similarity = vectors @ matrix.T
        best = similarity.argmax(axis=1)
        top = similarity.max(axis=1)
        return [str(n) if s >= threshold else BASE for n, s in zip(names[best], top, strict=True)]

    fit_top = np.sort((fit_vectors @ matrix.T).max(axis=1))
    candidates = np.unique(np.round(fit_top, 3))
    labels = fit.labels
    threshold = max(
        candidates, key=lambda t: sum(a == b for a, b in zip(decide(fit_vectors, t), labels, strict=True))
    )
    return decide(queries, float(threshold)), float(threshold)


async def _decide_all(router: Router, texts: Sequence[str]) -> list[str]:
    decisions = []
    for text in texts:
        decision = await router.decide([{"role": "user", "content": text}], pin=None, rag="off")
        decisions.append(decision.adapter or BASE)
    return decisions


def evaluate(data: Path, embedder: Embedder, default_threshold: float) -> dict[str, Any]:
    fit, held_out, domains = load_clinc(data)
    logger.info("embedding %d fit queries", len(fit.texts))
    fit_vectors = embedder.embed(fit.texts)
    manifests = build_adapters(fit, fit_vectors, domains)
    adapters = FixedAdapters(manifests)
    router = Router(
        embedder,
        None,
        adapters,
        top_k=4,
        default_threshold=default_threshold,
        rag_threshold=1.0,
        retry_after_s=1,
    )

    default_decisions = asyncio.run(_decide_all(router, held_out.texts))
    signal = asyncio.run(router.domain_signal())
    scored = [Scored(label, signal.scores(v)) for label, v in zip(fit.labels, fit_vectors, strict=True)]
    fits = fit_thresholds(scored)
    adapters.set_thresholds({name: f.threshold for name, f in fits.items()})
    fitted_decisions = asyncio.run(_decide_all(router, held_out.texts))

    baseline_decisions, baseline_threshold = centroid_baseline(
        embedder, manifests, fit, fit_vectors, embedder.embed(held_out.texts)
    )
    results = {
        "router_fitted": asdict(RoutingScore.of(held_out.labels, fitted_decisions)),
        "router_default_threshold": asdict(RoutingScore.of(held_out.labels, default_decisions)),
        "baseline_centroid": asdict(RoutingScore.of(held_out.labels, baseline_decisions)),
    }
    fitted = results["router_fitted"]
    return {
        "data": str(data),
        "adapters": {m.name: {"examples": list(m.examples), "description": m.description} for m in manifests},
        "thresholds": {name: asdict(f) for name, f in sorted(fits.items())},
        "default_threshold": default_threshold,
        "baseline_threshold": baseline_threshold,
        "results": results,
        "targets": TARGETS,
        "targets_met": {key: fitted[key] >= target for key, target in TARGETS.items()},
        "ahead_of_baseline": {
            key: fitted[key] > results["baseline_centroid"][key]
            for key in ("in_domain_accuracy", "base_recall")
        },
        "confusion": {
            "labels": [*DOMAINS, BASE],
            "router_fitted": _confusion(held_out.labels, fitted_decisions),
            "baseline_centroid": _confusion(held_out.labels, baseline_decisions),
        },
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "embedder": embedder.name,
    }


def _confusion(labels: Sequence[str], decisions: Sequence[str]) -> list[list[int]]:
    order = {name: i for i, name in enumerate([*DOMAINS, BASE])}
    matrix = [[0] * len(order) for _ in order]
    for label, got in zip(labels, decisions, strict=True):
        matrix[order[label]][order[got]] += 1
    return matrix


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = report["confusion"]["labels"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, key, title in (
        (axes[0], "router_fitted", "router (nearest example, fitted thresholds)"),
        (axes[1], "baseline_centroid", "baseline (nearest centroid, one threshold)"),
    ):
        matrix = np.array(report["confusion"][key], dtype=float)
        shares = matrix / matrix.sum(axis=1, keepdims=True)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if matrix[i, j]:
                    color = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7, color=color)
        score = report["results"][key]
        ax.set_title(
            f"{title}\nin-domain {score['in_domain_accuracy']:.1%}, base recall {score['base_recall']:.1%}, "
            f"macro-F1 {score['macro_f1']:.3f}",
            fontsize=9,
        )
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("routed to")
        ax.set_ylabel("belongs to")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_evaluation(data: Path | None, out: Path) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    folder = data or Path("..") / "shared" / "data" / "clinc150"
    embedder = embedder_from_settings(settings)
    report = evaluate(folder, embedder, settings.router_threshold)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_eval.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "router_eval.png")
    for name, score in report["results"].items():
        print(
            f"{name:26s} in-domain {score['in_domain_accuracy']:.4f}  "
            f"base recall {score['base_recall']:.4f}  "
            f"macro-F1 {score['macro_f1']:.4f}"
        )
    print(f"targets met: {report['targets_met']}; ahead of the baseline: {report['ahead_of_baseline']}")
    return report
