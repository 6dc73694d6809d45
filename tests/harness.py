"""Runs the real service for end-to-end tests and benchmarks: `hybrid-serve serve` as a
subprocess, which starts and supervises a real vLLM engine on the bundled model."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

START_TIMEOUT_S = 600.0
ADMIN_TOKEN = "e2e-admin-token"
MAX_MODEL_LEN = 2048
ENDLESS = [{"role": "user", "content": "Repeat the word hello forever: hello hello hello hello"}]
"""At temperature 0 the bundled model answers this by repeating "hello" up to ``max_tokens``: a
generation that lasts as long as a test needs."""


@dataclass(frozen=True)
class RunningService:
    url: str
    engine_url: str
    engine_port: int
    log_file: Path
    data_dir: Path
    process: subprocess.Popen[bytes]

    def client(self, *, max_retries: int = 2, timeout: float = 120.0) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=max_retries, timeout=timeout
        )

    def admin(self) -> httpx.Client:
        """An HTTP client for the admin API, with its token."""
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120
        )

    def engine_processes(self) -> list[psutil.Process]:
        """The engine's server process and its workers (its process group)."""
        leaders = [p for p in psutil.process_iter(["cmdline"]) if _is_engine(p, self.engine_port)]
        found: dict[int, psutil.Process] = {}
        for leader in leaders:
            found[leader.pid] = leader
            for child in _children(leader):
                found[child.pid] = child
        return list(found.values())

    def engine_metric(self, name: str, **labels: str) -> float:
        """Sum of a vLLM Prometheus sample over the series matching ``labels``."""
        return _scrape(self.engine_url, name, labels)

    def gateway_metric(self, name: str, **labels: str) -> float:
        return _scrape(self.url, name, labels)

    def describe(self, lines: int = 15) -> str:
        """Whether the gateway still runs, and its and the engine's last log lines: what a failed
        test must print, since CI keeps only the test output."""
        code = self.process.poll()
        state = "running" if code is None else f"exited with code {code}"
        return (
            f"gateway {state}\n--- gateway log\n{log_tail(self.data_dir / 'gateway.log', lines)}"
            f"\n--- engine log\n{log_tail(self.log_file, lines)}"
        )


def _scrape(url: str, name: str, labels: dict[str, str]) -> float:
    """Sum of a Prometheus sample of ``url``'s /metrics over the series matching ``labels``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.split("{", 1)[0].split(" ", 1)[0] != name:
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextmanager
def explained(service: RunningService) -> Iterator[None]:
    """Re-raise whatever fails in the block with :meth:`RunningService.describe` beside it."""
    try:
        yield
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}\n{service.describe()}") from exc


def _is_engine(process: psutil.Process, port: int) -> bool:
    try:
        cmdline = process.info["cmdline"] or []
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return "vllm.entrypoints.openai.api_server" in cmdline and str(port) in cmdline


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return list(process.children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(
    url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None, *, path: str = "/ready"
) -> None:
    """Poll ``url + path`` until it answers 200; RuntimeError if ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url} exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}{path} not answering after {timeout_s:.0f}s")


def log_tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class ServiceError(RuntimeError):
    """The service did not start or did not stop as it must."""


@contextmanager
def running_service(
    data_dir: Path, *, engine_url: str | None = None, **settings: str
) -> Iterator[RunningService]:
    """Start the service with ``HYBRID_*`` overrides; on exit, SIGTERM it and check that the
    whole engine went with it. With ``engine_url`` the gateway only connects to that engine
    (another test's), which saves starting one."""
    port, engine_port = free_port(), free_port()
    env = {
        **os.environ,
        "HYBRID_PORT": str(port),
        "HYBRID_ENGINE_PORT": str(engine_port),
        "HYBRID_DATA_DIR": str(data_dir),
        **{f"HYBRID_{key.upper()}": value for key, value in settings.items()},
    }
    env.pop("HYBRID_ENGINE_URL", None)
    if engine_url is not None:
        env["HYBRID_ENGINE_URL"] = engine_url
    gateway_log = data_dir / "gateway.log"
    with gateway_log.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    running = RunningService(
        url=f"http://127.0.0.1:{port}",
        engine_url=engine_url or f"http://127.0.0.1:{engine_port}",
        engine_port=engine_port,
        log_file=data_dir / "logs" / "engine.log",
        data_dir=data_dir,
        process=process,
    )
    try:
        wait_ready(running.url, START_TIMEOUT_S, process)
    except (RuntimeError, TimeoutError) as exc:
        process.kill()
        raise ServiceError(
            f"{exc}\n--- gateway log\n{log_tail(gateway_log)}\n--- engine log\n{log_tail(running.log_file)}"
        ) from exc
    first_engine = running.engine_processes()
    try:
        yield running
    except BaseException:
        # The body failed: stop everything, then let its error be the one reported.
        _stop(process, [*first_engine, *running.engine_processes()])
        raise
    # However the gateway ended (SIGTERM here, or a test's SIGKILL), its engine must end too.
    orphans, drained = _stop(process, [*first_engine, *running.engine_processes()])
    if not drained:
        raise ServiceError("the gateway did not stop within 60 s of SIGTERM")
    if engine_url is not None:
        return
    if not first_engine:
        raise ServiceError("no engine process was found while the service ran")
    if orphans:
        raise ServiceError(f"engine processes left behind after the gateway ended: {orphans}")


def _stop(
    process: subprocess.Popen[bytes], engine: list[psutil.Process]
) -> tuple[list[psutil.Process], bool]:
    """SIGTERM the gateway (SIGKILL after 60 s); return the engine processes that outlived it by
    30 s (killed then, so that nothing leaks past a run) and whether it stopped in time."""
    drained = True
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        drained = False
        process.kill()
        process.wait()
    _, alive = psutil.wait_procs({p.pid: p for p in engine}.values(), timeout=30)
    orphans = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for orphan in orphans:
        with contextlib.suppress(psutil.NoSuchProcess):
            orphan.kill()
    return orphans, drained


def wait_for_router(admin: httpx.Client, adapters: set[str], timeout_s: float = 180.0) -> dict[str, Any]:
    """``GET /admin/router`` once the classifier routes (at least) ``adapters`` and no refit is
    running (the gateway refits in the background after every adapter change)."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = admin.get("/admin/router").json()
        classifier = body.get("classifier")
        routed = set(classifier["classes"]) - {"base"} if classifier else set()
        if adapters <= routed and not body["fitting"]:
            return body
        time.sleep(0.5)
    raise AssertionError(f"the router did not catch up with {sorted(adapters)}: {body}")
