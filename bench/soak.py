"""Soak: the real service under ``--minutes`` of mixed traffic at a fixed concurrency, to see
that nothing fails, latency holds, and memory and file descriptors stay flat.

The service is started once on the bundled model with one LoRA adapter (registered with
CLINC150 banking examples, so that ``auto`` routes to it too) and a collection of PubMedQA
abstracts. Then ``--concurrency`` workers send requests whose kind a seeded RNG draws from
:data:`MIX`: plain and streaming chat on the base model, chat through the adapter, ``rag: on``
questions about the abstracts, ``model: auto`` over all three sorts of prompt, streams the
client abandons after their first chunk, and client mistakes (invalid JSON, an unknown field),
which must be answered 400. Every 5 s: the gateway's RSS and open fds, the engine's RSS, and
vLLM's running requests.

An unexpected outcome (a 5xx, a transport error, a status other than the one the request
calls for, a stream carrying an error event or ending without ``[DONE]``) makes the exit
status 1. The memory trend is reported, not judged.

Writes ``bench/results/soak.json`` and ``.png``. Not a test: it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import soak_report
from bench.soak_report import MIB, Outcome, Sample, Verdict
from tests.adapter_factory import bundled_model_dir, make_lora_adapter
from tests.harness import ADMIN_TOKEN, MAX_MODEL_LEN, RunningService, running_service

MODEL = "SmolLM2-135M-Instruct"
ADAPTER = "soak-banking"
COLLECTION = "soak-pubmedqa"
PUBMEDQA = Path("../shared/data/pubmedqa/train_dev.json")
CLINC = Path("../shared/data/clinc150")
MIX = {
    "plain": 24,
    "stream": 20,
    "adapter": 14,
    "rag": 14,
    "auto": 16,
    "abandoned": 4,
    "invalid_json": 4,
    "unknown_field": 4,
}
"""Relative weights of each kind of request."""
CLIENT_MISTAKES = frozenset({"invalid_json", "unknown_field"})
STREAMING = frozenset({"stream", "abandoned"})
MAX_TOKENS = (8, 32)
SAMPLE_EVERY_S = 5.0
ERROR_CHARS = 500


@dataclass(frozen=True)
class Corpus:
    general: list[str]  # CLINC150 validation texts of every domain, and out of scope
    banking: list[str]  # CLINC150 validation texts of the banking domain: the adapter's
    examples: list[str]  # CLINC150 training texts of the banking domain: its routing examples
    questions: list[str]  # the PubMedQA questions of the ingested abstracts
    documents: list[dict[str, str]]  # those abstracts, as the admin API takes them


def load_corpus(documents: int) -> Corpus:
    clinc = json.loads((CLINC / "train_val.json").read_text())
    banking = set(json.loads((CLINC / "domains.json").read_text())["banking"])
    items = sorted(json.loads(PUBMEDQA.read_text()).items())[:documents]
    return Corpus(
        general=[text for text, _ in clinc["val"] + clinc["oos_val"]],
        banking=[text for text, intent in clinc["val"] if intent in banking],
        examples=[text for text, intent in clinc["train"] if intent in banking][::15][:40],
        questions=[item["QUESTION"] for _, item in items],
        documents=[{"source": pmid, "text": " ".join(item["CONTEXTS"])} for pmid, item in items],
    )


def draw_kind(rng: random.Random) -> str:
    return rng.choices(list(MIX), weights=list(MIX.values()))[0]


def plan(kind: str, rng: random.Random, corpus: Corpus) -> bytes:
    """The body of one request of ``kind``: prompts, ``max_tokens`` and temperature drawn."""
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": rng.randint(*MAX_TOKENS),
        "temperature": rng.choice([0.0, 0.7]),
    }
    prompt = rng.choice(corpus.general)
    if kind == "adapter":
        body["model"], prompt = ADAPTER, rng.choice(corpus.banking)
    elif kind == "rag":
        body["rag"], prompt = "on", rng.choice(corpus.questions)
    elif kind == "auto":
        body["model"] = "auto"
        prompt = rng.choice(rng.choice([corpus.general, corpus.banking, corpus.questions]))
    elif kind == "abandoned":
        # A prompt the model answers at length (see tests/e2e/test_disconnect.py), so that
        # the client leaves while the engine is still generating.
        prompt = "Repeat the word hello forever: hello hello hello hello hello hello"
        body |= {"max_tokens": 256, "temperature": 0.0}
    elif kind == "unknown_field":
        body["logit_bias"] = {"50256": -100}
    body["messages"] = [{"role": "user", "content": prompt}]
    if kind in STREAMING:
        body["stream"] = True
    encoded = json.dumps(body).encode()
    return encoded[: len(encoded) // 2] if kind == "invalid_json" else encoded


def _error_type(text: str) -> str | None:
    try:
        error = json.loads(text)["error"]
        return str(error.get("code") or error["type"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


async def send(client: httpx.AsyncClient, url: str, kind: str, payload: bytes, origin: float) -> Outcome:
    """One request, judged: ``expected_4xx`` for a client mistake answered 400 in the
    envelope, ``ok`` for a 200 with a whole answer, ``unexpected`` for anything else."""
    started = time.perf_counter()
    status: int | None = None
    ttft: float | None = None
    route: str | None = None

    def outcome(verdict: Verdict, error_type: str | None = None, error: str | None = None) -> Outcome:
        return Outcome(
            kind, started - origin, time.perf_counter() - started, status, verdict, ttft,
            error_type, None if error is None else error[:ERROR_CHARS], route,
        )  # fmt: skip

    headers = {"content-type": "application/json"}
    try:
        async with client.stream("POST", url, content=payload, headers=headers) as response:
            status, route = response.status_code, response.headers.get("x-route")
            if status != 200 or kind not in STREAMING:
                text = (await response.aread()).decode(errors="replace")
                if kind in CLIENT_MISTAKES:
                    if status == 400 and _error_type(text) is not None:
                        return outcome("expected_4xx", _error_type(text))
                    return outcome("unexpected", _error_type(text) or "wrong_status", text)
                if status != 200:
                    return outcome("unexpected", _error_type(text) or "no_envelope", text)
                if not json.loads(text).get("choices"):
                    return outcome("unexpected", "no_choices", text)
                return outcome("ok")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    return outcome("ok")
                chunk = json.loads(data)
                if "error" in chunk:
                    return outcome("unexpected", "stream_error", data)
                if kind == "abandoned":
                    ttft = time.perf_counter() - started
                    return outcome("ok")  # leaving the block closes the connection mid-stream
                if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    ttft = time.perf_counter() - started
            return outcome("unexpected", "stream_without_done")
    except httpx.HTTPError as exc:
        return outcome("unexpected", f"transport:{type(exc).__name__}", repr(exc))
    except ValueError as exc:  # a body or chunk that is not JSON
        return outcome("unexpected", "bad_json_response", repr(exc))


def take_sample(service: RunningService, gateway: psutil.Process, origin: float) -> Sample:
    engine_rss, engine = 0, service.engine_processes()
    for process in engine:
        with contextlib.suppress(psutil.NoSuchProcess):
            engine_rss += process.memory_info().rss
    try:
        running: float | None = service.engine_metric("vllm:num_requests_running")
    except httpx.HTTPError:
        running = None
    return Sample(
        t_s=time.perf_counter() - origin,
        gateway_rss_mib=gateway.memory_info().rss / MIB,
        gateway_fds=gateway.num_fds(),
        engine_rss_mib=engine_rss / MIB,
        engine_processes=len(engine),
        engine_running=running,
    )


async def sample_until(
    stop: asyncio.Event, service: RunningService, origin: float, samples: list[Sample]
) -> None:
    gateway = psutil.Process(service.process.pid)
    while True:
        samples.append(await asyncio.to_thread(take_sample, service, gateway, origin))
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=SAMPLE_EVERY_S)


async def engine_idle_after_s(service: RunningService, limit_s: float = 15.0) -> float | None:
    """Seconds until vLLM runs no request once the load has stopped; None if it never does."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        if await asyncio.to_thread(service.engine_metric, "vllm:num_requests_running") == 0:
            return time.perf_counter() - started
        await asyncio.sleep(0.25)
    return None


