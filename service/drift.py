"""How far the router's recent traffic has moved from what it was fitted on: pure functions over
arrays (``hybrid-serve router drift`` gathers them, :mod:`service.drift_reference` builds the
fit-time side).

Both sides are routing outcomes of queries: the recent ones from the traffic log (the served
model's probabilities), the fit-time ones from the fit rows scored out of fold (each by a model
that did not see it, as at fit time: an unseen query's view). Per class, on the queries decided
for it:

- **share** of the queries, recent against fit time (and the class's share of the fit rows);
- **confidence** (the probability of the class decided): the population stability index over
  ten equal-width bins of [0, 1] and the two-sample Kolmogorov-Smirnov statistic. PSI above
  0.2 is the usual sign of a shifted population, 0.1 to 0.2 of a moderate one;
- **abstentions**: of the queries whose most probable adapter was this one, the share sent to
  the base model for falling short of the threshold;
- **embedding**: the mean cosine similarity of the queries to the class's centroid (the mean of
  its fit rows' vectors), recent against fit time: new phrasings or topics lower it.

A class is flagged when its confidence PSI passes the threshold with at least ``min_samples``
queries on each side (fewer give a PSI that is mostly noise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from index.embedder import Vectors
from service.route_model import BASE

Values = Sequence[float] | npt.NDArray[np.float64]
PSI_DRIFT = 0.2
PSI_EDGES = np.linspace(0.0, 1.0, 11)
_EPSILON = 1e-4
"""Floor of a bin's share: an empty bin would make the index infinite."""


@dataclass(frozen=True)
class Routed:
    """Routing outcomes of a set of queries, one entry per query."""

    decided: Sequence[str]
    """The class decided: an adapter, or ``base``."""
    confidence: npt.NDArray[np.float64]
    """The probability of the class decided."""
    best: Sequence[str | None]
    """The most probable adapter (None: no adapter was scored)."""
    abstained: npt.NDArray[np.bool_]
    vectors: Vectors | None = None
    """The queries' normalised embeddings (None: not measured)."""

    def __len__(self) -> int:
        return len(self.decided)


@dataclass(frozen=True)
class ClassDrift:
    name: str
    recent: int
    """Recent queries decided for this class."""
    reference: int
    """Fit rows decided for it out of fold."""
    recent_share: float
    reference_share: float
    fit_share: float
    """Its share of the fit rows (by label)."""
    confidence_recent: float | None
    confidence_reference: float | None
    psi: float | None
    ks: float | None
    abstain_recent: float | None
    abstain_reference: float | None
    cosine_recent: float | None
    cosine_reference: float | None
    drifted: bool
    note: str | None
    """Why it is flagged, or why it could not be judged."""


@dataclass(frozen=True)
class DriftReport:
    classes: list[ClassDrift]
    share_psi: float
    """PSI of the classes' shares, recent against fit time."""
    psi_threshold: float
    min_samples: int

    @property
    def drifted(self) -> list[str]:
        return [row.name for row in self.classes if row.drifted]

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": [asdict(row) for row in self.classes],
            "share_psi": self.share_psi,
            "psi_threshold": self.psi_threshold,
            "min_samples": self.min_samples,
            "drifted": self.drifted,
        }


def psi(reference: Values, recent: Values) -> float:
    """Population stability index of ``recent`` against ``reference`` (values in [0, 1], ten
    equal-width bins): the sum over bins of (recent - reference) * ln(recent / reference)."""
    expected = _histogram(np.asarray(reference, dtype=np.float64))
    actual = _histogram(np.asarray(recent, dtype=np.float64))
    return _index(expected, actual)


def share_psi(reference: Mapping[str, float], recent: Mapping[str, float]) -> float:
    """The same index over categories (the classes' shares)."""
    names = sorted(set(reference) | set(recent))
    expected = np.array([reference.get(name, 0.0) for name in names])
    actual = np.array([recent.get(name, 0.0) for name in names])
    return _index(expected, actual)


def ks_statistic(reference: Values, recent: Values) -> float:
    """The largest distance between the two empirical distribution functions (0: identical
    samples, 1: disjoint)."""
    a = np.sort(np.asarray(reference, dtype=np.float64))
    b = np.sort(np.asarray(recent, dtype=np.float64))
    if not len(a) or not len(b):
        raise ValueError("both samples need at least one value")
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def shares(labels: Sequence[str], classes: Sequence[str]) -> dict[str, float]:
    """Each class's share of ``labels`` (0 for a class absent from them)."""
    total = len(labels)
    counts = {name: 0 for name in classes}
    for label in labels:
        if label in counts:
            counts[label] += 1
    return {name: (count / total if total else 0.0) for name, count in counts.items()}


