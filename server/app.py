"""The FastAPI application: the API routes over one engine and one adapter store.

`create_app(settings)` is what `vbserve serve` runs: its lifespan loads the base model
(converting and caching the default GGUF on first start), opens the store named by
`settings.store_url` and the fine-tuning job queue (`settings.jobs_url`, by default beside
the store), starts the engine and, unless `embedded_worker` is off, a training worker in a
child process (`WorkerProcess`: loads its own model, opens its own store and queue; if it
dies, the API keeps serving and starts another). Tests inject a small model, its
tokenizer, a store and a job queue instead; the app then owns only the engine and the
worker, which runs in a thread over a copy of the injected model (a child could not load
it).
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapter_store import AdapterError
from adapter_store.store import AdapterStore, open_store
from server.api import Services, router
from server.api.middleware import install_middleware
from server.engine import build_engine
from server.engine.model_loader import DEFAULT_NAME, load_model, resolve_device, resolve_dtype
from server.metrics import Metrics
from server.settings import Settings, get_settings
from server.tenancy import TenantRegistry, open_rate_limiter, open_tenant_registry, store_quota
from server.training import JobQueue, TrainingLimits, jobs_url, open_job_queue, queue_limits
from server.training.files import FileStore, open_file_store
from server.training.worker import EmbeddedWorker, Worker, WorkerProcess, start_embedded_worker
from server.ui import mount_console

log = logging.getLogger(__name__)

# How long shutdown waits for the embedded worker to finish its training step.
WORKER_STOP_TIMEOUT_S = 30.0


def create_app(
    settings: Settings | None = None,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    store: AdapterStore | None = None,
    tenants: TenantRegistry | None = None,
    jobs: JobQueue | None = None,
) -> FastAPI:
    """Build the app. `model` and `tokenizer` come together or not at all; an injected
    store or tenant registry stays the caller's to close. The registry is used only when
    `settings.admin_key` is set (multi-tenant); by default it is opened beside the store.
    An injected job queue is the caller's to close too. With an injected store there is no
    store URL to put the job queue beside: fine-tuning then needs `jobs` or an explicit
    `settings.jobs_url`, and is disabled without either."""
    settings = settings or get_settings()
    if (model is None) != (tokenizer is None):
        raise ValueError("pass model and tokenizer together, or neither")
    metrics = Metrics(max_lora=settings.max_adapter_slots, adapter_names=settings.metrics_adapter_names)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading takes seconds (a minute on first start); a worker thread keeps the
        # event loop free meanwhile.
        services, worker = await asyncio.to_thread(_start, settings, model, tokenizer, store, jobs, metrics)
        app.state.training_worker = worker
        if settings.admin_key is not None:
            services.tenants = tenants or open_tenant_registry(settings)
        services.rates = await asyncio.to_thread(open_rate_limiter, settings)  # Redis: shared by replicas
        app.state.services = services
        if model is None:
            # This process loaded the model itself (`vbserve serve`): move everything alive
            # now out of the garbage collector's reach. A full collection walks every object
            # (torch, transformers, the tokenizer) with all threads stopped: 0.2-0.4 s pauses
            # in which no route answers; after the freeze /healthz peaked at 0.14 s instead
            # of 0.73 s beside four 1 MB chats (measured in test_tokenizing's process). Apps built around an
            # injected model (tests, many per process) skip it: frozen objects are never
            # collected.
            gc.collect()
            gc.freeze()
        log.info("ready: serving %s", services.model_name)
        collector = asyncio.create_task(_collect_store_garbage(services.store, settings.store_gc_interval_s))
        try:
            yield
        finally:
            collector.cancel()
            app.state.services = None
            if worker is not None:  # before the queue closes; its job goes back to the queue
                await asyncio.to_thread(worker.stop, WORKER_STOP_TIMEOUT_S)
            app.state.training_worker = None
            services.engine.shutdown()
            if jobs is None and services.jobs is not None:
                services.jobs.close()
            if services.files is not None:
                services.files.close()
            if store is None:
                services.store.close()
            if tenants is None and services.tenants is not None:
                services.tenants.close()
            services.rates.close()

    app = FastAPI(
        title="vbserve",
        summary="Multi-tenant serving of VB-LoRA adapters over one base LLM",
        lifespan=lifespan,
    )
    app.state.settings = settings  # each route's body limit is read from it (`api.body_limits`)
    app.state.metrics = metrics
    app.state.services = None
    app.state.training_worker = None  # the embedded worker, while the app runs
    install_middleware(app, metrics)
    app.include_router(router)
    mount_console(app)
    return app


async def _collect_store_garbage(store: AdapterStore, interval_s: float) -> None:
    """Every `interval_s`, drop what writers that died mid-put left in the store (the Redis
    store's leaked bank references; see `RedisAdapterStore.collect_garbage`). Safe from
    every replica at once; a store without leftovers has no `collect_garbage`."""
    collect = getattr(store, "collect_garbage", None)
    if collect is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        try:
            dropped = await asyncio.to_thread(collect)
        except AdapterError as exc:  # the store is down: try again next time
            log.warning("store garbage collection failed: %s", exc)
        else:
            if dropped:
                log.info("store garbage collection dropped %d leaked bank references", dropped)


def _start(
    settings: Settings,
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    store: AdapterStore | None,
    jobs: JobQueue | None,
    metrics: Metrics,
) -> tuple[Services, EmbeddedWorker | WorkerProcess | None]:
    own_store, own_jobs, own_model = store is None, jobs is None, model is None
    files: FileStore | None = None
    if store is None:
        # The prefix is the workers' too: adapters they publish must be the ones served.
        store = open_store(settings.store_url, redis_prefix=settings.redis_prefix)
        log.info("adapter store: %r", store)
    try:
        if jobs is None:
            jobs = _open_jobs(settings, store_injected=not own_store)
            # Uploaded training files live beside a queue the app opened (an injected
            # queue names no location to put them): `POST /v1/files` is 503 without.
            files = None if jobs is None else open_file_store(settings)
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
        # Copied before the engine wraps the model's layers: training hooks a plain
        # model, and the serving model must never carry training hooks.
        embedded = jobs is not None and settings.embedded_worker
        training_copy = copy.deepcopy((model, tokenizer)) if embedded and not own_model else None
        engine = build_engine(
            model, tokenizer, store, settings, on_adapter_event=metrics.on_adapter_event, on_step=metrics.on_step
        )
    except BaseException:
        if own_jobs and jobs is not None:
            jobs.close()
        if files is not None:
            files.close()
        if own_store:
            store.close()
        raise
    if engine.adapters is not None:
        metrics.watch_cached_bytes(lambda: engine.adapters.cached_bytes)
    store.on_latency = metrics.on_store_operation
    services = Services(
        settings=settings,
        engine=engine,
        store=store,
        tokenizer=tokenizer,
        model_name=settings.served_model_name or name,
        metrics=metrics,
        jobs=jobs,
        files=files,
    )
    if not embedded:
        return services, None
    if training_copy is None:
        return services, WorkerProcess(settings)
    worker = Worker(
        jobs,
        store,
        *training_copy,
        limits=TrainingLimits.from_settings(settings),
        base_model=name,
        # services.tenants is set by the lifespan once this returns; read at each publish.
        quota_of=lambda tenant: store_quota(settings, services.tenants, tenant),
    )
    return services, start_embedded_worker(settings, worker)


def _open_jobs(settings: Settings, *, store_injected: bool) -> JobQueue | None:
    if not settings.training_enabled:
        log.info("fine-tuning disabled (VBSERVE_TRAINING_ENABLED=false)")
        return None
    if store_injected and not settings.jobs_url:
        return None
    jobs = open_job_queue(jobs_url(settings), redis_prefix=settings.redis_prefix, limits=queue_limits(settings))
    log.info("job queue: %r", jobs)
    return jobs
