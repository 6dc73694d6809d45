"""The engine supervisor's process handling, against ``tests/fake_engine_server.py`` (a few lines
of stdlib HTTP server that plays the engine process), and the vLLM command line and environment.

Every wait is bounded; the real engine is the e2e tier's business."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from adapters.store import VERSIONS_DIR
from service import launcher
from service.launcher import EngineStartError, EngineState, EngineSupervisor, vllm_command, vllm_environment
from service.settings import Settings

FAKE_ENGINE = Path(__file__).resolve().parents[1] / "fake_engine_server.py"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
BANNER = "==== hybrid-serve: starting "
# Generous: the box may be busy (a developer's engine shares it); a passing run takes ~1 s.
READY_TIMEOUT_S = 20.0


# -- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited. A zombie counts as gone: it has exited and only waits for a
    parent (here possibly a container init that never reaps) to collect it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def _eventually(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.05)


def _kill_stray_sleeper(pid: int) -> None:
    """Test cleanup for a grandchild the supervisor failed to stop (only our own ``sleep 1000``)."""
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"1000"]:
            os.kill(pid, signal.SIGKILL)


class Harness:
    """Builds supervisors over the fake engine and records what they report."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = _free_port()
        self.log_file = tmp_path / "logs" / "engine.log"
        self.child_pid_file = tmp_path / "grandchild.pid"
        self.restarts: list[EngineState] = []
        self.ready_calls: list[int | None] = []
        self.supervisors: list[EngineSupervisor] = []
        self.seen_children: set[int] = set()

    def supervisor(self, *flags: str, start_timeout_s: float = 5.0) -> EngineSupervisor:
        command = [sys.executable, str(FAKE_ENGINE), "--port", str(self.port), *flags]
        if "--spawn-child" in flags:
            command += ["--child-pid-file", str(self.child_pid_file)]
        supervisor = EngineSupervisor(
            command,
            env=dict(os.environ),
            ready_url=f"http://127.0.0.1:{self.port}/v1/models",
            log_file=self.log_file,
            start_timeout_s=start_timeout_s,
            on_restart=lambda: self.restarts.append(supervisor.state),
        )

        async def record_ready() -> None:
            self.ready_calls.append(supervisor.pid)

        supervisor.add_ready_hook(record_ready)
        self.supervisors.append(supervisor)
        return supervisor

    def child_pid(self) -> int:
        pid = int(self.child_pid_file.read_text())
        self.seen_children.add(pid)
        return pid

    def banners(self) -> int:
        return self.log_file.read_text().count(BANNER) if self.log_file.exists() else 0


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        if h.log_file.exists():  # pytest shows it only when the test failed
            print(f"---- {h.log_file}\n{h.log_file.read_text()[-4000:]}")
        for supervisor in h.supervisors:
            await asyncio.wait_for(supervisor.stop(), timeout=20)
        if h.child_pid_file.exists():
            h.seen_children.add(int(h.child_pid_file.read_text()))
        for pid in h.seen_children:
            _kill_stray_sleeper(pid)


# -- the supervisor


async def test_start_becomes_ready_runs_hooks_and_logs(harness: Harness) -> None:
    supervisor = harness.supervisor("--delay-ready", "0.5")
    before = supervisor.state
    supervisor.start()
    await supervisor.wait_ready(READY_TIMEOUT_S)

    assert (before, supervisor.state) == (EngineState.STOPPED, EngineState.READY)
    assert supervisor.pid is not None
    assert not _gone(supervisor.pid)
    assert harness.ready_calls == [supervisor.pid]
    assert harness.restarts == []
    log = harness.log_file.read_text()
    assert f"{BANNER}{sys.executable} {FAKE_ENGINE}" in log
    assert "fake-engine: listening on" in log  # the engine's own output goes to the same file
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://127.0.0.1:{harness.port}/v1/models")
    assert response.status_code == 200
    assert response.json()["data"][0]["id"] == "fake"


async def test_not_ready_while_engine_answers_503(harness: Harness) -> None:
    supervisor = harness.supervisor("--delay-ready", "3")
    supervisor.start()
    with pytest.raises(EngineStartError):
        await supervisor.wait_ready(1.5)
    assert supervisor.state is EngineState.STARTING
    assert harness.ready_calls == []
    await supervisor.wait_ready(READY_TIMEOUT_S)
    assert harness.ready_calls == [supervisor.pid]


async def test_killed_engine_is_restarted_and_hooks_rerun(harness: Harness) -> None:
    supervisor = harness.supervisor()
    supervisor.start()
    await supervisor.wait_ready(READY_TIMEOUT_S)
    first_pid = supervisor.pid
    assert first_pid is not None

    os.kill(first_pid, signal.SIGKILL)
    await _eventually(lambda: len(harness.restarts) == 1, 5, "on_restart after the engine died")
    assert harness.restarts == [EngineState.RESTARTING]
    await _eventually(lambda: len(harness.ready_calls) == 2, READY_TIMEOUT_S, "ready hooks after the restart")

    assert supervisor.state is EngineState.READY
    assert supervisor.pid is not None
    assert supervisor.pid != first_pid
    assert harness.ready_calls == [first_pid, supervisor.pid]
    assert _gone(first_pid)
    assert harness.banners() == 2