def centroids(vectors: Vectors, labels: Sequence[str]) -> dict[str, Vectors]:
    """The normalised mean vector of each label's rows."""
    found: dict[str, Vectors] = {}
    array = np.asarray(labels)
    for name in dict.fromkeys(labels):
        mean = vectors[array == name].mean(axis=0)
        found[name] = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
    return found


def mean_cosine(
    vectors: Vectors, decided: Sequence[str], centres: Mapping[str, Vectors], name: str
) -> float | None:
    """Mean cosine similarity to ``name``'s centroid of the queries decided for it (None: none
    was, or the class has no centroid)."""
    rows = np.asarray(decided) == name
    if not rows.any() or name not in centres:
        return None
    return float((vectors[rows] @ centres[name]).mean())


def decide(
    probabilities: npt.NDArray[np.float64],
    classes: Sequence[str],
    abstain: float,
    thresholds: Mapping[str, float] | None = None,
) -> Routed:
    """The router's rule over probability rows: the most probable adapter if it reaches its
    threshold (``thresholds``, else ``abstain``), otherwise the base model."""
    names = list(classes)
    base = names.index(BASE)
    masked = probabilities.copy()
    masked[:, base] = -1.0
    top = masked.argmax(axis=1)
    best = [names[i] for i in top]
    needed = np.array([(thresholds or {}).get(name, abstain) for name in best])
    abstained = masked.max(axis=1) < needed
    decided = [BASE if out else name for name, out in zip(best, abstained, strict=True)]
    confidence = probabilities[np.arange(len(probabilities)), [names.index(d) for d in decided]]
    return Routed(decided, confidence.astype(np.float64), best, abstained)


def compare(
    reference: Routed,
    recent: Routed,
    classes: Sequence[str],
    fit_share: Mapping[str, float],
    centres: Mapping[str, Vectors] | None = None,
    *,
    psi_threshold: float = PSI_DRIFT,
    min_samples: int = 20,
) -> DriftReport:
    """Per class, recent traffic against the fit-time reference (see the module docstring)."""
    reference_shares = shares(reference.decided, classes)
    recent_shares = shares(recent.decided, classes)
    rows = []
    for name in classes:
        ref_conf = _of(reference, name)
        new_conf = _of(recent, name)
        measured = len(ref_conf) > 0 and len(new_conf) > 0
        index = psi(ref_conf, new_conf) if measured else None
        enough = min(len(ref_conf), len(new_conf)) >= min_samples
        drifted = index is not None and enough and index > psi_threshold
        if drifted:
            note = f"confidence PSI {index:.2f} > {psi_threshold:.2f}"
        elif not enough:
            note = f"too few queries to judge (fewer than {min_samples} on a side)"
        else:
            note = None
        rows.append(
            ClassDrift(
                name=name,
                recent=len(new_conf),
                reference=len(ref_conf),
                recent_share=round(recent_shares[name], 4),
                reference_share=round(reference_shares[name], 4),
                fit_share=round(fit_share.get(name, 0.0), 4),
                confidence_recent=_mean(new_conf),
                confidence_reference=_mean(ref_conf),
                psi=None if index is None else round(index, 4),
                ks=round(ks_statistic(ref_conf, new_conf), 4) if measured else None,
                abstain_recent=_abstentions(recent, name),
                abstain_reference=_abstentions(reference, name),
                cosine_recent=_cosine(recent, centres, name),
                cosine_reference=_cosine(reference, centres, name),
                drifted=drifted,
                note=note,
            )
        )
    return DriftReport(rows, round(share_psi(reference_shares, recent_shares), 4), psi_threshold, min_samples)


def _histogram(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=PSI_EDGES)
    return counts / max(len(values), 1)


def _index(expected: npt.NDArray[np.float64], actual: npt.NDArray[np.float64]) -> float:
    expected = np.maximum(expected, _EPSILON)
    actual = np.maximum(actual, _EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _of(routed: Routed, name: str) -> npt.NDArray[np.float64]:
    return routed.confidence[np.asarray(routed.decided) == name] if len(routed) else np.zeros(0)


def _mean(values: npt.NDArray[np.float64]) -> float | None:
    return round(float(values.mean()), 4) if len(values) else None


def _abstentions(routed: Routed, name: str) -> float | None:
    if name == BASE or not len(routed):
        return None
    rows = np.asarray([best == name for best in routed.best])
    return round(float(routed.abstained[rows].mean()), 4) if rows.any() else None


def _cosine(routed: Routed, centres: Mapping[str, Vectors] | None, name: str) -> float | None:
    if routed.vectors is None or centres is None or not len(routed):
        return None
    value = mean_cosine(routed.vectors, routed.decided, centres, name)
    return None if value is None else round(value, 4)
