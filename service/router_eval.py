"""``hybrid-serve router eval``: the learned router against the similarity (threshold) router and
a nearest-centroid baseline on CLINC150, out of the box and fitted on 10 prompts per intent.

Eight CLINC150 domains stand for adapters (banking, credit_cards, travel, auto_and_commute,
kitchen_and_dining, home, utility, work); small talk, meta and out-of-scope queries belong to
the base model. Each adapter gets 20 example prompts from ``train``, picked to cover its domain
(greedy facility location), and a description made of its intents' names.

- Out of the box: no labelled traffic. The classifier is fitted on the adapters' examples and
  descriptions and the bundled general-chat prompts (``base``); the threshold router uses the
  default threshold.
- Fitted: a labelled sample of 10 ``train`` prompts per intent (seed 0, all 150 intents) and all
  of ``oos_train``. The classifier adds them to its rows; the threshold router fits its
  per-adapter thresholds on them (as ``router fit`` does); the baseline fits its one threshold.

Every figure comes from ``val`` + ``oos_val``, which nothing is fitted on (a fit text that also
occurs there is dropped). Writes ``router_eval.json`` and ``router_eval.png``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from adapters.manifest import AdapterManifest
from index.embedder import Embedder, Vectors
from service.general_chat import general_chat_prompts
from service.knowledge import embedder_from_settings
from service.route_fit import BASE, RoutingScore
from service.route_training import LabelledText, decide, fit_route_model
from service.settings import load_settings
from service.similarity_router import NearestExample

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
LABELS = (*DOMAINS, BASE)
EXAMPLES_PER_ADAPTER = 20
PROMPTS_PER_INTENT = 10
SAMPLE_SEED = 0
OOS = "oos"
DEFAULT_THRESHOLD = 0.45
"""The threshold router's default threshold (what ``HYBRID_ROUTER_THRESHOLD`` defaulted to)."""
TARGETS = {
    "out_of_the_box": {"in_domain_accuracy": 0.90, "base_recall": 0.90},
    "fitted": {"in_domain_accuracy": 0.97, "base_recall": 0.90},
}
SWEEP = [round(float(t), 2) for t in np.arange(0.05, 0.951, 0.05)]
TIMED_QUERIES = 1000
NOTE = (
    "Every figure is on val + oos_val; nothing is fitted on them. The classifiers' abstain "
    "thresholds are fitted on out-of-fold predictions of their own fit rows, never picked on "
    "held-out data; the abstain sweep over held-out data only shows the trade-off."
)


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[str]
    """An adapter (domain) name, or ``base``."""
    intents: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    """The CLINC150 domain of each query, or ``oos``."""

    def subset(self, rows: Iterable[int]) -> Split:
        rows = list(rows)
        columns = (self.texts, self.labels, self.intents, self.sources)
        return Split(*([values[i] for i in rows] if values else [] for values in columns))


class FixedAdapters:
    """Adapters as manifests only (nothing is loaded into an engine): ``bench.router_speed``."""

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
        out = Split([], [], [], [])
        for name in names:
            for text, intent in rows[name]:
                source = domain_of.get(intent, OOS)
                out.texts.append(text)
                out.labels.append(source if source in DOMAINS else BASE)
                out.intents.append(intent)
                out.sources.append(source)
        return out

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


def describe(domain: str, intents: Sequence[str]) -> str:
    """An adapter's one-line description: its domain and the names of its intents."""
    return f"{domain.replace('_', ' ')}: {', '.join(i.replace('_', ' ') for i in intents)}"


def build_adapters(fit: Split, fit_vectors: Vectors, domains: dict[str, list[str]]) -> list[AdapterManifest]:
    labels = np.array(fit.labels)
    manifests = []
    for domain in DOMAINS:
        rows = np.flatnonzero(labels == domain)
        picked = [fit.texts[rows[i]] for i in pick_examples(fit_vectors[rows], EXAMPLES_PER_ADAPTER)]
        manifests.append(_manifest(domain, describe(domain, domains[domain]), picked))
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


def labelled_sample(fit: Split, per_intent: int, seed: int) -> list[int]:
    """Rows of ``per_intent`` prompts of every intent, drawn with ``seed``, and every ``oos`` row."""
    rng = np.random.default_rng(seed)
    intents = np.array(fit.intents)
    rows: list[int] = np.flatnonzero(intents == OOS).tolist()
    for intent in sorted(set(fit.intents) - {OOS}):
        of_intent = np.flatnonzero(intents == intent)
        rows += rng.choice(of_intent, min(per_intent, len(of_intent)), replace=False).tolist()
    return sorted(rows)


