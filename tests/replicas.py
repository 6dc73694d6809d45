"""Several vLLM replicas behind vLLM's router, as deploy/ runs them on many hosts, here on one
machine: each replica is the local engine's own command line (service.launcher) with the
filesystem LoRA resolver on one shared adapter store, and ``vllm-router`` (PyPI) in front."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from adapters.store import VERSIONS_DIR
from service.bundled_model import SERVED_NAME
from service.launcher import vllm_command, vllm_environment
from service.settings import Settings
from tests.adapter_factory import bundled_model_dir
from tests.harness import MAX_MODEL_LEN, free_port, log_tail, wait_ready

START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Replica:
    url: str
    process: subprocess.Popen[bytes]
    log_file: Path

    def model_ids(self) -> set[str]:
        """What this replica serves now: its base model and the adapters it has loaded."""
        response = httpx.get(f"{self.url}/v1/models", timeout=10)
        response.raise_for_status()
        return {card["id"] for card in response.json()["data"]}

    def stop(self) -> None:
        """SIGTERM the replica's process group (vLLM forks an engine core), SIGKILL after 30 s."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def replica_settings(store: Path, port: int) -> Settings:
    """A small CPU engine on the bundled model that resolves adapters from ``store``."""
    return Settings(
        engine_port=port,
        adapter_dir=store,
        lora_resolver=True,
        max_model_len=MAX_MODEL_LEN,
        engine_kv_cache_gib=1,
        max_loras=2,
        max_cpu_loras=4,
    )


def start_replica(store: Path, log_dir: Path) -> Replica:
    port = free_port()
    settings = replica_settings(store, port)
    (store / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)  # the resolver checks it at start
    log_file = log_dir / f"replica-{port}.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            vllm_command(settings, bundled_model_dir(), SERVED_NAME),
            env=vllm_environment(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Replica(f"http://127.0.0.1:{port}", process, log_file)


def start_router(workers: list[Replica], log_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """``vllm-router`` over ``workers``, round robin (each request to the next replica)."""
    port = free_port()
    router = Path(sys.executable).parent / "vllm-router"
    with (log_dir / "router.log").open("wb") as log:
        process = subprocess.Popen(
            [
                str(router),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--worker-urls",
                *[worker.url for worker in workers],
                "--policy",
                "round_robin",
                # As deploy/kubernetes/router.yaml: a dead replica is out after two failed
                # checks two seconds apart.
                "--health-check-interval-secs",
                "2",
                "--health-failure-threshold",
                "2",
                "--prometheus-host",
                "127.0.0.1",
                "--prometheus-port",
                str(free_port()),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return f"http://127.0.0.1:{port}", process


def wait_answering(url: str, path: str, process: subprocess.Popen[bytes], log_file: Path) -> None:
    try:
        wait_ready(url, START_TIMEOUT_S, process, path=path)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}\n{log_tail(log_file)}") from exc


@dataclass(frozen=True)
class Fleet:
    replicas: list[Replica]
    router_url: str


@contextmanager
def running_fleet(store: Path, log_dir: Path, *, size: int = 2) -> Iterator[Fleet]:
    """``size`` replicas (started together) behind a router, all stopped on exit."""
    replicas = [start_replica(store, log_dir) for _ in range(size)]
    router: subprocess.Popen[bytes] | None = None
    try:
        for replica in replicas:
            wait_answering(replica.url, "/v1/models", replica.process, replica.log_file)
        router_url, router = start_router(replicas, log_dir)
        wait_answering(router_url, "/readiness", router, log_dir / "router.log")
        yield Fleet(replicas, router_url)
    finally:
        if router is not None:
            router.terminate()
            router.wait(timeout=30)
        for replica in replicas:
            replica.stop()
