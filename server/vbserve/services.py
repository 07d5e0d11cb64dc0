"""One start-up for every vbserve process: `open_services` loads the base model, describes
it once (`BaseModelSpec`), and opens the adapter store, the job queue and the tenant
registry, for `vbserve serve` (the app's lifespan, `vbserve.app`) and `vbserve worker`
(`vbserve.worker_host.run_worker`) alike.

What it opens it also closes, in reverse order, when the `with` block ends or a later step
of the start-up fails (an `ExitStack` owns them); what the caller passes in (tests inject
a small model, a store, a queue, a registry) stays the caller's to close.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vbserve.model import DEFAULT_NAME, BaseModelSpec, describe_model, load_model, resolve_device, resolve_dtype
from vbserve.settings import Settings
from vbserve.tenancy import TenantRegistry, open_tenant_registry
from vbserve.training import JobQueue, jobs_url, open_job_queue, queue_limits
from vbserve.training.files import FileStore, open_file_store
from vbserve_store.store import AdapterStore, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """What one process runs on, open while `open_services`' block runs."""

    settings: Settings
    model: PreTrainedModel  # plain: the engine wraps it for serving, the trainer hooks it
    tokenizer: PreTrainedTokenizerBase
    base_model: BaseModelSpec  # `model` described before anything wrapped it
    store: AdapterStore
    jobs: JobQueue | None  # None: fine-tuning is off (serving only)
    files: FileStore | None  # uploaded training files, beside a queue opened for serving; else None
    tenants: TenantRegistry | None  # None: a single-tenant server (no admin key)


@contextmanager
def open_services(
    settings: Settings,
    *,
    for_training: bool = False,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    store: AdapterStore | None = None,
    jobs: JobQueue | None = None,
    tenants: TenantRegistry | None = None,
) -> Iterator[Runtime]:
    """Open what a process needs, then yield it; close what was opened here on exit.

    Serving (`for_training` false): the model in its serving dtype, the job queue only
    when fine-tuning is on (and the file store beside a queue opened here), the tenant
    registry only on a multi-tenant server (`settings.admin_key`; an injected one is
    ignored without it). A training worker: the model in its training dtype, the queue
    (`VBSERVE_TRAINING_ENABLED` turns off the API's fine-tuning routes; a worker runs
    whatever is queued) and always the registry, whose tenants' quotas bound what it
    publishes.

    `model` and `tokenizer` come together or not at all. With an injected store there is
    no store URL to put the queue beside: the queue then needs `jobs` or an explicit
    `settings.jobs_url`, and fine-tuning is off without either."""
    store_injected = store is not None
    with ExitStack() as opened:
        if store is None:
            # The prefix is the workers' too: adapters they publish must be the ones served.
            store = opened.enter_context(closing(open_store(settings.store_url, redis_prefix=settings.redis_prefix)))
            log.info("adapter store: %r", store)
        files = None
        if jobs is None:
            jobs = _open_jobs(settings, store_injected=store_injected, for_training=for_training)
            if jobs is not None:
                opened.callback(jobs.close)
                if not for_training:
                    # Uploaded training files live beside a queue opened here (an injected
                    # queue names no location to put them): `POST /v1/files` is 503 without.
                    files = opened.enter_context(closing(open_file_store(settings)))
        if settings.admin_key is None and not for_training:
            tenants = None
        elif tenants is None:
            tenants = opened.enter_context(closing(open_tenant_registry(settings)))
        if model is None or tokenizer is None:
            model, tokenizer, name = _load(settings, for_training=for_training)
        else:
            name = settings.model
        base_model = describe_model(model, tokenizer, settings, name=name)
        yield Runtime(settings, model, tokenizer, base_model, store, jobs, files, tenants)


def _load(settings: Settings, *, for_training: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, training=for_training)
    log.info("loading model %s on %s (%s)...", settings.model or DEFAULT_NAME, device, dtype)
    start = time.perf_counter()
    loaded = load_model(
        settings.model, gguf_file=settings.gguf_file, cache_dir=settings.model_cache_dir, device=device, dtype=dtype
    )
    log.info("model loaded in %.1f s", time.perf_counter() - start)
    return loaded.model, loaded.tokenizer, loaded.name


def _open_jobs(settings: Settings, *, store_injected: bool, for_training: bool) -> JobQueue | None:
    if not for_training:
        if not settings.training_enabled:
            log.info("fine-tuning disabled (VBSERVE_TRAINING_ENABLED=false)")
            return None
        if store_injected and not settings.jobs_url:
            return None
    jobs = open_job_queue(jobs_url(settings), redis_prefix=settings.redis_prefix, limits=queue_limits(settings))
    log.info("job queue: %r", jobs)
    return jobs
