"""The soak benchmark's figures and plot: what ``bench/soak.py`` measured, reduced to latency
percentiles per kind, errors by status and type, per-interval timelines, and the memory trend
(a least-squares line over the second half of the run, in MiB per hour).

Pure functions over :class:`Outcome` and :class:`Sample` records, so they are tested without a
service."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench.gateway_overhead import percentile

Verdict = Literal["ok", "expected_4xx", "unexpected"]
MIB = 1024 * 1024


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it. ``status`` is None when no response came (transport)."""

    kind: str
    started_s: float  # since the soak began
    latency_s: float  # to the last byte, or to the abandonment
    status: int | None
    verdict: Verdict
    ttft_s: float | None = None  # streams: the first content token (abandoned: the first chunk)
    error_type: str | None = None  # the envelope's code or type, "transport:<Exception>", ...
    error: str | None = None  # the body, truncated
    route: str | None = None  # the X-Route header


@dataclass(frozen=True)
class Sample:
    """The processes at one moment of the run."""

    t_s: float
    gateway_rss_mib: float
    gateway_fds: int
    engine_rss_mib: float  # summed over the engine's processes (shared pages counted per process)
    engine_processes: int
    engine_running: float | None  # vllm:num_requests_running; None when the scrape failed


def latency_summary(values_s: Sequence[float]) -> dict[str, float]:
    """n, mean, p50, p95, p99 and max, in milliseconds."""
    ms = [v * 1000 for v in values_s]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "mean_ms": statistics.fmean(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
    }


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The slope of the least-squares line through the points; None with fewer than two
    distinct x."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    if len(set(xs)) < 2:
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return sxy / sxx


def second_half_slope_per_hour(times_s: Sequence[float], values: Sequence[float]) -> float | None:
    """Units per hour of the least-squares line over the samples of the run's second half (the
    first half holds warm-up growth: allocator arenas, caches filling)."""
    if not times_s:
        return None
    middle = (times_s[0] + times_s[-1]) / 2
    late = [(t, v) for t, v in zip(times_s, values, strict=True) if t >= middle]
    per_second = slope([t for t, _ in late], [v for _, v in late])
    return None if per_second is None else per_second * 3600


def memory_trend(samples: Sequence[Sample], field: str) -> dict[str, float | None]:
    times = [s.t_s for s in samples]
    values = [float(getattr(s, field)) for s in samples]
    if not values:
        return {}
    return {
        "start_mib": values[0],
        "end_mib": values[-1],
        "max_mib": max(values),
        "slope_second_half_mib_per_hour": second_half_slope_per_hour(times, values),
    }


def error_counts(outcomes: Sequence[Outcome], verdict: Verdict) -> dict[str, Any]:
    chosen = [o for o in outcomes if o.verdict == verdict]
    return {
        "count": len(chosen),
        "by_status": dict(Counter("transport" if o.status is None else str(o.status) for o in chosen)),
        "by_type": dict(Counter(o.error_type or "none" for o in chosen)),
        "by_kind": dict(Counter(o.kind for o in chosen)),
    }


