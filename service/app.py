"""The composition root: ``build_app`` assembles the FastAPI app; its lifespan builds the
engine client, the catalog and the chat service (and, without an external engine URL, starts
and supervises a local vLLM)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from adapters.model_files import check_model_dir
from adapters.store import ROUTER_DIR, AdapterStore
from adapters.validation import BaseModelInfo
from service import __version__
from service.adapter_registry import AdapterRegistry
from service.admin import router as admin_router
from service.admin_collections import router as collections_router
from service.admin_router import router as routing_admin
from service.admission import Admission, AdmissionControl
from service.bundled_model import HF_ID, SERVED_NAME, ensure_bundled_model
from service.catalog import ModelCatalog
from service.chat import ChatService
from service.completions import CompletionService
from service.embeddings_api import EmbeddingService
from service.engine import VLLMEngine, engine_session
from service.error_handlers import install_error_handlers
from service.errors import APIError
from service.general_chat import general_chat_prompts
from service.knowledge import Knowledge
from service.launcher import EngineSupervisor, vllm_command, vllm_environment
from service.limits import RequestLimits
from service.metrics import Metrics
from service.middleware import BodySizeLimit, HeaderLimits, RequestContext
from service.route_learner import RouteLearner
from service.route_training import FitSettings
from service.router import Router
from service.router_store import RouterStore
from service.routes import router
from service.routes_openai import router as openai_router
from service.routes_responses import router as responses_router
from service.settings import Settings, get_settings
from service.tracing import Tracing
from service.traffic_log import TrafficLog

logger = logging.getLogger(__name__)


def build_app(settings: Settings | None = None) -> FastAPI:
    """The gateway, configured by ``settings`` (default: the environment)."""
    settings = settings or get_settings()
    metrics = Metrics()
    app = FastAPI(
        title="hybrid-serve",
        version=__version__,
        summary="OpenAI-compatible chat over vLLM with LoRA adapters and retrieval.",
        lifespan=_lifespan,
        # Starlette's redirect of "/v1/models/" builds its Location from the client's Host
        # header (an open redirect): an unknown path is a plain 404.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    # Parsed once here rather than on every /v1 request.
    app.state.api_keys = settings.api_key_set
    app.state.admission = Admission(settings.max_concurrent_requests, retry_after_s=settings.retry_after_s)
    metrics.watch(app.state.admission)
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(responses_router)
    if settings.admin_token is not None:
        app.include_router(admin_router)
        app.include_router(collections_router)
        app.include_router(routing_admin)
    install_error_handlers(app, metrics)
    routes = frozenset(getattr(route, "path", "") for route in app.routes)
    # Added last = outermost: every response, a 413 from the size limit included, gets a
    # request id and is counted; the size limit still runs before anything reads the body.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        metrics=metrics,
        # First match wins: documents have their own (smaller) limit than adapter uploads.
        larger={
            "/admin/collections/": settings.max_document_upload_bytes,
            "/admin/": settings.max_upload_bytes,
        },
    )
    # Inside the request context (a 429 or 503 gets its id and is counted), outside the size
    # limit: a refused request costs no body read.
    app.add_middleware(AdmissionControl, admission=app.state.admission, metrics=metrics)
    # Before admission, auth and routing: an oversized head takes no slot and is never parsed.
    app.add_middleware(
        HeaderLimits, max_bytes=settings.max_header_bytes, max_headers=settings.max_headers, metrics=metrics
    )
    app.add_middleware(RequestContext, metrics=metrics, routes=routes, tracing=Tracing.from_environment())
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    # First, before any client is opened: an unsafe model directory stops the start here.
    model_dir = await asyncio.to_thread(_local_model, settings) if settings.manages_engine else None
    session = engine_session(
        connect_timeout_s=settings.engine_connect_timeout_s,
        read_timeout_s=settings.engine_read_timeout_s,
        max_connections=settings.engine_max_connections,
        keepalive_s=settings.engine_keepalive_s,
        api_key=settings.engine_api_key.get_secret_value() if settings.engine_api_key else None,
    )
    engine = VLLMEngine(session, settings.engine_base_url, retry_after_s=settings.retry_after_s)
    catalog = ModelCatalog(engine, retry_after_s=settings.retry_after_s)
    store = await asyncio.to_thread(AdapterStore, settings.adapter_store_dir)
    registry = AdapterRegistry(
        store,
        engine,
        base_model=_BaseModelFacts(catalog, settings, model_dir[0] if model_dir else None),
        max_rank=settings.max_lora_rank,
        retry_after_s=settings.retry_after_s,
        resolver=settings.lora_resolver,
    )
    app.state.catalog = catalog
    app.state.adapters = registry
    supervisor: EngineSupervisor | None = None
    background: asyncio.Task[None] | None = None
    router_follow: asyncio.Task[None] | None = None
    traffic: TrafficLog | None = None
    if model_dir is not None:

        def engine_restarting() -> None:
            metrics.engine_restarts.inc()
            registry.engine_lost()

        supervisor = EngineSupervisor(
            vllm_command(settings, *model_dir),
            env=vllm_environment(settings),
            ready_url=f"{settings.engine_base_url}/v1/models",
            log_file=settings.engine_log_file,
            start_timeout_s=settings.engine_start_timeout_s,
            on_restart=engine_restarting,
        )
        supervisor.add_ready_hook(catalog.refresh)
        supervisor.add_ready_hook(registry.reconcile)
        # The gateway answers /health at once; /ready and chat say 503 until the engine is up.
        supervisor.start()
    else:
        background = asyncio.create_task(_reconcile_when_reachable(catalog, registry, settings.retry_after_s))
    store_sync = (
        asyncio.create_task(_follow_store(registry, settings.adapter_sync_s))
        if settings.lora_resolver
        else None
    )
    app.state.supervisor = supervisor
    try:
        # Loading the embedder and opening the index take seconds: the engine is already
        # starting meanwhile.
        knowledge = await asyncio.to_thread(Knowledge.from_settings, settings)
        app.state.knowledge = knowledge
        app.state.embeddings = EmbeddingService(knowledge.embedder, metrics)
        knowledge.start_warm_up()
        learner = RouteLearner(
            knowledge.embedder,
            await asyncio.to_thread(RouterStore, settings.adapter_store_dir / ROUTER_DIR),
            general_chat_prompts(),
            FitSettings(base_recall=settings.router_base_recall),
        )
        # The stored classifier serves at once; a refit, if the adapters changed, follows.
        await learner.load()
        if settings.traffic_log is not None:
            traffic = await asyncio.to_thread(
                TrafficLog,
                settings.traffic_log,
                max_bytes=settings.traffic_log_max_bytes,
                on_drop=metrics.traffic_log_dropped.inc,
            )
        app.state.router = Router(
            knowledge.embedder,
            knowledge.retriever,
            registry,
            learner,
            top_k=settings.rag_top_k,
            rag_threshold=settings.rag_threshold,
            retry_after_s=settings.retry_after_s,
            traffic=traffic,
        )
        router_follow = asyncio.create_task(
            _follow_router(app.state.router, registry, settings.adapter_sync_s)
        )
        app.state.chat = ChatService(
            engine,
            catalog,
            RequestLimits.from_settings(settings),
            metrics,
            registry,
            app.state.router,
            attach_citations=settings.rag_citations == "attach",
            answer_tokens=settings.rag_answer_tokens,
            screen_instructions=settings.rag_screen_instructions,
            redact_secrets=settings.redact_system_secrets,
        )
        app.state.completions = CompletionService(
            engine, catalog, RequestLimits.from_settings(settings), metrics, registry
        )
        yield
    finally:
        for task in (background, store_sync, router_follow):
            if task is not None:
                task.cancel()
        if supervisor is not None:
            await supervisor.stop()
        if traffic is not None:  # after the drain: the last requests' lines are written
            await asyncio.to_thread(traffic.close)
        await session.close()


async def _reconcile_when_reachable(catalog: ModelCatalog, registry: AdapterRegistry, every_s: int) -> None:
    """An external engine: load the store's adapters into it as soon as it answers.

    (Its restarts are not seen from here; the filesystem resolver, configured in the deploy
    files, reloads adapters by name from the shared store on first use.)"""
    while True:
        try:
            await catalog.refresh()
            await registry.reconcile()
            return
        except APIError as exc:
            logger.warning("engine not reconciled yet (%s); retrying in %ss", exc.message, every_s)
            await asyncio.sleep(every_s)


async def _follow_store(registry: AdapterRegistry, every_s: float) -> None:
    """With the resolver, several gateways may share the store: pick up what the others
    registered, replaced or deleted."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await registry.sync()
        except OSError as exc:  # shared storage hiccups; the next round tries again
            logger.warning("cannot read the adapter store: %s", exc)


