"""Adapters: how fast a registered adapter serves its first token, and what serving through
adapters costs in throughput, in one run against the real engine.

- register → first token: upload a real PEFT adapter through the admin API, then stream one
  chat request through it; the time until its first content token (p50, p95);
- throughput at a fixed concurrency with traffic spread round-robin over 1, 4 and 8 adapters,
  against the base model, rounds alternating.

Writes ``bench/results/adapters.json`` and ``.png``. Not a test: it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.gateway_overhead import percentile
from tests.adapter_factory import bundled_model_dir, make_lora_adapter
from tests.harness import ADMIN_TOKEN, RunningService, running_service

REQUEST = {
    "messages": [{"role": "user", "content": "Write a short story about a lighthouse."}],
    "max_tokens": 64,
    "temperature": 0.7,
}


def register(admin: httpx.Client, name: str, adapter: Path) -> None:
    files = {
        "adapter_config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes()),
    }
    response = admin.post("/admin/adapters", data={"name": name}, files=files)
    response.raise_for_status()


def first_token_s(client: httpx.Client, url: str, model: str) -> float:
    body = {**REQUEST, "model": model, "stream": True, "max_tokens": 8}
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and any(
                c["delta"].get("content") for c in json.loads(line[6:])["choices"]
            ):
                return time.perf_counter()
    raise AssertionError("the stream carried no content")


def register_to_first_token(service: RunningService, adapter: Path, count: int) -> list[float]:
    samples = []
    with service.admin() as admin, httpx.Client(timeout=300) as client:
        for i in range(count):
            name = f"ttft-{i}"
            started = time.perf_counter()
            register(admin, name, adapter)
            samples.append(first_token_s(client, service.url, name) - started)
            admin.delete(f"/admin/adapters/{name}").raise_for_status()
    return samples


async def tokens_per_second(url: str, models: list[str], concurrency: int, seconds: float) -> float:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        deadline = time.perf_counter() + seconds
        tokens, sent = 0, 0

        async def worker() -> None:
            nonlocal tokens, sent
            while time.perf_counter() < deadline:
                model = models[sent % len(models)]
                sent += 1
                response = await client.post(f"{url}/v1/chat/completions", json={**REQUEST, "model": model})
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens / (time.perf_counter() - started)


def run(service: RunningService, args: argparse.Namespace, adapter: Path) -> dict[str, Any]:
    ttft = register_to_first_token(service, adapter, args.registrations)
    names = [f"spread-{i}" for i in range(max(args.spreads))]
    with service.admin() as admin:
        for name in names:
            register(admin, name, adapter)
    setups = {"base": ["SmolLM2-135M-Instruct"]} | {f"{n} adapters": names[:n] for n in args.spreads}
    rounds: dict[str, list[float]] = {label: [] for label in setups}
    for i in range(args.rounds):
        order = list(setups.items()) if i % 2 == 0 else list(setups.items())[::-1]
        for label, models in order:
            rounds[label].append(
                asyncio.run(tokens_per_second(service.url, models, args.concurrency, args.round_seconds))
            )
    means = {label: statistics.fmean(values) for label, values in rounds.items()}
    return {
        "register_to_first_token_s": {
            "n": len(ttft),
            "p50": percentile(ttft, 50),
            "p95": percentile(ttft, 95),
            "max": max(ttft),
            "samples": ttft,
            "target_p95": 1.0,
        },
        "throughput": {
            "concurrency": args.concurrency,
            "rounds_tok_s": rounds,
            "mean_tok_s": means,
            "ratio_to_base": {label: means[label] / means["base"] for label in means},
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    ttft = result["register_to_first_token_s"]
    left.hist(ttft["samples"], bins=15)
    left.axvline(ttft["p95"], color="red", label=f"p95 {ttft['p95']:.2f} s")
    left.set_title("Register → first token through the adapter")
    left.set_xlabel("seconds")
    left.legend()
    ratios = result["throughput"]["ratio_to_base"]
    right.bar(list(ratios), list(ratios.values()))
    right.set_title(f"Throughput relative to the base (concurrency {result['throughput']['concurrency']})")
    right.set_ylabel("× base tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registrations", type=int, default=20)
    parser.add_argument("--spreads", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--round-seconds", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as data:
        adapter = make_lora_adapter(Path(data) / "adapter", base_dir=bundled_model_dir())
        (Path(data) / "service").mkdir()
        with running_service(Path(data) / "service", admin_token=ADMIN_TOKEN) as service:
            result = run(service, args, adapter)
    (args.out / "adapters.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "adapters.png")
    summary = {
        "register_to_first_token_p95_s": result["register_to_first_token_s"]["p95"],
        "throughput_ratio_to_base": result["throughput"]["ratio_to_base"],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
