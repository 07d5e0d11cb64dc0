"""The FastAPI application: the API routes over one engine and one adapter store.

`create_app(settings)` is what `vbserve serve` runs: its lifespan opens what the process
runs on (`vbserve.services.open_services`: the base model, converted and cached from the
default GGUF on first start, the store named by `settings.store_url`, the fine-tuning job
queue beside it or at `settings.jobs_url`, the tenant registry), starts the engine and,
unless `embedded_worker` is off, a training worker in a child process (`WorkerProcess`:
loads its own model, opens its own store and queue; if it dies, the API keeps serving and
starts another). Tests inject a small model, its tokenizer, a store and a job queue
instead; the app then owns only the engine and the worker, which runs in a thread over a
copy of the injected model (a child could not load it).
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager, closing

from fastapi import FastAPI
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vbserve.api import Services, router
from vbserve.api.middleware import install_middleware
from vbserve.engine import build_engine
from vbserve.metrics import Metrics
from vbserve.services import open_services
from vbserve.settings import Settings, get_settings
from vbserve.tenancy import TenantRegistry, open_rate_limiter
from vbserve.training import JobQueue
from vbserve.ui import mount_console
from vbserve.worker_host import EmbeddedWorker, WorkerProcess, build_worker, start_embedded_worker
from vbserve_store import AdapterError
from vbserve_store.store import AdapterStore

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
        # Everything the app opens or starts, closed in reverse order: the training worker
        # first (its job goes back to the queue before the queue closes), then the engine,
        # then the backends. Also when the start-up fails halfway.
        opened = ExitStack()
        collector = None
        try:
            # Loading takes seconds (a minute on first start); a worker thread keeps the
            # event loop free meanwhile.
            injected = {"model": model, "tokenizer": tokenizer, "store": store, "jobs": jobs, "tenants": tenants}
            services, worker = await asyncio.to_thread(_start, opened, settings, metrics, **injected)
            app.state.training_worker = worker
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
            yield
        finally:
            if collector is not None:
                collector.cancel()
            app.state.services = None
            # Off the event loop: stopping the worker waits for its training step.
            await asyncio.to_thread(opened.close)
            app.state.training_worker = None

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
    opened: ExitStack,
    settings: Settings,
    metrics: Metrics,
    *,
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    store: AdapterStore | None,
    jobs: JobQueue | None,
    tenants: TenantRegistry | None,
) -> tuple[Services, EmbeddedWorker | WorkerProcess | None]:
    """Open the services, start the engine and the training worker; each goes on `opened`."""
    runtime = opened.enter_context(
        open_services(settings, model=model, tokenizer=tokenizer, store=store, jobs=jobs, tenants=tenants)
    )
    embedded = runtime.jobs is not None and settings.embedded_worker
    # Copied before the engine wraps the model's layers: training hooks a plain model, and
    # the serving model must never carry training hooks. A loaded model needs no copy: the
    # worker's child process loads its own.
    training_copy = copy.deepcopy((runtime.model, runtime.tokenizer)) if embedded and model is not None else None
    engine = build_engine(
        runtime.model,
        runtime.tokenizer,
        runtime.base_model,
        runtime.store,
        settings,
        on_adapter_event=metrics.on_adapter_event,
        on_step=metrics.on_step,
    )
    opened.callback(engine.shutdown)
    if engine.adapters is not None:
        metrics.watch_cached_bytes(lambda: engine.adapters.cached_bytes)
    runtime.store.on_latency = metrics.on_store_operation
    rates = opened.enter_context(closing(open_rate_limiter(settings)))  # Redis: shared by replicas
    services = Services(
        settings=settings,
        engine=engine,
        store=runtime.store,
        tokenizer=runtime.tokenizer,
        base_model=runtime.base_model,
        metrics=metrics,
        jobs=runtime.jobs,
        files=runtime.files,
        tenants=runtime.tenants,
        rates=rates,
    )
    if not embedded:
        return services, None
    if training_copy is None:
        worker: EmbeddedWorker | WorkerProcess = WorkerProcess(settings)
    else:
        worker = start_embedded_worker(settings, build_worker(runtime, *training_copy))
    opened.callback(worker.stop, WORKER_STOP_TIMEOUT_S)
    return services, worker
