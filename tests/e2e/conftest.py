"""The real service, started once per test session (about half a minute to two minutes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.harness import (
    ADMIN_TOKEN,
    MAX_MODEL_LEN,
    RunningService,
    ServiceError,
    free_port,
    log_tail,
    running_service,
)

_LEVELS = re.compile(r" (WARNING|ERROR|CRITICAL) ")
_LOG_OFFSET = pytest.StashKey[int]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that used the session's service reports what the gateway warned of while
    it ran, and the engine's last lines: CI keeps only the test output, and the cause of a 5xx
    is in those logs."""
    report = yield
    service = getattr(item, "funcargs", {}).get("service")
    if not isinstance(service, RunningService):
        return report
    gateway_log = service.data_dir / "gateway.log"
    if call.when == "setup":
        item.stash[_LOG_OFFSET] = gateway_log.stat().st_size if gateway_log.exists() else 0
    elif call.when == "call" and report.failed:
        warned = _warnings(gateway_log, since=item.stash.get(_LOG_OFFSET, 0))
        report.sections.append(("gateway warnings during the test", warned))
        report.sections.append(("machine", _machine(service)))
        report.sections.append(("gateway log, last lines", log_tail(gateway_log, lines=10)))
        report.sections.append(("engine log, last lines", log_tail(service.log_file, lines=20)))
    return report


def _warnings(log: Path, *, since: int, lines: int = 40) -> str:
    """The gateway's warnings and errors from byte ``since`` on (it logs a line per request,
    which buries them)."""
    if not log.exists():
        return "(no log)"
    with log.open("rb") as file:
        file.seek(since)
        text = file.read().decode(errors="replace")
    found = [line for line in text.splitlines() if _LEVELS.search(line)]
    return "\n".join(found[-lines:]) or "(none)"


def _machine(service: RunningService) -> str:
    """What a loaded or constrained machine would show: load, free memory, the gateway's
    descriptors against its limit."""
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    available = psutil.virtual_memory().available / 2**30
    try:
        gateway = psutil.Process(service.process.pid)
        fds = f"{gateway.num_fds()} of {gateway.rlimit(psutil.RLIMIT_NOFILE)[0]}"
    except psutil.Error as exc:
        fds = f"unknown ({exc!r})"
    return f"load {load}; {available:.1f} GiB available; gateway descriptors {fds}"


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    # Shutting down is part of the contract: leaving the block checks that SIGTERM stopped
    # the gateway and its whole engine, and fails the session otherwise.
    data_dir = tmp_path_factory.mktemp("data")
    (data_dir / "import").mkdir()
    try:
        with running_service(
            data_dir,
            max_model_len=str(MAX_MODEL_LEN),
            engine_kv_cache_gib="2",
            admin_token=ADMIN_TOKEN,
            adapter_import_dir=str(data_dir / "import"),
        ) as running:
            yield running
    except ServiceError as exc:
        pytest.fail(str(exc))


@dataclass(frozen=True)
class ChromaServer:
    url: str
    process: subprocess.Popen[bytes]


@pytest.fixture
def chroma_server(tmp_path: Path) -> Iterator[ChromaServer]:
    """``chroma run`` on loopback, as an operator would run it beside several gateways."""
    port = free_port()
    chroma = Path(sys.executable).parent / "chroma"
    log = (tmp_path / "chroma.log").open("wb")
    process = subprocess.Popen(
        [str(chroma), "run", "--path", str(tmp_path / "chroma"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "chroma.log").read_text()
            try:
                if httpx.get(f"{url}/api/v2/heartbeat", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Chroma server did not start"
            time.sleep(0.5)
        yield ChromaServer(url, process)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
