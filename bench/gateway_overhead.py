"""Gateway overhead: the same requests sent straight to vLLM and through the gateway, in one
run, alternating between the two so that the machine's noise falls on both alike.

Measures (pinned route, one uvicorn worker):
- added latency of non-streaming short generations (p50, p99 of gateway minus direct),
- streaming time-to-first-token delta (p50),
- throughput through the gateway relative to direct at the engine's saturating concurrency;
- and, apart, the added latency in front of a canned engine that answers at once (the
  gateway's own cost, without the real engine competing for the same CPU cores).

Writes ``bench/results/gateway_overhead.json`` and ``.png``. Not a test: it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.harness import RunningService, free_port, running_service, wait_ready

MODEL = "SmolLM2-135M-Instruct"
SHORT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 4,
    "temperature": 0,
}
THROUGHPUT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a short story about a lighthouse."}],
    "max_tokens": 64,
    "temperature": 0.7,
}
TARGETS = {"added_p50_ms": 1.0, "added_p99_ms": 5.0, "ttft_delta_p50_ms": 2.0, "throughput_ratio": 0.97}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean_ms": statistics.fmean(values),
        "p50_ms": percentile(values, 50),
        "p90_ms": percentile(values, 90),
        "p99_ms": percentile(values, 99),
    }


def alternate(pairs: int, measure: Callable[[str], float], bases: tuple[str, str]) -> dict[str, list[float]]:
    """``pairs`` measurements of each base, the order flipped every pair (ABBA...)."""
    samples: dict[str, list[float]] = {bases[0]: [], bases[1]: []}
    for i in range(pairs):
        order = bases if i % 2 == 0 else bases[::-1]
        for base in order:
            samples[base].append(measure(base))
    return samples


def latency_ms(client: httpx.Client, base: str) -> float:
    started = time.perf_counter()
    response = client.post(f"{base}/v1/chat/completions", json=SHORT)
    elapsed = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    return elapsed


def ttft_ms(client: httpx.Client, base: str) -> float:
    body = {**SHORT, "stream": True, "max_tokens": 8}
    started = time.perf_counter()
    first = None
    with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and _has_content(line[6:]):
                first = (time.perf_counter() - started) * 1000
    assert first is not None, "the stream carried no content"
    return first


def _has_content(payload: str) -> bool:
    return any(choice["delta"].get("content") for choice in json.loads(payload)["choices"])


async def tokens_per_second(base: str, concurrency: int, seconds: float) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        deadline = time.perf_counter() + seconds
        tokens = 0

        async def worker() -> None:
            nonlocal tokens
            while time.perf_counter() < deadline:
                response = await client.post(f"{base}/v1/chat/completions", json=THROUGHPUT)
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens / (time.perf_counter() - started)


def saturating_concurrency(
    direct: str, candidates: list[int], seconds: float
) -> tuple[int, dict[int, float]]:
    """The smallest concurrency past which direct throughput grows by less than 5%."""
    sweep = {c: asyncio.run(tokens_per_second(direct, c, seconds)) for c in candidates}
    chosen = candidates[-1]
    for low, high in itertools.pairwise(candidates):
        if sweep[high] < sweep[low] * 1.05:
            chosen = low
            break
    return chosen, sweep


@contextmanager
def gateway_over_canned_engine() -> Iterator[tuple[str, str]]:
    """The gateway in front of :mod:`bench.canned_engine`: (direct URL, gateway URL)."""
    engine_port, port = free_port(), free_port()
    engine = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.canned_engine:app",
            "--port",
            str(engine_port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
    )
    env = {**os.environ, "HYBRID_ENGINE_URL": f"http://127.0.0.1:{engine_port}", "HYBRID_PORT": str(port)}
    gateway = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 60, gateway)
        yield f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{port}"
    finally:
        for process in (gateway, engine):
            process.terminate()
            process.wait(timeout=30)


def intrinsic(args: argparse.Namespace) -> dict[str, Any]:
    """Added latency with an engine that costs nothing: the gateway's own share."""
    with gateway_over_canned_engine() as (direct, gateway), httpx.Client(timeout=30) as client:
        for base in (direct, gateway):
            for _ in range(200):
                latency_ms(client, base)
        samples = alternate(args.intrinsic_pairs, lambda b: latency_ms(client, b), (direct, gateway))
    latency = {"direct": summary(samples[direct]), "gateway": summary(samples[gateway])}
    return {
        "latency": latency,
        "added_p50_ms": latency["gateway"]["p50_ms"] - latency["direct"]["p50_ms"],
        "added_p99_ms": latency["gateway"]["p99_ms"] - latency["direct"]["p99_ms"],
    }