async def _follow_router(router: Router, registry: AdapterRegistry, every_s: float) -> None:
    """Keep the classifier in line with the adapters even without traffic, and take the
    versions other gateways on the same store publish."""
    while True:
        try:
            await router.sync()
            await router.learner.follow(registry.manifests)
        except OSError as exc:  # shared storage hiccups; the next round tries again
            logger.warning("cannot read the router store: %s", exc)
        await asyncio.sleep(every_s)


class _BaseModelFacts:
    """What adapters are validated against, learnt once the engine has said its model id."""

    def __init__(self, catalog: ModelCatalog, settings: Settings, local_dir: Path | None) -> None:
        self._catalog = catalog
        self._dir = local_dir or settings.base_model_dir
        self._hf_id = settings.base_model_hf_id or (
            HF_ID if local_dir and settings.model_dir is None else None
        )
        self._known: BaseModelInfo | None = None

    def __call__(self) -> BaseModelInfo | None:
        served, root = self._catalog.base_model, self._catalog.base_root
        if served is None:
            return None
        if self._known is None or (self._known.served_id, self._known.engine_model) != (served, root):
            if self._dir is not None:
                known = BaseModelInfo.from_model_dir(self._dir, served, self._hf_id)
            else:
                known = BaseModelInfo(served, frozenset({served} | ({self._hf_id} if self._hf_id else set())))
            # An adapter made for what the engine loaded (a hub id, say) is made for this base.
            aliases = known.aliases | ({root} if root else set())
            self._known = dataclasses.replace(known, aliases=aliases, engine_model=root)
        return self._known


def _local_model(settings: Settings) -> tuple[Path, str]:
    """The local engine's model directory and served name; UnsafeModelError before the engine
    ever sees a directory holding code, pickles or no safetensors (even without ``serve``)."""
    if settings.model_dir is not None:
        check_model_dir(settings.model_dir)
        return settings.model_dir, settings.served_model_name or settings.model_dir.name
    bundled = ensure_bundled_model(settings.cache_dir)
    check_model_dir(bundled.path)
    return bundled.path, settings.served_model_name or SERVED_NAME
