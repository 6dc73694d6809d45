"""The fit-time side of ``hybrid-serve router drift``: a stored router version's rows, scored
out of fold as its fit scored them.

A version keeps its figures, its head and the operator's labelled prompts (``fit_data.jsonl``),
not the probabilities it was validated on. Those are rebuilt here, read-only, from the stores the
gateway uses: the adapters' prompts, the stored labelled prompts and the bundled general chat
give the rows (:func:`~service.route_learner.routing_rows`), the embedder their vectors, and the
fit's own fold split and head the out-of-fold probabilities, calibrated with the version's
temperature. When the rows still hash to the version's fingerprint (no adapter changed since),
they are exactly what the version was fitted on (``exact``); otherwise the adapters' current
prompts stand in for them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from adapters.store import ROUTER_DIR, AdapterStore
from index.embedder import Embedder, Vectors
from service import drift
from service.general_chat import general_chat_prompts
from service.route_learner import fingerprint, routing_rows
from service.route_model import BASE, RouteModel

# The fit's own steps, so that the fold split and the dropped general prompts are the fit's.
from service.route_training import FitSettings, fold_probabilities, out_of_fold, without_overlapping_general
from service.router_store import CURRENT_LINK, RouterStore, RouterStoreError


class NoReferenceError(Exception):
    """No stored router to compare with; the message says why."""


@dataclass(frozen=True)
class Reference:
    version: int
    created_at: str | None
    classes: tuple[str, ...]
    exact: bool
    """The rows are the ones the version was fitted on (same fingerprint)."""
    rows: int
    fit_share: dict[str, float]
    """Each class's share of the rows, by label."""
    routed: drift.Routed
    """The rows out of fold, decided by the router's rule."""
    truth: list[str]
    """The label of each of ``routed``'s rows."""
    centroids: dict[str, Vectors]
    thresholds: dict[str, float]
    """The adapters' own thresholds (the others use the version's abstain threshold)."""
    abstain: float


def load_reference(adapter_dir: Path, embedder: Embedder, version: int | None = None) -> Reference:
    """The reference of the current router version under ``adapter_dir`` (or ``version``).
    Blocking: embeds every row and fits the head once per fold (seconds to a minute)."""
    root = adapter_dir / ROUTER_DIR
    if not (root / CURRENT_LINK).is_symlink():
        raise NoReferenceError(f"no router version is stored under {root}: is HYBRID_ADAPTER_DIR right?")
    try:
        # An infinite age: nothing a running gateway is writing is ever swept from here.
        store = RouterStore(root, stale_after_s=math.inf)
        stored = store.read(version) if version is not None else store.current()
    except RouterStoreError as exc:
        raise NoReferenceError(str(exc)) from None
    if stored is None:
        raise NoReferenceError(f"no router version is stored under {root}")
    model = RouteModel.from_stored(stored.meta, stored.arrays)
    settings = _fit_settings(stored.meta.get("settings"))
    manifests = [record.manifest for record in AdapterStore(adapter_dir, stale_after_s=math.inf).list()]
    rows = routing_rows(manifests, stored.fit_rows, general_chat_prompts())
    exact = fingerprint(rows, embedder.name, settings) == stored.meta.get("fingerprint")
    rows = [row for row in rows if row.label in model.classes]  # adapters added since: not its classes
    if not any(row.label != BASE for row in rows):
        raise NoReferenceError(f"router version {stored.version}: none of its adapters has a prompt any more")
    vectors = embedder.embed([row.text for row in rows])
    with threadpool_limits(limits=1):  # as the fit: many small BLAS calls, threads only cost
        keep = without_overlapping_general(rows, vectors, settings.general_overlap)
        x = vectors[keep]
        labels = [row.label for row, kept in zip(rows, keep, strict=True) if kept]
        y = np.array([model.classes.index(label) for label in labels])
        folds = min(settings.folds, len(labels))
        logits, owners, predicted = out_of_fold(x, y, len(model.classes), folds, settings)
        probabilities = fold_probabilities(logits, owners, len(model.classes), model.temperature)
    thresholds = {m.name: m.threshold for m in manifests if m.threshold is not None}
    routed = drift.decide(probabilities, model.classes, model.abstain, thresholds)
    return Reference(
        version=stored.version,
        created_at=stored.meta.get("created_at"),
        classes=model.classes,
        exact=exact,
        rows=len(labels),
        fit_share=drift.shares(labels, model.classes),
        routed=dataclasses.replace(routed, vectors=x[predicted]),
        truth=[labels[i] for i in predicted],
        centroids=drift.centroids(x, labels),
        thresholds=thresholds,
        abstain=model.abstain,
    )


def _fit_settings(stored: Any) -> FitSettings:
    """The settings the version was fitted with (the defaults for a version that kept none)."""
    if not isinstance(stored, dict):
        return FitSettings()
    known = {f.name for f in dataclasses.fields(FitSettings)}
    return FitSettings(**{key: value for key, value in stored.items() if key in known})