def run(service: RunningService, args: argparse.Namespace) -> dict[str, Any]:
    direct, gateway = service.engine_url, service.url
    names = {direct: "direct", gateway: "gateway"}
    with httpx.Client(timeout=120) as client:
        for base in (direct, gateway):  # warm both paths and the engine's caches
            for _ in range(20):
                latency_ms(client, base)
                ttft_ms(client, base)
        lat = alternate(args.pairs, lambda b: latency_ms(client, b), (direct, gateway))
        ttft = alternate(args.ttft_pairs, lambda b: ttft_ms(client, b), (direct, gateway))

    concurrency, sweep = saturating_concurrency(direct, args.sweep, args.sweep_seconds)
    rounds: dict[str, list[float]] = {"direct": [], "gateway": []}
    for i in range(args.rounds):
        for base in (direct, gateway) if i % 2 == 0 else (gateway, direct):
            rounds[names[base]].append(asyncio.run(tokens_per_second(base, concurrency, args.round_seconds)))

    latency = {names[b]: summary(v) for b, v in lat.items()}
    first_token = {names[b]: summary(v) for b, v in ttft.items()}
    direct_tps, gateway_tps = statistics.fmean(rounds["direct"]), statistics.fmean(rounds["gateway"])
    figures = {
        "added_p50_ms": latency["gateway"]["p50_ms"] - latency["direct"]["p50_ms"],
        "added_p99_ms": latency["gateway"]["p99_ms"] - latency["direct"]["p99_ms"],
        "ttft_delta_p50_ms": first_token["gateway"]["p50_ms"] - first_token["direct"]["p50_ms"],
        "throughput_ratio": gateway_tps / direct_tps,
    }
    met = {
        key: (figures[key] >= target if key == "throughput_ratio" else figures[key] <= target)
        for key, target in TARGETS.items()
    }
    return {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "parameters": vars(args) | {"short_request": SHORT, "throughput_request": THROUGHPUT},
        "latency": latency,
        "ttft": first_token,
        "throughput": {
            "concurrency": concurrency,
            "sweep_direct_tok_s": sweep,
            "rounds_tok_s": rounds,
            "direct_tok_s": direct_tps,
            "gateway_tok_s": gateway_tps,
        },
        "figures": figures,
        "targets": TARGETS,
        "met": met,
        "samples_ms": {
            "latency": {names[b]: v for b, v in lat.items()},
            "ttft": {names[b]: v for b, v in ttft.items()},
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in (
        (axes[0], "latency", "Non-streaming latency (4 tokens)"),
        (axes[1], "ttft", "Streaming time to first token"),
    ):
        for name, values in result["samples_ms"][key].items():
            ordered = sorted(values)
            ax.plot(ordered, [i / len(ordered) for i in range(len(ordered))], label=name)
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.legend()
    throughput = result["throughput"]
    axes[2].bar(["direct", "gateway"], [throughput["direct_tok_s"], throughput["gateway_tok_s"]])
    axes[2].set_title(
        f"Throughput at concurrency {throughput['concurrency']} "
        f"(ratio {result['figures']['throughput_ratio']:.3f})"
    )
    axes[2].set_ylabel("completion tokens / s")
    own = result["intrinsic"]
    fig.suptitle(
        "Gateway overhead over vLLM: added p50 {added_p50_ms:.2f} ms, p99 {added_p99_ms:.2f} ms, "
        "TTFT delta p50 {ttft_delta_p50_ms:.2f} ms".format(**result["figures"])
        + f"\nover a canned engine (the gateway's own cost): added p50 {own['added_p50_ms']:.2f} ms, "
        f"p99 {own['added_p99_ms']:.2f} ms"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=400, help="latency samples per side")
    parser.add_argument("--ttft-pairs", type=int, default=200, help="TTFT samples per side")
    parser.add_argument("--sweep", type=int, nargs="+", default=[4, 8, 16, 32], help="concurrencies to try")
    parser.add_argument("--sweep-seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=4, help="throughput rounds per side")
    parser.add_argument("--round-seconds", type=float, default=15.0)
    parser.add_argument("--intrinsic-pairs", type=int, default=2000, help="samples per side, canned engine")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as data, running_service(Path(data)) as service:
        result = run(service, args)
    result["intrinsic"] = intrinsic(args)
    result["parameters"]["out"] = str(args.out)
    (args.out / "gateway_overhead.json").write_text(json.dumps(result, indent=2, default=str))
    plot(result, args.out / "gateway_overhead.png")
    intrinsic_figures = {k: v for k, v in result["intrinsic"].items() if k != "latency"}
    print(
        json.dumps(
            {"figures": result["figures"], "met": result["met"], "intrinsic": intrinsic_figures}, indent=2
        )
    )


if __name__ == "__main__":
    main()
