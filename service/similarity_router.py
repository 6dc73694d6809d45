"""The similarity router that the learned classifier replaces, kept as the comparison in
``hybrid-serve router eval``.

An adapter is a few normalised vectors (its example prompts and its description); a query's
score for it is the best cosine similarity to one of them. The best-scoring adapter wins at or
above its threshold (fitted by :func:`~service.route_fit.fit_thresholds`, else a default);
otherwise the base model answers. With one vector per adapter (the centroid of its prompts) and
one threshold for all, the same scorer is the naive baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from index.embedder import Vectors
from service.route_fit import BASE, Fit, Scored, fit_thresholds


class NearestExample:
    """Every adapter's best similarity to a batch of queries, from one matrix product."""

    def __init__(self, profiles: Mapping[str, Vectors]) -> None:
        # Adapters without a vector have no score: only a request naming them reaches them.
        kept = [(name, vectors) for name, vectors in profiles.items() if len(vectors)]
        self.names = tuple(name for name, _ in kept)
        self._matrix = np.vstack([v for _, v in kept]) if kept else np.zeros((0, 0), dtype=np.float32)
        sizes = [len(v) for _, v in kept]
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if kept else None

    @classmethod
    def centroids(cls, profiles: Mapping[str, Vectors]) -> NearestExample:
        """One normalised mean vector per adapter (the baseline)."""
        means = {name: v.mean(axis=0, keepdims=True) for name, v in profiles.items() if len(v)}
        return cls({name: m / max(float(np.linalg.norm(m)), 1e-12) for name, m in means.items()})

    def scores(self, vectors: Vectors) -> npt.NDArray[np.float32]:
        """``queries x adapters``: best cosine similarity of each query to each adapter's rows."""
        queries = np.atleast_2d(vectors)
        if self._starts is None:
            return np.zeros((len(queries), 0), dtype=np.float32)
        similarity = queries @ self._matrix.T
        # Each adapter's rows are contiguous, so one reduceat gives every adapter's best.
        return np.maximum.reduceat(similarity, self._starts, axis=1).astype(np.float32)

    def scored(self, labels: Sequence[str], vectors: Vectors) -> list[Scored]:
        """Labelled examples with their scores, as :func:`fit_thresholds` takes them."""
        rows = self.scores(vectors)
        return [
            Scored(label, {name: float(s) for name, s in zip(self.names, row, strict=True)})
            for label, row in zip(labels, rows, strict=True)
        ]

    def fit(self, labels: Sequence[str], vectors: Vectors) -> dict[str, Fit]:
        """Each adapter's threshold, fitted on labelled examples exactly as ``router fit`` does."""
        return fit_thresholds(self.scored(labels, vectors))

    def decide(self, vectors: Vectors, thresholds: Mapping[str, float], default: float) -> list[str]:
        """The best adapter for each query if it reaches its threshold, else ``base``."""
        scores = self.scores(vectors)
        if not self.names:
            return [BASE] * len(scores)
        cut = np.array([thresholds.get(name, default) for name in self.names], dtype=np.float32)
        best = scores.argmax(axis=1)
        top = scores[np.arange(len(scores)), best]
        return [self.names[b] if s >= cut[b] else BASE for b, s in zip(best, top, strict=True)]

    def fit_one_threshold(self, labels: Sequence[str], vectors: Vectors) -> float:
        """The one threshold for every adapter that routes the most examples right (ties: the
        lowest)."""
        scores = self.scores(vectors)
        if not self.names or not len(scores):
            return 0.0
        winner = np.array(self.names)[scores.argmax(axis=1)]
        top = scores.max(axis=1)
        truth = np.array(labels)
        own, base = winner == truth, truth == BASE
        # Cuts halfway between consecutive scores (and past both ends), as fit_thresholds makes.
        distinct = np.unique(top)
        candidates = np.concatenate(
            [distinct[:1] - 1e-4, (distinct[1:] + distinct[:-1]) / 2, distinct[-1:] + 1e-4]
        )
        right = [int((own & (top >= t)).sum() + (base & (top < t)).sum()) for t in candidates]
        return float(candidates[int(np.argmax(right))])
