"""Fitting the router's classifier on labelled prompt vectors, and measuring it on held-out folds.

The data: every adapter's example prompts, description and training prompts, an operator's
labelled prompts (``router fit``), and the bundled general-chat prompts as ``base``. The
embedder stays frozen: the query vector is computed once per request anyway, for retrieval,
so the classifier costs a matrix product, not a second model (measured against fine-tuning the
embedder SetFit-style in the README: no better on held-out CLINC150, and a second embedding
per request).

The fit, all deterministic for a given seed:

1. General-chat prompts too close to an adapter's own prompts are dropped (they are more likely
   that adapter's traffic than general chat).
2. Each class is split into prototypes by k-means (``ceil(sqrt(rows))`` of them, at most
   ``max_prototypes``), and a multinomial logistic regression is fitted over the prototypes,
   each class weighted equally whatever its row count.
3. Out-of-fold predictions (``folds`` stratified folds) calibrate the temperature (least
   negative log-likelihood) and choose the abstain threshold: the lowest probability that keeps
   the out-of-fold ``base`` recall at ``base_recall``, which is the threshold that routes the most
   adapter prompts right under that constraint. The same predictions give the validation
   figures. The model kept is fitted on every row.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from index.embedder import Vectors
from service.route_fit import RoutingScore
from service.route_model import BASE, RouteModel, prototype_to_class

Origin = Literal["example", "description", "training", "fit", "general"]
THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.01), 2)
TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(5.0), 61))


class NothingToFitError(ValueError):
    """No adapter has a prompt to learn from: every request goes to the base model."""


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    """An adapter name, or ``base``."""
    origin: Origin


@dataclass(frozen=True)
class FitSettings:
    base_recall: float = 0.95
    """Share of ``base`` prompts (out of fold) the abstain threshold keeps on the base model."""
    folds: int = 5
    l2: float = 1 / 16
    """Weight of the squared weights in the loss (``1/C`` in scikit-learn's terms)."""
    max_prototypes: int = 32
    general_overlap: float = 0.75
    """A general-chat prompt at this cosine similarity to an adapter's prompt is not used."""
    seed: int = 0

    def key(self) -> dict[str, Any]:
        """What identifies the settings in a stored router."""
        return {
            "base_recall": self.base_recall,
            "folds": self.folds,
            "l2": self.l2,
            "max_prototypes": self.max_prototypes,
            "general_overlap": self.general_overlap,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Validation:
    """Out-of-fold figures: each row predicted by a model that did not see it."""

    in_domain_accuracy: float
    base_recall: float
    macro_f1: float
    calibration_error: float
    """Expected calibration error of the most probable class, 10 bins."""
    rows: int
    folds: int


@dataclass(frozen=True)
class FittedRoute:
    model: RouteModel
    validation: Validation
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Rows used per class and origin."""
    general_dropped: int = 0


def fit_route_model(
    rows: Sequence[LabelledText], vectors: Vectors, settings: FitSettings = FitSettings()
) -> FittedRoute:
    """The classifier over ``rows`` (``vectors``: their normalised embeddings, same order)."""
    # The optimiser makes many small BLAS calls: threads cost more than they bring (9 times
    # slower with OpenBLAS on 2 cores), and the cores belong to the requests being served.
    with threadpool_limits(limits=1):
        return _fit(rows, vectors, settings)


def _fit(rows: Sequence[LabelledText], vectors: Vectors, settings: FitSettings) -> FittedRoute:
    if len(rows) != len(vectors):
        raise ValueError("one vector per row")
    keep = without_overlapping_general(rows, vectors, settings.general_overlap)
    used = [row for row, kept in zip(rows, keep, strict=True) if kept]
    x = vectors[keep]
    labels = np.array([row.label for row in used])
    adapters = sorted({str(label) for label in labels} - {BASE})
    if not adapters:
        raise NothingToFitError("no adapter has a prompt to route on")
    if BASE not in set(labels):
        raise NothingToFitError("no prompt is labelled base")
    classes = (*adapters, BASE)
    y = np.array([classes.index(str(label)) for label in labels])

    folds = min(settings.folds, len(used))
    logits, owners, predicted = out_of_fold(x, y, len(classes), folds, settings)
    temperature = _fit_temperature(logits, owners, y[predicted], len(classes))
    probabilities = fold_probabilities(logits, owners, len(classes), temperature)
    truth = y[predicted]
    abstain = _fit_abstain(probabilities, truth, classes, settings.base_recall)
    decisions = decide(probabilities, classes, abstain)
    score = RoutingScore.of([classes[i] for i in truth], decisions)

    weights, bias, owner = fit_head(x, y, len(classes), settings)
    model = RouteModel(classes, weights, bias, owner, temperature, abstain)
    counts: dict[str, dict[str, int]] = {name: {} for name in classes}
    for (label, origin), n in sorted(Counter((row.label, row.origin) for row in used).items()):
        counts[label][origin] = n
    return FittedRoute(
        model,
        Validation(
            in_domain_accuracy=round(score.in_domain_accuracy, 4),
            base_recall=round(score.base_recall, 4),
            macro_f1=round(score.macro_f1, 4),
            calibration_error=round(calibration_error(probabilities, truth), 4),
            rows=len(truth),
            folds=folds,
        ),
        counts,
        general_dropped=int(len(rows) - keep.sum()),
    )


def decide(probabilities: npt.NDArray[np.float64], classes: Sequence[str], abstain: float) -> list[str]:
    """The rule the router applies: the most probable adapter if it reaches ``abstain``, else
    the base model."""
    base = list(classes).index(BASE)
    adapters = probabilities.copy()
    adapters[:, base] = -1.0
    best = adapters.argmax(axis=1)
    top = adapters.max(axis=1)
    return [classes[i] if p >= abstain else BASE for i, p in zip(best, top, strict=True)]


def calibration_error(probabilities: npt.NDArray[np.float64], truth: npt.NDArray[np.int64]) -> float:
    """Expected calibration error of the arg-max class over 10 equal-width bins."""
    if not len(truth):
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == truth
    bins = np.minimum((confidence * 10).astype(int), 9)
    error = 0.0
    for b in range(10):
        mask = bins == b
        if mask.any():
            error += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(error)


# -- the head


def fit_head(
    x: Vectors, y: npt.NDArray[np.int64], classes: int, settings: FitSettings
) -> tuple[Vectors, npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Prototypes per class by k-means, then a weighted multinomial logistic regression over
    them. Returns (weights, bias, owner)."""
    prototype = np.empty(len(y), dtype=np.int64)
    owner: list[int] = []
    rng = np.random.default_rng(settings.seed)
    for c in range(classes):
        rows = np.flatnonzero(y == c)
        if not len(rows):
            continue
        k = min(len(rows), settings.max_prototypes, math.ceil(math.sqrt(len(rows))))
        prototype[rows] = len(owner) + kmeans(x[rows], k, rng)
        owner += [c] * k
    present = np.bincount(y, minlength=classes)
    sample_weight = (len(y) / (np.count_nonzero(present) * present[y])).astype(np.float64)
    weights, bias = _logistic_regression(x, prototype, len(owner), sample_weight, settings.l2)
    return weights, bias, np.array(owner, dtype=np.int64)


def kmeans(x: Vectors, k: int, rng: np.random.Generator, iterations: int = 25) -> npt.NDArray[np.int64]:
    """Cluster index of each row (k-means++ seeding, cosine geometry on normalised rows)."""
    if k <= 1:
        return np.zeros(len(x), dtype=np.int64)
    centres = [x[int(rng.integers(len(x)))]]
    for _ in range(1, k):
        distance = np.clip(1.0 - np.max(x @ np.array(centres).T, axis=1), 0.0, None)
        total = distance.sum()
        pick = int(rng.choice(len(x), p=distance / total)) if total > 0 else int(rng.integers(len(x)))
        centres.append(x[pick])
    matrix = np.array(centres)
    assignment = np.zeros(len(x), dtype=np.int64)
    for _ in range(iterations):
        assignment = np.argmax(x @ matrix.T, axis=1)
        for j in range(k):
            members = x[assignment == j]
            if len(members):
                mean = members.mean(axis=0)
                matrix[j] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    # Clusters that ended empty are renumbered away, so every prototype owns rows.
    _, dense = np.unique(assignment, return_inverse=True)
    return dense.astype(np.int64)


def _logistic_regression(
    x: Vectors, y: npt.NDArray[np.int64], classes: int, sample_weight: npt.NDArray[np.float64], l2: float
) -> tuple[Vectors, npt.NDArray[np.float32]]:
    n, d = x.shape
    # float32 products: twice as fast as float64, and the optimiser keeps its state in float64.
    x32 = x.astype(np.float32)
    onehot = np.zeros((n, classes), dtype=np.float32)
    onehot[np.arange(n), y] = 1.0
    weight = sample_weight.astype(np.float32)

    def loss_and_gradient(theta: npt.NDArray[np.float64]) -> tuple[float, npt.NDArray[np.float64]]:
        w = theta[: classes * d].reshape(classes, d).astype(np.float32)
        b = theta[classes * d :].astype(np.float32)
        z = x32 @ w.T + b
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = -float((weight * (log_p * onehot).sum(axis=1)).sum(dtype=np.float64))
        loss += 0.5 * l2 * float((w * w).sum(dtype=np.float64))
        g = (np.exp(log_p) - onehot) * weight[:, None]
        grad = np.concatenate([(g.T @ x32 + l2 * w).ravel(), g.sum(axis=0)])
        return loss, grad.astype(np.float64)

    result = minimize(
        loss_and_gradient,
        np.zeros(classes * (d + 1)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 300, "gtol": 1e-4, "ftol": 1e-10},
    )
    theta = result.x
    return (
        theta[: classes * d].reshape(classes, d).astype(np.float32),
        theta[classes * d :].astype(np.float32),
    )


# -- out of fold


def _stratified_folds(y: npt.NDArray[np.int64], folds: int, seed: int) -> npt.NDArray[np.int64]:
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        rng.shuffle(rows)
        # Each class starts at another fold, so small classes do not all land in fold 0.
        fold[rows] = (np.arange(len(rows)) + int(c)) % folds
    return fold


def out_of_fold(
    x: Vectors, y: npt.NDArray[np.int64], classes: int, folds: int, settings: FitSettings
) -> tuple[list[npt.NDArray[np.float64]], list[npt.NDArray[np.int64]], npt.NDArray[np.int64]]:
    """Per fold: the held-out rows' prototype logits and those prototypes' classes; and the
    rows predicted, in the order of the folds (a fold whose training part holds one class only
    predicts nothing)."""
    fold = _stratified_folds(y, folds, settings.seed)
    logits, owners, predicted = [], [], []
    for f in range(folds):
        train, held = fold != f, fold == f
        if len(np.unique(y[train])) < 2 or not held.any():
            continue
        weights, bias, owner = fit_head(x[train], y[train], classes, settings)
        logits.append((x[held] @ weights.T + bias).astype(np.float64))
        owners.append(owner)
        predicted.append(np.flatnonzero(held))
    rows = np.concatenate(predicted) if predicted else np.zeros(0, dtype=np.int64)
    return logits, owners, rows


def fold_probabilities(
    logits: list[npt.NDArray[np.float64]],
    owners: list[npt.NDArray[np.int64]],
    classes: int,
    temperature: float,
) -> npt.NDArray[np.float64]:
    parts = [prototype_to_class(z / temperature, o, classes) for z, o in zip(logits, owners, strict=True)]
    return np.vstack(parts) if parts else np.zeros((0, classes))


def _fit_temperature(
    logits: list[npt.NDArray[np.float64]],
    owners: list[npt.NDArray[np.int64]],
    truth: npt.NDArray[np.int64],
    classes: int,
) -> float:
    if not len(truth):
        return 1.0

    def nll(temperature: float) -> float:
        p = fold_probabilities(logits, owners, classes, temperature)[np.arange(len(truth)), truth]
        return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())

    return round(float(min(TEMPERATURES, key=nll)), 4)


def _fit_abstain(
    probabilities: npt.NDArray[np.float64],
    truth: npt.NDArray[np.int64],
    classes: Sequence[str],
    target: float,
) -> float:
    """The threshold with the best adapter accuracy among those keeping base recall at
    ``target``; when none does, the one with the best base recall."""
    labels = [classes[i] for i in truth]
    best: tuple[float, float, float] | None = None  # (accuracy, recall, threshold)
    fallback: tuple[float, float, float] | None = None  # (recall, accuracy, threshold)
    for threshold in THRESHOLDS:
        score = RoutingScore.of(labels, decide(probabilities, classes, float(threshold)))
        candidate = (score.in_domain_accuracy, score.base_recall, float(threshold))
        if score.base_recall >= target and (best is None or candidate[:2] > best[:2]):
            best = candidate
        alternative = (score.base_recall, score.in_domain_accuracy, float(threshold))
        if fallback is None or alternative[:2] > fallback[:2]:
            fallback = alternative
    if best is not None:
        return best[2]
    return fallback[2] if fallback is not None else 0.5


def without_overlapping_general(
    rows: Sequence[LabelledText], vectors: Vectors, overlap: float
) -> npt.NDArray[np.bool_]:
    general = np.array([row.origin == "general" for row in rows])
    specific = np.array([row.label != BASE for row in rows])
    keep = np.ones(len(rows), dtype=bool)
    if general.any() and specific.any():
        closest = (vectors[general] @ vectors[specific].T).max(axis=1)
        keep[np.flatnonzero(general)[closest >= overlap]] = False
    return keep
