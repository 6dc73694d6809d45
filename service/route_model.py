"""The fitted router: calibrated probabilities over the adapters and ``base``, from one query
vector.

A class is represented by a few prototypes (sub-clusters of its training prompts, each with
its own row of a multinomial logistic regression): a domain is rarely one blob in embedding
space (banking holds transfers, balances and lost cards), and one linear direction per class
under-fits it. A class's probability is the sum of its prototypes' softmax probabilities,
with the logits divided by a temperature fitted on held-out folds (calibration).

The decision rule abstains to the base model: the most probable adapter is chosen only when its
probability reaches ``abstain`` (fitted so that ``base``-labelled prompts stay on the base
model, see :mod:`service.route_training`), or the adapter's own threshold when it has one.

Inference is a matrix product of the query vector with at most a few hundred rows: tens of
microseconds, against milliseconds for the embedding itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from index.embedder import Vectors

BASE = "base"


@dataclass(frozen=True)
class RouteModel:
    classes: tuple[str, ...]
    """Adapter names and ``base``, in a fixed order."""
    weights: Vectors
    """One row per prototype (``prototypes x dimension``)."""
    bias: npt.NDArray[np.float32]
    owner: npt.NDArray[np.int64]
    """The class index of each prototype."""
    temperature: float
    abstain: float
    """The probability an adapter needs to be chosen over the base model."""

    def __post_init__(self) -> None:
        if BASE not in self.classes:
            raise ValueError("a route model needs a 'base' class")
        if not (len(self.weights) == len(self.bias) == len(self.owner)):
            raise ValueError("weights, bias and owner differ in length")
        if self.temperature <= 0 or not 0 <= self.abstain <= 1:
            raise ValueError("temperature must be positive and abstain in [0, 1]")

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(name for name in self.classes if name != BASE)

    @property
    def dimension(self) -> int:
        return int(self.weights.shape[1])

    def probabilities(self, vectors: Vectors) -> npt.NDArray[np.float64]:
        """Calibrated class probabilities, one row per query vector (rows sum to 1)."""
        logits = (np.atleast_2d(vectors) @ self.weights.T + self.bias).astype(np.float64) / self.temperature
        return prototype_to_class(logits, self.owner, len(self.classes))

    def scores(self, vector: Vectors) -> dict[str, float]:
        """Each class's probability for one query vector."""
        row = self.probabilities(vector)[0]
        return {name: float(p) for name, p in zip(self.classes, row, strict=True)}

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        """What is stored (safetensors: no pickle)."""
        return {"weights": self.weights, "bias": self.bias, "owner": self.owner}

    def meta(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "temperature": self.temperature, "abstain": self.abstain}

    @classmethod
    def from_stored(cls, meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> RouteModel:
        """The model a router store version holds (ValueError when it is not one)."""
        try:
            return cls(
                classes=tuple(str(name) for name in meta["classes"]),
                weights=np.asarray(arrays["weights"], dtype=np.float32),
                bias=np.asarray(arrays["bias"], dtype=np.float32),
                owner=np.asarray(arrays["owner"], dtype=np.int64),
                temperature=float(meta["temperature"]),
                abstain=float(meta["abstain"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a route model: {exc}") from None


def prototype_to_class(
    logits: npt.NDArray[np.float64], owner: npt.NDArray[np.int64], classes: int
) -> npt.NDArray[np.float64]:
    """Softmax over prototypes, summed per class."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    exp /= exp.sum(axis=1, keepdims=True)
    out = np.zeros((len(logits), classes), dtype=np.float64)
    np.add.at(out.T, owner, exp.T)
    return out
