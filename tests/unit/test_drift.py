"""The drift report's arithmetic: population stability index, Kolmogorov-Smirnov, the router's
rule over probability rows, and the per-class comparison that flags a class."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service import drift
from service.drift import Routed


def routed(decided: list[str], confidence: list[float], best: list[str | None] | None = None) -> Routed:
    """Outcomes with nothing abstained unless ``best`` names an adapter for a base decision."""
    best = best if best is not None else [None if d == "base" else d for d in decided]
    abstained = np.array([d == "base" and b is not None for d, b in zip(decided, best, strict=True)])
    return Routed(decided, np.array(confidence, dtype=np.float64), best, abstained)


# ---------------------------------------------------------------------------- PSI and KS


def test_psi_of_the_same_distribution_is_zero() -> None:
    values = np.linspace(0.05, 0.95, 50)
    assert drift.psi(values, values) == pytest.approx(0.0, abs=1e-12)


def test_psi_matches_its_definition_on_two_bins() -> None:
    # Reference: half in [0.0, 0.1), half in [0.9, 1.0]; recent: a quarter and three quarters.
    reference = [0.05] * 50 + [0.95] * 50
    recent = [0.05] * 25 + [0.95] * 75
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert drift.psi(reference, recent) == pytest.approx(expected)


def test_psi_flags_confidence_sliding_down() -> None:
    rng = np.random.default_rng(0)
    confident = np.clip(rng.normal(0.93, 0.03, 500), 0, 1)
    unsure = np.clip(rng.normal(0.7, 0.1, 500), 0, 1)
    assert drift.psi(confident, np.clip(rng.normal(0.93, 0.03, 500), 0, 1)) < 0.1
    assert drift.psi(confident, unsure) > drift.PSI_DRIFT


def test_psi_with_an_empty_bin_stays_finite() -> None:
    assert math.isfinite(drift.psi([0.95] * 10, [0.05] * 10))


def test_ks_statistic() -> None:
    assert drift.ks_statistic([0.1, 0.5, 0.9], [0.1, 0.5, 0.9]) == 0.0
    assert drift.ks_statistic([0.1, 0.2], [0.8, 0.9]) == 1.0
    # F_ref jumps to 1/2 at 0.2 and 1 at 0.6; F_new to 1/2 at 0.4: the largest gap is 1/2.
    assert drift.ks_statistic([0.2, 0.6], [0.4, 0.4]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one value"):
        drift.ks_statistic([], [0.5])


def test_share_psi_over_classes() -> None:
    same = {"banking": 0.5, "base": 0.5}
    assert drift.share_psi(same, same) == pytest.approx(0.0)
    assert drift.share_psi(same, {"banking": 0.9, "base": 0.1}) > drift.PSI_DRIFT


# ---------------------------------------------------------------------------- the rule


def test_decide_applies_the_abstain_threshold_and_the_adapters_own() -> None:
    classes = ("banking", "cooking", "base")
    probabilities = np.array(
        [
            [0.80, 0.10, 0.10],  # banking, over 0.5
            [0.40, 0.20, 0.40],  # banking best but under 0.5: base, abstained
            [0.05, 0.60, 0.35],  # cooking over its own 0.7? no: base, abstained
            [0.02, 0.03, 0.95],  # base, and the best adapter (cooking) far below: abstained too
        ]
    )
    out = drift.decide(probabilities, classes, abstain=0.5, thresholds={"cooking": 0.7})
    assert list(out.decided) == ["banking", "base", "base", "base"]
    assert list(out.best) == ["banking", "banking", "cooking", "cooking"]
    assert out.abstained.tolist() == [False, True, True, True]
    assert out.confidence.tolist() == [0.80, 0.40, 0.35, 0.95]


# ---------------------------------------------------------------------------- the comparison


def test_compare_flags_the_class_whose_confidence_moved() -> None:
    reference = routed(["banking"] * 30 + ["base"] * 30, [0.95] * 30 + [0.9] * 30)
    recent = routed(["banking"] * 30 + ["base"] * 30, [0.65] * 30 + [0.9] * 30)
    report = drift.compare(reference, recent, ["banking", "base"], {"banking": 0.2, "base": 0.8})
    banking, base = report.classes
    assert banking.drifted
    assert banking.psi is not None
    assert banking.psi > drift.PSI_DRIFT
    assert banking.note == f"confidence PSI {banking.psi:.2f} > 0.20"
    assert banking.ks == 1.0
    assert (banking.confidence_recent, banking.confidence_reference) == (0.65, 0.95)
    assert not base.drifted
    assert base.psi == pytest.approx(0.0)
    assert base.note is None
    assert (banking.recent_share, banking.reference_share, banking.fit_share) == (0.5, 0.5, 0.2)
    assert report.drifted == ["banking"]
    assert report.to_json()["drifted"] == ["banking"]


def test_compare_does_not_judge_a_class_with_too_few_queries() -> None:
    reference = routed(["banking"] * 5, [0.95] * 5)
    recent = routed(["banking"] * 5, [0.55] * 5)
    (banking,) = drift.compare(reference, recent, ["banking"], {}, min_samples=20).classes
    assert banking.psi is not None
    assert banking.psi > drift.PSI_DRIFT
    assert not banking.drifted
    assert banking.note == "too few queries to judge (fewer than 20 on a side)"
    (judged,) = drift.compare(reference, recent, ["banking"], {}, min_samples=5).classes
    assert judged.drifted


def test_a_class_absent_on_one_side_has_no_index() -> None:
    reference = routed(["banking", "base"], [0.9, 0.9])
    recent = routed(["base", "base"], [0.9, 0.9])
    rows = {row.name: row for row in drift.compare(reference, recent, ["banking", "base"], {}).classes}
    assert rows["banking"].recent == 0
    assert (rows["banking"].psi, rows["banking"].ks) == (None, None)
    assert rows["banking"].confidence_recent is None
    assert rows["base"].recent_share == 1.0


def test_abstentions_are_counted_per_best_adapter() -> None:
    # Four queries had banking as their best adapter; one of them fell short of the threshold.
    recent = routed(
        ["banking", "banking", "banking", "base", "base"],
        [0.9, 0.9, 0.9, 0.5, 0.9],
        best=["banking", "banking", "banking", "banking", None],
    )
    reference = routed(["banking", "base"], [0.9, 0.9])
    rows = {row.name: row for row in drift.compare(reference, recent, ["banking", "base"], {}).classes}
    assert rows["banking"].abstain_recent == 0.25
    assert rows["banking"].abstain_reference == 0.0
    assert rows["base"].abstain_recent is None


def test_embedding_drift_is_the_mean_cosine_to_the_class_centroid() -> None:
    east, north = np.array([1.0, 0.0], dtype=np.float32), np.array([0.0, 1.0], dtype=np.float32)
    diagonal = (east + north) / np.sqrt(2)
    centres = drift.centroids(np.stack([east, east, north]), ["banking", "banking", "base"])
    assert centres["banking"].tolist() == [1.0, 0.0]
    reference = Routed(["banking"], np.array([0.9]), ["banking"], np.array([False]), np.stack([east]))
    recent = Routed(
        ["banking", "banking"], np.array([0.9, 0.9]), ["banking", "banking"], np.array([False, False]),
        np.stack([east, diagonal]),
    )  # fmt: skip
    (banking,) = drift.compare(reference, recent, ["banking"], {}, centres).classes
    assert banking.cosine_reference == 1.0
    assert banking.cosine_recent == pytest.approx((1 + 1 / np.sqrt(2)) / 2, abs=1e-4)
    assert drift.mean_cosine(np.stack([east]), ["base"], centres, "banking") is None
