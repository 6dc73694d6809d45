"""Fitting per-adapter similarity thresholds from labelled examples (the previous router's way,
kept for the evaluation's baseline, :mod:`service.similarity_router`), and scoring decisions.

A threshold only matters for the queries its adapter wins (it is the best-scoring one): above
it they go to the adapter, below it to the base model. So each adapter's threshold is fitted on
the examples it wins alone, as the cut that gets the most of them right: those labelled with
the adapter above, those labelled ``base`` below (an example of another adapter is wrong either
way). The cut lies halfway between the two scores it separates, so a query scoring like the
nearest fitted example lands on the same side.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

BASE = "base"


@dataclass(frozen=True)
class Scored:
    """A labelled example and the router's similarity of it to every adapter."""

    label: str
    """An adapter name, or ``base``."""
    scores: Mapping[str, float]

    @property
    def winner(self) -> str | None:
        return max(self.scores, key=self.scores.__getitem__) if self.scores else None


@dataclass(frozen=True)
class Fit:
    threshold: float
    examples: int
    """Examples this adapter wins (the ones the threshold decides)."""
    correct: int
    """Of those, how many the threshold routes right."""


def fit_thresholds(examples: Iterable[Scored]) -> dict[str, Fit]:
    """The best threshold of each adapter that wins at least one example."""
    won: dict[str, list[tuple[float, str]]] = {}
    for example in examples:
        winner = example.winner
        if winner is not None:
            won.setdefault(winner, []).append((example.scores[winner], example.label))
    return {adapter: _best_cut(adapter, pairs) for adapter, pairs in won.items()}


def _best_cut(adapter: str, pairs: list[tuple[float, str]]) -> Fit:
    pairs.sort()
    # Cut i sends pairs[:i] to the base model and pairs[i:] to the adapter.
    right = sum(1 for _, label in pairs if label == adapter)  # i = 0: everything to the adapter
    best_i, best_right = 0, right
    for i, (_, label) in enumerate(pairs, start=1):
        right += (label == BASE) - (label == adapter)
        # Ties go to the lower cut: with the evidence equal, the specialised model answers.
        if right > best_right and (i == len(pairs) or pairs[i][0] > pairs[i - 1][0]):
            best_i, best_right = i, right
    if best_i == 0:
        threshold = pairs[0][0] - 1e-4
    elif best_i == len(pairs):
        threshold = pairs[-1][0] + 1e-4
    else:
        threshold = (pairs[best_i - 1][0] + pairs[best_i][0]) / 2
    # Thresholds live in [-1, 1] like cosine similarities; 1 keeps out all but exact duplicates.
    return Fit(round(min(max(threshold, -1.0), 1.0), 4), len(pairs), best_right)


@dataclass(frozen=True)
class RoutingScore:
    """How well decisions match labels: the figures ``router eval`` reports."""

    in_domain_accuracy: float
    """Share of adapter-labelled queries routed to their own adapter."""
    base_recall: float
    """Share of base-labelled queries routed to the base model."""
    macro_f1: float
    """F1 per class (each adapter and base), averaged."""
    queries: int

    @classmethod
    def of(cls, labels: Sequence[str], decisions: Sequence[str]) -> RoutingScore:
        pairs = list(zip(labels, decisions, strict=True))
        domain = [(label, got) for label, got in pairs if label != BASE]
        base = [got for label, got in pairs if label == BASE]
        return cls(
            in_domain_accuracy=_share(sum(label == got for label, got in domain), len(domain)),
            base_recall=_share(sum(got == BASE for got in base), len(base)),
            macro_f1=_macro_f1(pairs),
            queries=len(pairs),
        )


def _macro_f1(pairs: Sequence[tuple[str, str]]) -> float:
    classes = sorted({label for label, _ in pairs})
    true_positive = Counter(label for label, got in pairs if label == got)
    predicted = Counter(got for _, got in pairs)
    actual = Counter(label for label, _ in pairs)
    scores = []
    for name in classes:
        precision = _share(true_positive[name], predicted[name])
        recall = _share(true_positive[name], actual[name])
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores) if scores else 0.0


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