async def test_stop_ends_engine_and_its_process_group(harness: Harness) -> None:
    supervisor = harness.supervisor("--spawn-child")
    supervisor.start()
    await supervisor.wait_ready(READY_TIMEOUT_S)
    engine_pid = supervisor.pid
    assert engine_pid is not None
    grandchild = harness.child_pid()
    assert not _gone(grandchild)

    started = time.monotonic()
    await asyncio.wait_for(supervisor.stop(), timeout=10)
    assert time.monotonic() - started < 5

    assert supervisor.state is EngineState.STOPPED
    await _eventually(lambda: _gone(engine_pid), 5, f"engine {engine_pid} gone")
    await _eventually(lambda: _gone(grandchild), 5, f"grandchild {grandchild} gone")
    assert harness.restarts == []  # a requested stop is not a crash


async def test_restart_clears_workers_left_by_a_dead_engine(harness: Harness) -> None:
    """vLLM's workers share the engine's process group; when the leader dies they must not
    outlive it (they would hold memory, and ports, next to the new engine)."""
    supervisor = harness.supervisor("--spawn-child")
    supervisor.start()
    await supervisor.wait_ready(READY_TIMEOUT_S)
    first_pid = supervisor.pid
    assert first_pid is not None
    orphan = harness.child_pid()

    os.kill(first_pid, signal.SIGKILL)
    await _eventually(lambda: len(harness.ready_calls) == 2, READY_TIMEOUT_S, "ready again after the restart")
    assert supervisor.pid != first_pid
    await _eventually(lambda: _gone(orphan), 3, f"worker {orphan} of the dead engine {first_pid} gone")


async def test_failed_start_clears_workers_of_the_dead_engine(harness: Harness) -> None:
    """The same when the server dies while starting (say its port is taken) after its workers
    were forked: the next attempt must not find them still holding the memory."""
    supervisor = harness.supervisor("--spawn-child", "--exit-immediately", "1")
    supervisor.start()
    await _eventually(lambda: len(harness.restarts) >= 1, 5, "on_restart after a start failure")
    orphan = harness.child_pid()
    await _eventually(lambda: _gone(orphan), 3, f"worker {orphan} of the engine that failed to start gone")