async def soak(
    service: RunningService, corpus: Corpus, args: argparse.Namespace
) -> tuple[list[Outcome], list[Outcome], list[Sample], float | None]:
    """Warm-up (one request of each kind), then the timed traffic: (warm-up, soak, samples,
    seconds until the engine was idle afterwards)."""
    url = f"{service.url}/v1/chat/completions"
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        origin = time.perf_counter()
        warm_up = [await send(client, url, kind, plan(kind, rng, corpus), origin) for kind in MIX]
        outcomes: list[Outcome] = []
        samples: list[Sample] = []
        stop = asyncio.Event()
        origin = time.perf_counter()
        deadline = origin + args.minutes * 60
        sampler = asyncio.create_task(sample_until(stop, service, origin, samples))

        async def worker() -> None:
            while time.perf_counter() < deadline:
                kind = draw_kind(rng)
                outcomes.append(await send(client, url, kind, plan(kind, rng, corpus), origin))

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        idle_after = await engine_idle_after_s(service)
        stop.set()
        await sampler
    return warm_up, outcomes, samples, idle_after


def set_up(service: RunningService, adapter: Path, corpus: Corpus) -> dict[str, Any]:
    """Register the adapter and ingest the abstracts, through the admin API."""
    with service.admin() as admin:
        files = {
            "adapter_config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
            "adapter_model": (
                "adapter_model.safetensors",
                (adapter / "adapter_model.safetensors").read_bytes(),
            ),
        }
        fields = {
            "name": ADAPTER,
            "description": "Banking: accounts, balances, transfers, cards, bills, fraud",
            "examples": json.dumps(corpus.examples),
        }
        admin.post("/admin/adapters", data=fields, files=files).raise_for_status()
        ingested = admin.post(
            f"/admin/collections/{COLLECTION}/documents", json={"documents": corpus.documents}
        )
        ingested.raise_for_status()
        result: dict[str, Any] = ingested.json()
        return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    totals, errors = result["totals"], result["errors"]
    lines = [
        f"{totals['requests']} requests in {result['config']['minutes']} min "
        f"({totals['requests_per_s']:.1f}/s); unexpected {errors['unexpected']['count']} "
        f"{errors['unexpected']['by_status']}, expected 4xx {errors['expected_4xx']['count']}",
    ]
    for kind, figures in result["latency"].items():
        lines.append(
            f"  {kind:14} n={figures['n']:5}  p50 {figures['p50_ms']:7.0f} ms  "
            f"p95 {figures['p95_ms']:7.0f} ms  p99 {figures['p99_ms']:7.0f} ms"
        )
    for name in ("gateway_rss", "engine_rss"):
        rss = result[name]
        slope = rss["slope_second_half_mib_per_hour"]
        lines.append(
            f"{name}: {rss['start_mib']:.0f} -> {rss['end_mib']:.0f} MiB (max {rss['max_mib']:.0f}), "
            f"second half {'n/a' if slope is None else f'{slope:+.1f}'} MiB/h"
        )
    fds = result["gateway_fds"]
    lines.append(f"gateway fds: {fds['start']} -> {fds['end']} (max {fds['max']})")
    lines.append(f"engine idle {result['engine_idle_after_s']} s after the load stopped")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the timed traffic")
    parser.add_argument("--concurrency", type=int, default=4, help="workers, each one request at a time")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kinds, prompts and lengths")
    parser.add_argument("--documents", type=int, default=40, help="PubMedQA abstracts ingested")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args.documents)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as data:
        adapter = make_lora_adapter(Path(data) / "adapter", base_dir=bundled_model_dir())
        (Path(data) / "service").mkdir()
        settings = {"admin_token": ADMIN_TOKEN, "max_model_len": str(MAX_MODEL_LEN)}
        with running_service(Path(data) / "service", **settings) as service:
            ingestion = set_up(service, adapter, corpus)
            warm_up, outcomes, samples, idle_after = asyncio.run(soak(service, corpus, args))
    # The last requests end after the deadline: rates are over the time the traffic really took.
    duration_s = max((o.started_s + o.latency_s for o in outcomes), default=args.minutes * 60)
    bucket_s = 60.0 if args.minutes >= 5 else 10.0
    result = {
        "config": vars(args)
        | {
            "out": str(args.out),
            "mix": MIX,
            "max_tokens": MAX_TOKENS,
            "sample_every_s": SAMPLE_EVERY_S,
            "max_model_len": MAX_MODEL_LEN,
            "adapter": ADAPTER,
            "ingestion": ingestion,
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "warm_up": [vars(o) for o in warm_up],
        "engine_idle_after_s": idle_after,
        **soak_report.summarise(outcomes, samples, duration_s, bucket_s),
    }
    unexpected = result["errors"]["unexpected"]["count"] + sum(o.verdict == "unexpected" for o in warm_up)
    result["unexpected_total"] = unexpected
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    soak_report.plot(result, args.out / "soak.png")
    print("\n".join(summary_lines(result)))
    if unexpected:
        print(f"FAILED: {unexpected} unexpected errors (see soak.json)", file=sys.stderr)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
