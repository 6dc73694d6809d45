"""The soak benchmark's pure parts: the request mix, the memory trend, the figures per kind."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from bench.soak import ADAPTER, MAX_TOKENS, MIX, STREAMING, Corpus, draw_kind, plan
from bench.soak_report import (
    Outcome,
    Sample,
    Verdict,
    latency_summary,
    second_half_slope_per_hour,
    slope,
    summarise,
    timeline,
)

CORPUS = Corpus(
    general=["What time is it?"],
    banking=["What is my balance?"],
    examples=["Transfer money to savings"],
    questions=["Does aspirin prevent strokes?"],
    documents=[{"source": "1", "text": "Aspirin..."}],
)


def test_the_mix_is_drawn_in_its_proportions_and_repeats_with_its_seed() -> None:
    rng = random.Random(7)
    draws = [draw_kind(rng) for _ in range(20_000)]
    counts = Counter(draws)
    total = sum(MIX.values())
    for kind, weight in MIX.items():
        assert counts[kind] / len(draws) == pytest.approx(weight / total, abs=0.01)
    again = random.Random(7)
    assert [draw_kind(again) for _ in range(20_000)] == draws


@pytest.mark.parametrize("kind", list(MIX))
def test_each_kind_sends_what_it_names(kind: str) -> None:
    payload = plan(kind, random.Random(0), CORPUS)
    if kind == "invalid_json":
        with pytest.raises(ValueError, match=r"Unterminated|Expecting"):
            json.loads(payload)
        return
    body = json.loads(payload)
    assert body.get("stream") == (True if kind in STREAMING else None)
    assert ("logit_bias" in body) == (kind == "unknown_field")
    assert body.get("rag") == ("on" if kind == "rag" else None)
    assert body["model"] == {"adapter": ADAPTER, "auto": "auto"}.get(kind, "SmolLM2-135M-Instruct")
    if kind != "abandoned":
        assert MAX_TOKENS[0] <= body["max_tokens"] <= MAX_TOKENS[1]


def test_the_slope_is_that_of_the_least_squares_line() -> None:
    assert slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert slope([0, 1, 2], [5, 4, 6]) == pytest.approx(0.5)
    assert slope([1, 1], [2, 3]) is None
    with pytest.raises(ValueError, match="length"):
        slope([0, 1], [1])


def test_the_memory_trend_ignores_the_first_half() -> None:
    # Warm-up growth of 100 MiB in the first half, then flat at 200 MiB.
    times = [float(t) for t in range(0, 601, 5)]
    values = [100 + t / 3 if t < 300 else 200.0 for t in times]
    assert second_half_slope_per_hour(times, values) == pytest.approx(0.0)
    # A steady leak of 1 MiB a minute reads as 60 MiB an hour.
    assert second_half_slope_per_hour(times, [100 + t / 60 for t in times]) == pytest.approx(60.0)


def _outcome(kind: str, started_s: float, latency_s: float, status: int | None = 200) -> Outcome:
    verdict: Verdict = "ok" if status == 200 else "expected_4xx" if status == 400 else "unexpected"
    return Outcome(kind, started_s, latency_s, status, verdict, error_type=None if status == 200 else "x")


def test_latency_percentiles_per_kind_and_per_interval() -> None:
    outcomes = [_outcome("plain", i * 0.5, (i + 1) / 100) for i in range(100)]
    summary = latency_summary([o.latency_s for o in outcomes])
    assert (summary["n"], summary["p50_ms"], summary["p99_ms"], summary["max_ms"]) == (100, 510, 990, 1000)
    rows = timeline(outcomes, bucket_s=10)
    assert [sum(r["requests"].values()) for r in rows] == [20] * 5
    assert rows[1]["latency_ms"]["plain"]["p50"] == pytest.approx(310)


def test_errors_are_split_into_expected_and_unexpected() -> None:
    outcomes = [
        _outcome("plain", 0, 0.1),
        _outcome("invalid_json", 1, 0.01, 400),
        _outcome("stream", 2, 0.1, 502),
        _outcome("plain", 3, 120, None),
    ]
    samples = [Sample(t, 300 + t / 100, 40, 2000, 3, 0) for t in (0.0, 5.0, 10.0)]
    result = summarise(outcomes, samples, duration_s=10, bucket_s=10)
    unexpected = result["errors"]["unexpected"]
    assert unexpected["count"] == 2
    assert unexpected["by_status"] == {"502": 1, "transport": 1}
    assert result["errors"]["expected_4xx"]["by_kind"] == {"invalid_json": 1}
    assert result["gateway_rss"]["slope_second_half_mib_per_hour"] == pytest.approx(36.0)
    assert result["gateway_fds"] == {"start": 40, "end": 40, "max": 40}
