"""Fitting per-adapter thresholds, scoring routing decisions, and what the router reads of a
conversation and of the adapters' example vectors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.route_fit import BASE, RoutingScore, Scored, fit_thresholds
from service.router import CONTEXT_CHARS, routing_query
from service.similarity_router import NearestExample


def scored(label: str, **scores: float) -> Scored:
    return Scored(label, scores)


def test_the_threshold_separates_an_adapters_queries_from_the_base_ones_it_wins() -> None:
    examples = [
        scored("banking", banking=0.8, cooking=0.1),
        scored("banking", banking=0.6, cooking=0.2),
        scored(BASE, banking=0.4, cooking=0.1),
        scored(BASE, banking=0.3, cooking=0.2),
    ]
    fit = fit_thresholds(examples)["banking"]
    assert fit.threshold == pytest.approx(0.5)  # halfway between 0.4 and 0.6
    assert (fit.examples, fit.correct) == (4, 4)


def test_only_the_queries_an_adapter_wins_decide_its_threshold() -> None:
    examples = [
        scored("banking", banking=0.7, cooking=0.3),
        scored(BASE, banking=0.5, cooking=0.2),
        # won by cooking: says nothing about banking's threshold, however high banking scores
        scored(BASE, banking=0.65, cooking=0.9),
    ]
    fits = fit_thresholds(examples)
    assert fits["banking"].threshold == pytest.approx(0.6)
    assert fits["cooking"].examples == 1


def test_overlapping_scores_get_the_cut_with_the_most_right() -> None:
    examples = [
        scored("a", a=0.9),
        scored("a", a=0.7),
        scored(BASE, a=0.65),
        scored("a", a=0.6),
        scored(BASE, a=0.5),
        scored(BASE, a=0.4),
    ]
    fit = fit_thresholds(examples)["a"]
    assert fit.correct == 5
    # Cutting at 0.55 or at 0.675 gets 5 right either way: the lower cut, the adapter answers.
    assert fit.threshold == pytest.approx(0.55)


def test_another_adapters_queries_are_wrong_either_way() -> None:
    examples = [scored("b", a=0.9, b=0.1), scored("a", a=0.3, b=0.2)]
    fit = fit_thresholds(examples)["a"]
    assert fit.correct == 1
    assert fit.threshold <= 0.3


def test_an_adapter_with_only_base_queries_gets_a_threshold_above_them_all() -> None:
    fit = fit_thresholds([scored(BASE, a=0.7), scored(BASE, a=0.2)])["a"]
    assert fit.threshold > 0.7
    assert fit.correct == 2


def test_equal_scores_are_never_split() -> None:
    fit = fit_thresholds([scored("a", a=0.5), scored(BASE, a=0.5), scored(BASE, a=0.5)])["a"]
    assert fit.threshold > 0.5  # all three on one side: base, two right of three


def test_no_examples_no_thresholds() -> None:
    assert fit_thresholds([]) == {}
    assert fit_thresholds([Scored(BASE, {})]) == {}


def test_routing_scores() -> None:
    labels = ["a", "a", "b", BASE, BASE]
    decisions = ["a", BASE, "a", BASE, "b"]
    score = RoutingScore.of(labels, decisions)
    assert score.in_domain_accuracy == pytest.approx(1 / 3)
    assert score.base_recall == pytest.approx(1 / 2)
    # F1: a = 2*0.5*0.5/1 = 0.5; b = 0 (no b right); base = 2*0.5*0.5/1 = 0.5
    assert score.macro_f1 == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert score.queries == 5


def test_routing_query_is_the_last_user_message() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the refund policy of the shop?"},
        {"role": "assistant", "content": "Fourteen days."},
        {"role": "user", "content": [{"type": "text", "text": "How do I rotate my password safely?"}]},
    ]
    assert routing_query(messages) == "How do I rotate my password safely?"


def test_a_short_follow_up_keeps_the_end_of_the_question_before_it() -> None:
    first = "x" * 1000 + " What is the refund policy?"
    messages = [{"role": "user", "content": first}, {"role": "user", "content": "And in June?"}]
    assert routing_query(messages) == f"{first[-CONTEXT_CHARS:]}\nAnd in June?"


def test_no_user_text_no_query() -> None:
    assert routing_query([{"role": "system", "content": "Be brief."}]) == ""
    assert routing_query([{"role": "user", "content": "   "}]) == ""


def test_each_adapter_scores_its_nearest_row() -> None:
    rows = np.eye(3, dtype=np.float32)
    scorer = NearestExample({"a": rows[:2], "b": rows[2:], "silent": np.zeros((0, 3), dtype=np.float32)})
    query = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    assert scorer.names == ("a", "b")
    assert scorer.scores(query)[0] == pytest.approx([0.8, 0.0])
    (example,) = scorer.scored(["a"], query)
    assert example.label == "a"
    assert example.scores == pytest.approx({"a": 0.8, "b": 0.0})
    assert NearestExample({}).scores(query).shape == (1, 0)
    assert NearestExample({}).decide(query[None, :], {}, 0.5) == [BASE]


def test_the_best_adapter_wins_at_its_threshold_else_base() -> None:
    rows = np.eye(3, dtype=np.float32)
    scorer = NearestExample({"a": rows[:2], "b": rows[2:]})
    queries = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [0.1, 0.0, 0.3]], dtype=np.float32)
    assert scorer.decide(queries, {}, 0.5) == ["a", "b", BASE]
    assert scorer.decide(queries, {"a": 0.9, "b": 0.2}, 0.5) == [BASE, "b", "b"]


def test_thresholds_fitted_on_scored_examples_as_router_fit_does() -> None:
    scorer = NearestExample({"a": np.array([[1.0, 0.0]], dtype=np.float32)})
    vectors = np.array([[0.9, 0.436], [0.5, 0.866]], dtype=np.float32)
    assert scorer.fit(["a", BASE], vectors)["a"].threshold == pytest.approx(0.7)


def test_the_centroid_baseline_has_one_threshold_for_all() -> None:
    profiles = {
        "a": np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32),
        "b": np.array([[0.0, -1.0]], dtype=np.float32),
    }
    centroids = NearestExample.centroids(profiles)
    assert np.linalg.norm(centroids.scores(np.array([1.0, 0.0], dtype=np.float32))) > 0
    vectors = np.array([[0.894, 0.447], [0.0, -1.0], [-0.6, 0.8]], dtype=np.float32)
    threshold = centroids.fit_one_threshold(["a", "b", BASE], vectors)
    assert centroids.decide(vectors, {}, threshold) == ["a", "b", BASE]