class VectorTable:
    """Every distinct text embedded once; looked up by text."""

    def __init__(self, embedder: Embedder, texts: Iterable[str]) -> None:
        distinct = list(dict.fromkeys(texts))
        self._row = {text: i for i, text in enumerate(distinct)}
        start = time.perf_counter()
        self._vectors = embedder.embed(distinct)
        self.seconds = time.perf_counter() - start
        self.texts = len(distinct)

    def __call__(self, texts: Sequence[str]) -> Vectors:
        return self._vectors[[self._row[text] for text in texts]]


@dataclass(frozen=True)
class Material:
    """What the evaluation fits on and measures on."""

    held_out: Split
    adapters: list[AdapterManifest]
    out_of_the_box: list[LabelledText]
    """Each adapter's examples and description, and the general-chat prompts as ``base``."""
    sample: Split
    """The labelled sample of the fitted setting."""
    excluded: dict[str, int]
    """Fit texts left out because they also occur in the held-out split."""
    vectors: VectorTable

    @property
    def fitted(self) -> list[LabelledText]:
        extra = [
            LabelledText(t, label, "fit")
            for t, label in zip(self.sample.texts, self.sample.labels, strict=True)
        ]
        return [*self.out_of_the_box, *extra]

    def profiles(self) -> dict[str, Vectors]:
        return {m.name: self.vectors([*m.examples, m.description]) for m in self.adapters}


def prepare(data: Path, embedder: Embedder) -> Material:
    clinc_train, held_out, domains = load_clinc(data)
    held = set(held_out.texts)
    fit = clinc_train.subset(i for i, text in enumerate(clinc_train.texts) if text not in held)
    bundled = general_chat_prompts()
    general = [text for text in bundled if text not in held]
    descriptions = [describe(d, domains[d]) for d in DOMAINS]
    logger.info("embedding the fit, held-out and general-chat texts")
    vectors = VectorTable(embedder, [*fit.texts, *held_out.texts, *general, *descriptions])
    adapters = build_adapters(fit, vectors(fit.texts), domains)
    rows = [LabelledText(text, m.name, "example") for m in adapters for text in m.examples]
    rows += [LabelledText(m.description, m.name, "description") for m in adapters]
    rows += [LabelledText(text, BASE, "general") for text in general]
    sample = fit.subset(labelled_sample(fit, PROMPTS_PER_INTENT, SAMPLE_SEED))
    excluded = {
        "clinc_train": len(clinc_train.texts) - len(fit.texts),
        "general": len(bundled) - len(general),
    }
    return Material(held_out, adapters, rows, sample, excluded, vectors)


def evaluate(data: Path, embedder: Embedder, default_threshold: float) -> dict[str, Any]:
    """Every method of both settings on the held-out split: the report ``router_eval.json`` holds."""
    return compare(prepare(data, embedder), default_threshold, data=str(data), embedder=embedder.name)


def compare(material: Material, default_threshold: float, **about: Any) -> dict[str, Any]:
    """Fit every method on ``material`` and measure it on its held-out split."""
    held = material.held_out
    queries = material.vectors(held.texts)
    similarity = NearestExample(material.profiles())
    sample_vectors = material.vectors(material.sample.texts)
    fits = similarity.fit(material.sample.labels, sample_vectors)
    thresholds = {name: f.threshold for name, f in fits.items()}
    centroids = NearestExample.centroids(material.profiles())
    one_threshold = centroids.fit_one_threshold(material.sample.labels, sample_vectors)

    default = _method(held, similarity.decide(queries, {}, default_threshold), "out_of_the_box")
    fitted = _method(held, similarity.decide(queries, thresholds, default_threshold), "fitted")
    baseline = _method(held, centroids.decide(queries, {}, one_threshold), "fitted")
    settings: dict[str, dict[str, Any]] = {
        "out_of_the_box": {
            "fit_rows": len(material.out_of_the_box),
            "methods": {
                "classifier": _classifier(material, material.out_of_the_box, queries, "out_of_the_box"),
                "threshold_router": default | {"threshold": default_threshold},
            },
        },
        "fitted": {
            "fit_rows": len(material.fitted),
            "sample": {
                "prompts_per_intent": PROMPTS_PER_INTENT,
                "seed": SAMPLE_SEED,
                "rows": len(material.sample.texts),
                "intents": len(set(material.sample.intents) - {OOS}),
                "oos_train": material.sample.intents.count(OOS),
            },
            "methods": {
                "classifier": _classifier(material, material.fitted, queries, "fitted"),
                "threshold_router": fitted
                | {"thresholds": {name: asdict(f) for name, f in sorted(fits.items())}},
                "centroid_baseline": baseline | {"threshold": one_threshold},
            },
        },
    }
    for name, setting in settings.items():
        setting["targets"] = TARGETS[name]
        setting["targets_met"] = setting["methods"]["classifier"]["targets_met"]
    return {
        **about,
        "note": NOTE,
        "labels": list(LABELS),
        "held_out": {"split": "val + oos_val", **_counts(held)},
        "excluded_from_fit": material.excluded,
        "adapters": {
            m.name: {"examples": list(m.examples), "description": m.description} for m in material.adapters
        },
        "settings": settings,
        "embedding": {"texts": material.vectors.texts, "seconds": round(material.vectors.seconds, 2)},
        "machine": {"python": platform.python_version(), "cpus": len(os.sched_getaffinity(0))},
    }


