"""The FastAPI application: the API routes over one engine and one adapter store.

`create_app(settings)` is what `vbserve serve` runs: its lifespan loads the base model
(converting and caching the default GGUF on first start), opens the store named by
`settings.store_url` and starts the engine. Tests inject a small model, its tokenizer
and a store instead; the app then owns only the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapter_store.store import AdapterStore, open_store
from server.api import Services, install_error_handlers, router
from server.engine import build_engine
from server.engine.model_loader import DEFAULT_NAME, load_model, resolve_device, resolve_dtype
from server.metrics import Metrics, MetricsMiddleware
from server.settings import Settings, get_settings
from server.tenancy import TenantRegistry, open_tenant_registry

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    store: AdapterStore | None = None,
    tenants: TenantRegistry | None = None,
) -> FastAPI:
    """Build the app. `model` and `tokenizer` come together or not at all; an injected
    store or tenant registry stays the caller's to close. The registry is used only when
    `settings.admin_key` is set (multi-tenant); by default it is opened beside the store."""
    settings = settings or get_settings()
    if (model is None) != (tokenizer is None):
        raise ValueError("pass model and tokenizer together, or neither")
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading takes seconds (a minute on first start); a worker thread keeps the
        # event loop free meanwhile.
        services = await asyncio.to_thread(_start, settings, model, tokenizer, store, metrics)
        if settings.admin_key is not None:
            services.tenants = tenants or open_tenant_registry(settings)
        app.state.services = services
        log.info("ready: serving %s", services.model_name)
        try:
            yield
        finally:
            app.state.services = None
            services.engine.shutdown()
            if store is None:
                services.store.close()
            if tenants is None and services.tenants is not None:
                services.tenants.close()

    app = FastAPI(
        title="vbserve",
        summary="Multi-tenant serving of VB-LoRA adapters over one base LLM",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.services = None
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_error_handlers(app)
    app.include_router(router)
    return app


def _start(
    settings: Settings,
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    store: AdapterStore | None,
    metrics: Metrics,
) -> Services:
    own_store = store is None
    if store is None:
        store = open_store(settings.store_url)
        log.info("adapter store: %r", store)
    try:
        if model is None or tokenizer is None:
            device = resolve_device(settings.device)
            dtype = resolve_dtype(settings.dtype, device)
            log.info("loading model %s on %s (%s)...", settings.model or DEFAULT_NAME, device, dtype)
            start = time.perf_counter()
            loaded = load_model(
                settings.model,
                gguf_file=settings.gguf_file,
                cache_dir=settings.model_cache_dir,
                device=device,
                dtype=dtype,
            )
            model, tokenizer, name = loaded.model, loaded.tokenizer, loaded.name
            log.info("model loaded in %.1f s", time.perf_counter() - start)
        else:
            name = settings.model or model.name_or_path or "base"
        engine = build_engine(
            model, tokenizer, store, settings, on_adapter_event=metrics.on_adapter_event, on_step=metrics.on_step
        )
    except BaseException:
        if own_store:
            store.close()
        raise
    if engine.adapters is not None:
        metrics.watch_cached_bytes(lambda: engine.adapters.cached_bytes)
    return Services(
        settings=settings,
        engine=engine,
        store=store,
        tokenizer=tokenizer,
        model_name=settings.served_model_name or name,
        metrics=metrics,
    )
