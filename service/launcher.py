"""Starts and supervises a local vLLM OpenAI server when no external engine is configured.

The engine runs in its own process group (vLLM forks workers), logs to a file, is restarted
with backoff when it dies, and is stopped with its whole group on shutdown. It runs under
``service.engine_guard``, which stops the whole group even if the gateway itself is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from pathlib import Path

import aiohttp

from adapters.model_files import UnsafeModelError, check_model_dir
from adapters.store import VERSIONS_DIR
from service.bundled_model import model_dir as bundled_model_dir
from service.settings import Settings

logger = logging.getLogger(__name__)

_STOP_GRACE_S = 15.0
# ChatML with tools in the Hermes format (vLLM's "hermes" parser reads the calls back).
BUNDLED_CHAT_TEMPLATE = Path(__file__).parent / "data" / "chatml_tools.jinja"
_MAX_BACKOFF_S = 30.0


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPED = "stopped"


class EngineStartError(RuntimeError):
    """The engine exited or never became ready while starting."""


def vllm_command(settings: Settings, model_dir: Path, served_name: str) -> list[str]:
    """The vLLM OpenAI server command line for the local engine."""
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        # Weights are read as safetensors or not at all: vLLM itself then refuses a pickle,
        # whatever files sit beside them (check_model_dir refuses those before this).
        "--load-format",
        "safetensors",
        "--served-model-name",
        served_name,
        "--host",
        settings.engine_host,
        "--port",
        str(settings.engine_port),
        "--enable-lora",
        "--max-loras",
        str(settings.max_loras),
        "--max-cpu-loras",
        str(settings.max_cpu_loras),
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--disable-uvicorn-access-log",
    ]
    if settings.max_model_len is not None:
        command += ["--max-model-len", str(settings.max_model_len)]
    if settings.model_dir is None:  # the bundled model: its own template knows no tools
        command += ["--chat-template", str(BUNDLED_CHAT_TEMPLATE)]
    if settings.tool_call_parser:
        command += ["--enable-auto-tool-choice", "--tool-call-parser", settings.tool_call_parser]
        command += ["--tool-strict-level", settings.tool_strict_level]
    if settings.reasoning_parser:
        command += ["--reasoning-parser", settings.reasoning_parser]
    if settings.engine_api_key is not None:
        command += ["--api-key", settings.engine_api_key.get_secret_value()]
    return command + list(settings.engine_extra_args)


def model_dirs_problem(settings: Settings) -> str | None:
    """Why ``serve`` must not start as configured, or None: a model directory it would load
    (the local engine's, HYBRID_BASE_MODEL_DIR, HYBRID_EMBEDDER_DIR) holds code, pickles or no
    safetensors. The bundled model is checked here once built, and by the app after building it."""
    bundled = bundled_model_dir(settings.cache_dir)
    configured = [
        ("HYBRID_BASE_MODEL_DIR", settings.base_model_dir),
        ("HYBRID_EMBEDDER_DIR", settings.embedder_dir),
    ]
    if settings.manages_engine and settings.model_dir is not None:
        configured.insert(0, ("HYBRID_MODEL_DIR", settings.model_dir))
    elif settings.manages_engine and bundled.exists():
        configured.insert(0, ("the bundled model", bundled))
    for source, directory in configured:
        if directory is None:
            continue
        try:
            check_model_dir(directory)
        except UnsafeModelError as error:
            return f"{error} ({source})"
    return None


def vllm_environment(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.engine_kv_cache_gib)
    # Weights are local; the engine must never reach for a hub.
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if settings.lora_resolver:
        # The engine finds adapters in the store by their version's id (see AdapterRegistry).
        env["VLLM_PLUGINS"] = "lora_filesystem_resolver"
        env["VLLM_LORA_RESOLVER_CACHE_DIR"] = str(settings.adapter_store_dir / VERSIONS_DIR)
    return env


class EngineSupervisor:
    """Runs ``command`` until :meth:`stop`; ``ready_url`` answering 200 means ready.

    ``on_ready`` callbacks run after every (re)start, e.g. to reload adapters."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: dict[str, str],
        ready_url: str,
        log_file: Path,
        start_timeout_s: float,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self._command = list(command)
        self._env = env
        self._ready_url = ready_url
        self._log_file = log_file
        self._start_timeout_s = start_timeout_s
        self._on_restart = on_restart
        self._on_ready: list[Callable[[], Awaitable[object]]] = []
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self.state = EngineState.STOPPED

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def add_ready_hook(self, hook: Callable[[], Awaitable[object]]) -> None:
        self._on_ready.append(hook)

    def start(self) -> None:
        """Start supervising in the background: the engine is started, and restarted with
        backoff whenever it exits or fails to become ready, until :meth:`stop`."""
        self._stopping = False
        self._watcher = asyncio.create_task(self._supervise(), name="engine-supervisor")

    async def wait_ready(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.state is not EngineState.READY:
            if loop.time() > deadline:
                raise EngineStartError(f"engine not ready after {timeout_s:.0f}s; see {self._log_file}")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self._terminate()
        self.state = EngineState.STOPPED

    async def _supervise(self) -> None:
        backoff = 1.0
        self.state = EngineState.STARTING
        while not self._stopping:
            try:
                await self._spawn_until_ready()
                backoff = 1.0
                assert self._process is not None
                code = await self._process.wait()
                logger.error("engine exited with code %s", code)
                # vLLM's workers may outlive the server process; they hold the memory and
                # the port the next engine needs.
                _signal_group(self._process.pid, signal.SIGKILL)
            except EngineStartError as exc:
                logger.error("engine failed to start: %s", exc)
            if self._stopping:
                return
            self.state = EngineState.RESTARTING
            if self._on_restart is not None:
                self._on_restart()
            logger.warning("restarting the engine in %.0fs", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _spawn_until_ready(self) -> None:
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        with self._log_file.open("ab") as log:
            log.write(f"\n==== hybrid-serve: starting {' '.join(self._command)}\n".encode())
            log.flush()
            self._process = await asyncio.create_subprocess_exec(
                # The guard takes the engine's whole process group down with it, even when
                # the gateway dies by SIGKILL (see service/engine_guard.py).
                sys.executable,
                "-m",
                "service.engine_guard",
                "--",
                *self._command,
                env=self._env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        logger.info("engine started (pid %s), log: %s", self._process.pid, self._log_file)
        try:
            await self._wait_ready(self._process)
        except BaseException:
            await self._terminate()
            raise
        self.state = EngineState.READY
        logger.info("engine ready at %s", self._ready_url)
        for hook in self._on_ready:
            try:
                await hook()
            except Exception:  # a failing hook must not take the supervisor down
                logger.exception("engine ready hook %r failed", hook)

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as probe:
            while loop.time() < deadline:
                if process.returncode is not None:
                    raise EngineStartError(
                        f"engine exited with code {process.returncode} while starting; see {self._log_file}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with probe.get(self._ready_url) as response:
                        if response.status == 200:
                            return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(process.wait(), timeout=1.0)
        raise EngineStartError(f"engine not ready after {self._start_timeout_s:.0f}s; see {self._log_file}")

    async def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is not None:
            # The leader is gone, but workers it forked may still hold memory and the port.
            _signal_group(process.pid, signal.SIGKILL)
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=_STOP_GRACE_S)
        except TimeoutError:
            logger.warning("engine ignored SIGTERM for %.0fs; killing it", _STOP_GRACE_S)
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
        # Workers that outlived their leader still belong to the group.
        _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