async def test_start_failure_is_reported_and_retried(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.launcher")
    supervisor = harness.supervisor("--exit-immediately", "3")
    supervisor.start()

    with pytest.raises(EngineStartError, match="not ready"):
        await supervisor.wait_ready(1.5)
    assert supervisor.state is not EngineState.READY
    assert harness.ready_calls == []
    await _eventually(lambda: len(harness.restarts) >= 1, 3, "on_restart after a start failure")
    assert harness.restarts[0] is EngineState.RESTARTING
    assert any("exited with code 3 while starting" in r.getMessage() for r in caplog.records)
    await _eventually(lambda: harness.banners() >= 2, 5, "a second start attempt")

    started = time.monotonic()
    await asyncio.wait_for(supervisor.stop(), timeout=10)
    assert time.monotonic() - started < 2
    assert supervisor.state is EngineState.STOPPED
    attempts = harness.banners()
    await asyncio.sleep(1.5)
    assert harness.banners() == attempts  # no attempt after stop()


async def test_engine_ignoring_sigterm_is_killed(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(launcher, "_STOP_GRACE_S", 1.0)
    caplog.set_level(logging.WARNING, logger="service.launcher")
    supervisor = harness.supervisor("--ignore-sigterm", "--spawn-child")
    supervisor.start()
    await supervisor.wait_ready(READY_TIMEOUT_S)
    engine_pid = supervisor.pid
    assert engine_pid is not None
    grandchild = harness.child_pid()

    started = time.monotonic()
    await asyncio.wait_for(supervisor.stop(), timeout=10)
    elapsed = time.monotonic() - started

    assert 0.9 <= elapsed < 5  # waited the grace period, then did not wait much longer
    assert supervisor.state is EngineState.STOPPED
    assert any("ignored SIGTERM" in r.getMessage() for r in caplog.records)
    await _eventually(lambda: _gone(engine_pid), 5, f"engine {engine_pid} gone")
    await _eventually(lambda: _gone(grandchild), 5, f"grandchild {grandchild} gone")


async def test_stop_without_start_is_harmless(harness: Harness) -> None:
    supervisor = harness.supervisor()
    await asyncio.wait_for(supervisor.stop(), timeout=5)
    assert supervisor.state is EngineState.STOPPED
    assert supervisor.pid is None


_GATEWAY_SCRIPT = """
import asyncio, os, sys
from pathlib import Path
from service.launcher import EngineSupervisor

async def main() -> None:
    port, log, pid_file = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    supervisor = EngineSupervisor(
        [sys.executable, sys.argv[4], "--port", port],
        env=dict(os.environ),
        ready_url=f"http://127.0.0.1:{port}/v1/models",
        log_file=log,
        start_timeout_s=20,
    )
    supervisor.start()
    await supervisor.wait_ready(20)
    pid_file.write_text(str(supervisor.pid))
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A separate Python process that supervises a fake engine, so that it can be SIGKILLed."""
    pid_file = tmp_path / "engine.pid"
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _GATEWAY_SCRIPT,
            str(_free_port()),
            str(tmp_path / "engine.log"),
            str(pid_file),
            str(FAKE_ENGINE),
        ],
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield gateway, pid_file
    finally:
        gateway.kill()
        gateway.wait(timeout=10)
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_engine_dies_with_a_killed_gateway(gateway_process: tuple[subprocess.Popen[bytes], Path]) -> None:
    gateway, pid_file = gateway_process
    deadline = time.monotonic() + 25
    while not pid_file.exists():
        assert gateway.poll() is None, "the gateway script died before its engine was ready"
        assert time.monotonic() < deadline, "the fake engine never became ready"
        time.sleep(0.05)
    engine_pid = int(pid_file.read_text())
    assert not _gone(engine_pid)

    gateway.kill()  # SIGKILL: no shutdown code runs, only the kernel's parent-death signal
    gateway.wait(timeout=10)
    deadline = time.monotonic() + 5
    while not _gone(engine_pid):
        assert time.monotonic() < deadline, f"engine {engine_pid} outlived its killed gateway"
        time.sleep(0.05)


# -- the command line and the environment


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No HYBRID_ variable or engine knob from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("HYBRID_"):
            monkeypatch.delenv(name)
    for name in ("VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _value(command: list[str], option: str) -> str:
    assert command.count(option) == 1, f"{option} should appear once in {command}"
    return command[command.index(option) + 1]


def test_vllm_command_defaults(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings(
        engine_host="127.0.0.2", engine_port=9311, max_loras=3, max_cpu_loras=6, max_lora_rank=32
    )
    command = vllm_command(settings, Path("/models/smol"), "smol-chat")

    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert _value(command, "--model") == "/models/smol"
    # Pickled weights are refused by vLLM itself, and a model's own code is never trusted.
    assert _value(command, "--load-format") == "safetensors"
    assert not [part for part in command if "trust" in part]
    assert _value(command, "--served-model-name") == "smol-chat"
    assert _value(command, "--host") == "127.0.0.2"
    assert _value(command, "--port") == "9311"
    assert command.count("--enable-lora") == 1
    assert _value(command, "--max-loras") == "3"
    assert _value(command, "--max-cpu-loras") == "6"
    assert _value(command, "--max-lora-rank") == "32"
    assert "--max-model-len" not in command
    assert "--api-key" not in command


def test_vllm_command_optional_parts(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings(
        max_model_len=2048,
        engine_api_key="engine-s3cret",  # pydantic makes it a SecretStr
        engine_extra_args=["--dtype", "bfloat16", "--enforce-eager"],
    )
    command = vllm_command(settings, Path("/m"), "m")

    assert _value(command, "--max-model-len") == "2048"
    assert _value(command, "--api-key") == "engine-s3cret"
    assert command[-3:] == ["--dtype", "bfloat16", "--enforce-eager"]
    assert _value(command, "--port") == "8001"


def test_vllm_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HYBRID_TEST_MARKER", "kept")
    env = vllm_environment(Settings(engine_kv_cache_gib=5))

    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "5"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HYBRID_TEST_MARKER"] == "kept"  # the rest of the environment is inherited
    assert env["PATH"] == os.environ["PATH"]
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ  # a copy, not the process environment


def test_vllm_environment_always_allows_runtime_lora(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "False")
    assert vllm_environment(Settings())["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_vllm_environment_with_the_resolver(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plain = vllm_environment(Settings())
    assert "VLLM_LORA_RESOLVER_CACHE_DIR" not in plain
    env = vllm_environment(Settings(lora_resolver=True, adapter_dir=tmp_path / "adapters"))
    # The engine finds each adapter version by its id in the store's versions directory.
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver"
    assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == str(tmp_path / "adapters" / VERSIONS_DIR)


def test_the_bundled_model_is_served_with_tools(clean_env: pytest.MonkeyPatch) -> None:
    command = vllm_command(Settings(), Path("/m"), "m")
    template = Path(_value(command, "--chat-template"))
    assert template.name == "chatml_tools.jinja"
    assert template.is_file()
    assert "--enable-auto-tool-choice" in command
    assert _value(command, "--tool-call-parser") == "hermes"
    # A small model's forced calls are valid only with their arguments constrained too.
    assert _value(command, "--tool-strict-level") == "parameter"
    assert "--reasoning-parser" not in command


def test_a_model_of_ones_own_keeps_its_template_and_may_turn_tools_off(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = Settings(model_dir=tmp_path, tool_call_parser="", reasoning_parser="deepseek_r1")
    command = vllm_command(settings, tmp_path, "m")
    assert "--chat-template" not in command
    assert "--enable-auto-tool-choice" not in command
    assert "--tool-call-parser" not in command
    assert _value(command, "--reasoning-parser") == "deepseek_r1"