def _classifier(
    material: Material, rows: list[LabelledText], queries: Vectors, setting: str
) -> dict[str, Any]:
    start = time.perf_counter()
    route = fit_route_model(rows, material.vectors([row.text for row in rows]))
    seconds = time.perf_counter() - start
    model = route.model
    probabilities = model.probabilities(queries)
    labels = material.held_out.labels
    sweep = []
    for abstain in SWEEP:
        score = RoutingScore.of(labels, decide(probabilities, model.classes, abstain))
        sweep.append(
            {
                "abstain": abstain,
                "in_domain_accuracy": score.in_domain_accuracy,
                "base_recall": score.base_recall,
            }
        )
    return _method(material.held_out, decide(probabilities, model.classes, model.abstain), setting) | {
        "abstain": model.abstain,
        "temperature": model.temperature,
        "prototypes": len(model.owner),
        "validation": asdict(route.validation),
        "fit_rows": route.counts,
        "general_dropped": route.general_dropped,
        "fit_seconds": round(seconds, 2),
        "decision_ms_median": _decision_ms(model.probabilities, model.classes, model.abstain, queries),
        "abstain_sweep": sweep,
    }


def _decision_ms(probabilities: Any, classes: Sequence[str], abstain: float, queries: Vectors) -> float:
    """Median cost of one query's decision (probabilities + rule), in milliseconds."""
    times = []
    for vector in queries[:TIMED_QUERIES]:
        start = time.perf_counter()
        decide(probabilities(vector), classes, abstain)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1000, 4)


def _method(held: Split, decisions: list[str], setting: str) -> dict[str, Any]:
    score = RoutingScore.of(held.labels, decisions)
    return {
        "score": asdict(score),
        "base_recall_by_source": _base_recall_by_source(held, decisions),
        "targets_met": {key: getattr(score, key) >= target for key, target in TARGETS[setting].items()},
        "confusion": confusion(held.labels, decisions),
    }


def _base_recall_by_source(held: Split, decisions: Sequence[str]) -> dict[str, float]:
    routed: dict[str, list[bool]] = {}
    for label, source, got in zip(held.labels, held.sources, decisions, strict=True):
        if label == BASE:
            routed.setdefault(source, []).append(got == BASE)
    return {source: round(sum(hits) / len(hits), 4) for source, hits in sorted(routed.items())}


def _counts(split: Split) -> dict[str, Any]:
    base = [source for label, source in zip(split.labels, split.sources, strict=True) if label == BASE]
    return {
        "queries": len(split.texts),
        "in_domain": len(split.texts) - len(base),
        "base": {source: base.count(source) for source in sorted(set(base))},
    }


def confusion(labels: Sequence[str], decisions: Sequence[str]) -> list[list[int]]:
    """Counts, rows: the true class, columns: the route taken, both in :data:`LABELS` order."""
    order = {name: i for i, name in enumerate(LABELS)}
    matrix = [[0] * len(order) for _ in order]
    for label, got in zip(labels, decisions, strict=True):
        matrix[order[label]][order[got]] += 1
    return matrix


def run_evaluation(data: Path | None, out: Path) -> dict[str, Any]:
    from service.router_eval_plot import plot, table

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    folder = data or Path("..") / "shared" / "data" / "clinc150"
    default_threshold = float(getattr(settings, "router_threshold", DEFAULT_THRESHOLD))
    report = evaluate(folder, embedder_from_settings(settings), default_threshold)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_eval.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "router_eval.png")
    print(table(report))
    return report