def timeline(outcomes: Sequence[Outcome], bucket_s: float) -> list[dict[str, Any]]:
    """Per interval of ``bucket_s`` (by start time): requests per kind, errors, latency
    percentiles per kind."""
    if not outcomes:
        return []
    count = int(max(o.started_s for o in outcomes) // bucket_s) + 1
    buckets: list[list[Outcome]] = [[] for _ in range(count)]
    for outcome in outcomes:
        buckets[int(outcome.started_s // bucket_s)].append(outcome)
    rows = []
    for index, bucket in enumerate(buckets):
        kinds = sorted({o.kind for o in bucket})
        rows.append(
            {
                "start_s": index * bucket_s,
                "requests": dict(Counter(o.kind for o in bucket)),
                "unexpected": sum(o.verdict == "unexpected" for o in bucket),
                "expected_4xx": sum(o.verdict == "expected_4xx" for o in bucket),
                "latency_ms": {
                    kind: {
                        f"p{q}": percentile([o.latency_s * 1000 for o in bucket if o.kind == kind], q)
                        for q in (50, 95, 99)
                    }
                    for kind in kinds
                },
            }
        )
    return rows


def summarise(
    outcomes: Sequence[Outcome], samples: Sequence[Sample], duration_s: float, bucket_s: float
) -> dict[str, Any]:
    """Everything ``soak.json`` reports about the traffic and the processes."""
    kinds = sorted({o.kind for o in outcomes})
    fds = [s.gateway_fds for s in samples]
    return {
        "totals": {
            "requests": len(outcomes),
            "requests_per_s": len(outcomes) / duration_s if duration_s else 0.0,
            "by_kind": dict(Counter(o.kind for o in outcomes)),
            "by_verdict": dict(Counter(o.verdict for o in outcomes)),
            "routes": dict(Counter(o.route for o in outcomes if o.route)),
        },
        "errors": {
            "unexpected": error_counts(outcomes, "unexpected"),
            "expected_4xx": error_counts(outcomes, "expected_4xx"),
            "unexpected_examples": [vars(o) for o in outcomes if o.verdict == "unexpected"][:20],
        },
        "latency": {
            kind: latency_summary([o.latency_s for o in outcomes if o.kind == kind]) for kind in kinds
        },
        "ttft": {
            kind: latency_summary(ttfts)
            for kind in kinds
            if (ttfts := [o.ttft_s for o in outcomes if o.kind == kind and o.ttft_s is not None])
        },
        "gateway_rss": memory_trend(samples, "gateway_rss_mib"),
        "engine_rss": memory_trend(samples, "engine_rss_mib"),
        "gateway_fds": {"start": fds[0], "end": fds[-1], "max": max(fds)} if fds else {},
        "timeline": {"bucket_s": bucket_s, "buckets": timeline(outcomes, bucket_s)},
        "samples": [vars(s) for s in samples],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = result["timeline"]["buckets"]
    bucket_s = result["timeline"]["bucket_s"]
    unit = "min" if bucket_s >= 60 else "s"
    starts = [b["start_s"] / (60 if unit == "min" else 1) for b in buckets]
    samples = result["samples"]
    minutes = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    for ax, q in ((axes[0][0], "p50"), (axes[0][1], "p99")):
        for kind in sorted(result["latency"]):
            points = [
                (x, b["latency_ms"][kind][q])
                for x, b in zip(starts, buckets, strict=True)
                if kind in b["latency_ms"]
            ]
            ax.plot([x for x, _ in points], [y for _, y in points], marker=".", label=kind)
        ax.set_yscale("log")
        ax.set_title(f"Latency {q} per {bucket_s:.0f} s, by kind")
        ax.set_xlabel(f"start of interval ({unit})")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    ax = axes[0][2]
    ax.plot(starts, [sum(b["requests"].values()) for b in buckets], marker=".", label="requests")
    ax.plot(starts, [b["expected_4xx"] for b in buckets], marker=".", label="expected 4xx")
    ax.plot(starts, [b["unexpected"] for b in buckets], marker=".", color="red", label="unexpected errors")
    ax.set_title(f"Requests and errors per {bucket_s:.0f} s")
    ax.set_xlabel(f"start of interval ({unit})")
    ax.legend(fontsize=7)
    _memory_panel(axes[1][0], samples, "gateway_rss_mib", "Gateway RSS")
    fds = axes[1][0].twinx()
    fds.plot(minutes, [s["gateway_fds"] for s in samples], color="grey", linestyle=":", label="open fds")
    fds.set_ylabel("open fds")
    fds.legend(loc="lower right", fontsize=7)
    _memory_panel(axes[1][1], samples, "engine_rss_mib", "Engine RSS, all its processes")
    ax = axes[1][2]
    ax.step(minutes, [s["engine_running"] for s in samples], where="post")
    ax.set_title("vLLM running requests (sampled)")
    ax.set_xlabel("minutes")
    config = result["config"]
    fig.suptitle(
        f"Soak: {config['minutes']} min at concurrency {config['concurrency']}, "
        f"{result['totals']['requests']} requests, "
        f"{result['errors']['unexpected']['count']} unexpected errors, "
        f"{result['errors']['expected_4xx']['count']} expected 4xx"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _memory_panel(ax: Any, samples: list[dict[str, Any]], field: str, title: str) -> None:
    """The series over time, and the least-squares line over the second half (the reported slope)."""
    times = [s["t_s"] for s in samples]
    values = [s[field] for s in samples]
    ax.plot([t / 60 for t in times], values, label="RSS")
    per_hour = second_half_slope_per_hour(times, values)
    middle = (times[0] + times[-1]) / 2
    late = [(t, v) for t, v in zip(times, values, strict=True) if t >= middle]
    if per_hour is not None:
        mean_t = statistics.fmean(t for t, _ in late)
        mean_v = statistics.fmean(v for _, v in late)
        ends = [late[0][0], late[-1][0]]
        fitted = [mean_v + per_hour / 3600 * (t - mean_t) for t in ends]
        ax.plot([t / 60 for t in ends], fitted, color="red", linestyle="--", label="fit, second half")
    trend = "n/a" if per_hour is None else f"{per_hour:+.1f} MiB/h"
    ax.set_title(f"{title}: {values[0]:.0f} → {values[-1]:.0f} MiB (second half {trend})")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB")
    ax.legend(loc="upper left", fontsize=7)
