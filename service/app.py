"""The composition root: ``build_app`` assembles the FastAPI app; its lifespan builds the
engine client, the catalog and the chat service (and, without an external engine URL, starts
and supervises a local vLLM)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from service import __version__
from service.bundled_model import SERVED_NAME, ensure_bundled_model
from service.catalog import ModelCatalog
from service.chat import ChatService
from service.engine import VLLMEngine, engine_session
from service.error_handlers import install_error_handlers
from service.launcher import EngineSupervisor, vllm_command, vllm_environment
from service.limits import RequestLimits
from service.metrics import Metrics
from service.middleware import BodySizeLimit, RequestContext
from service.routes import router
from service.settings import Settings, get_settings


def build_app(settings: Settings | None = None) -> FastAPI:
    """The gateway, configured by ``settings`` (default: the environment)."""
    settings = settings or get_settings()
    metrics = Metrics()
    app = FastAPI(
        title="hybrid-serve",
        version=__version__,
        summary="OpenAI-compatible chat over vLLM with LoRA adapters and retrieval.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(router)
    install_error_handlers(app, metrics)
    routes = frozenset(getattr(route, "path", "") for route in app.routes)
    # Added last = outermost: every response, a 413 from the size limit included, gets a
    # request id and is counted; the size limit still runs before anything reads the body.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, metrics=metrics)
    app.add_middleware(RequestContext, metrics=metrics, routes=routes)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    session = engine_session(
        connect_timeout_s=settings.engine_connect_timeout_s,
        read_timeout_s=settings.engine_read_timeout_s,
        max_connections=settings.engine_max_connections,
        api_key=settings.engine_api_key.get_secret_value() if settings.engine_api_key else None,
    )
    engine = VLLMEngine(session, settings.engine_base_url, retry_after_s=settings.retry_after_s)
    catalog = ModelCatalog(engine, retry_after_s=settings.retry_after_s)
    app.state.catalog = catalog
    app.state.chat = ChatService(engine, catalog, RequestLimits.from_settings(settings), metrics)
    supervisor: EngineSupervisor | None = None
    if settings.manages_engine:
        supervisor = await _local_engine(settings, metrics)
        supervisor.add_ready_hook(catalog.refresh)
        # The gateway answers /health at once; /ready and chat say 503 until the engine is up.
        supervisor.start()
    app.state.supervisor = supervisor
    try:
        yield
    finally:
        if supervisor is not None:
            await supervisor.stop()
        await session.close()


async def _local_engine(settings: Settings, metrics: Metrics) -> EngineSupervisor:
    model_dir, served_name = await asyncio.to_thread(_local_model, settings)
    return EngineSupervisor(
        vllm_command(settings, model_dir, served_name),
        env=vllm_environment(settings),
        ready_url=f"{settings.engine_base_url}/v1/models",
        log_file=settings.engine_log_file,
        start_timeout_s=settings.engine_start_timeout_s,
        on_restart=metrics.engine_restarts.inc,
    )


def _local_model(settings: Settings) -> tuple[Path, str]:
    if settings.model_dir is not None:
        return settings.model_dir, settings.served_model_name or settings.model_dir.name
    bundled = ensure_bundled_model(settings.cache_dir)
    return bundled.path, settings.served_model_name or SERVED_NAME
