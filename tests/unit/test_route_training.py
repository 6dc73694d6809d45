"""The router's classifier: fitted on labelled vectors, calibrated, its abstain threshold chosen
for base recall on held-out folds, deterministic, and stored without pickle."""

from __future__ import annotations

import numpy as np
import pytest

from index.embedder import Vectors
from service.route_model import BASE, RouteModel
from service.route_training import (
    FitSettings,
    LabelledText,
    NothingToFitError,
    decide,
    fit_route_model,
)


def blob(centre: int, count: int, seed: int, spread: float = 0.15) -> Vectors:
    """Normalised vectors around one axis of a 16-dimensional space."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, spread, (count, 16)).astype(np.float32)
    x[:, centre] += 1.0
    normalised: Vectors = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return normalised


def dataset(seed: int = 0) -> tuple[list[LabelledText], Vectors]:
    parts = [("legal", 0, "example", 20), ("medical", 1, "example", 20), (BASE, 2, "general", 40)]
    rows: list[LabelledText] = []
    vectors = []
    for label, axis, origin, count in parts:
        vectors.append(blob(axis, count, seed + axis))
        rows += [LabelledText(f"{label} {i}", label, origin) for i in range(count)]  # type: ignore[arg-type]
    # Base traffic is varied: a second general topic.
    vectors.append(blob(3, 40, seed + 3))
    rows += [LabelledText(f"chat {i}", BASE, "general") for i in range(40)]
    return rows, np.vstack(vectors)


def test_separable_classes_are_learnt_with_calibrated_probabilities() -> None:
    rows, vectors = dataset()
    fitted = fit_route_model(rows, vectors)
    model = fitted.model
    assert model.classes == ("legal", "medical", BASE)
    assert fitted.validation.in_domain_accuracy == 1.0
    assert fitted.validation.base_recall >= 0.95
    assert fitted.validation.calibration_error < 0.1
    assert fitted.counts == {"legal": {"example": 20}, "medical": {"example": 20}, BASE: {"general": 80}}
    probabilities = model.probabilities(np.vstack([blob(0, 5, 99), blob(2, 5, 98)]))
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    assert decide(probabilities, model.classes, model.abstain) == ["legal"] * 5 + [BASE] * 5


def test_the_same_data_and_seed_give_the_same_model() -> None:
    rows, vectors = dataset()
    first, second = fit_route_model(rows, vectors), fit_route_model(rows, vectors)
    assert np.array_equal(first.model.weights, second.model.weights)
    assert first.model.abstain == second.model.abstain
    assert first.validation == second.validation


def test_a_stricter_base_recall_raises_the_abstain_threshold() -> None:
    rows, vectors = dataset()
    # Noisier data, so that the two targets need different thresholds.
    noisy = vectors + np.random.default_rng(5).normal(0, 0.6, vectors.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    loose = fit_route_model(rows, noisy, FitSettings(base_recall=0.6))
    strict = fit_route_model(rows, noisy, FitSettings(base_recall=0.99))
    assert strict.model.abstain > loose.model.abstain
    assert strict.validation.base_recall >= loose.validation.base_recall


def test_general_chat_too_close_to_an_adapter_is_not_used_against_it() -> None:
    rows, vectors = dataset()
    rows.append(LabelledText("a legal-looking chat prompt", BASE, "general"))
    vectors = np.vstack([vectors, vectors[:1]])  # the same vector as a legal example
    fitted = fit_route_model(rows, vectors)
    assert fitted.general_dropped == 1
    assert fitted.counts[BASE] == {"general": 80}


def test_nothing_to_fit_without_adapter_prompts_or_base_prompts() -> None:
    rows, vectors = dataset()
    base_only = [(r, v) for r, v in zip(rows, vectors, strict=True) if r.label == BASE]
    with pytest.raises(NothingToFitError):
        fit_route_model([r for r, _ in base_only], np.vstack([v for _, v in base_only]))
    adapters_only = [(r, v) for r, v in zip(rows, vectors, strict=True) if r.label != BASE]
    with pytest.raises(NothingToFitError):
        fit_route_model([r for r, _ in adapters_only], np.vstack([v for _, v in adapters_only]))


def test_an_adapter_with_one_prompt_still_gets_a_class() -> None:
    rows, vectors = dataset()
    rows.append(LabelledText("the only tax prompt", "tax", "example"))
    vectors = np.vstack([vectors, blob(5, 1, 7)])
    model = fit_route_model(rows, vectors).model
    assert "tax" in model.classes
    assert model.scores(blob(5, 1, 8)[0])["tax"] > 0.5


def test_the_stored_form_round_trips() -> None:
    rows, vectors = dataset()
    model = fit_route_model(rows, vectors).model
    again = RouteModel.from_stored(model.meta(), model.arrays())
    query = blob(1, 3, 11)
    assert np.array_equal(again.probabilities(query), model.probabilities(query))
    with pytest.raises(ValueError, match="not a route model"):
        RouteModel.from_stored({"classes": ["a", BASE]}, model.arrays())
