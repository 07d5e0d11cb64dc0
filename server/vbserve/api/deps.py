"""What routes receive through FastAPI dependencies: the running services, the caller's
tenant and its limits.

Routes never reach for globals; the app's lifespan puts one `Services` on `app.state`,
and tests build apps with their own model, tokenizer and store.

Authentication: with `VBSERVE_ADMIN_KEY` unset the server is single-tenant and every
request acts for "default". With it set, every tenant route needs `Authorization: Bearer
<tenant key>` (401 when missing, malformed, unknown or revoked: one message for all, so
a caller learns nothing about which keys exist), and `/v1/admin` needs the admin key.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool
from transformers import PreTrainedTokenizerBase

from vbserve.engine import Engine
from vbserve.metrics import Metrics
from vbserve.model import BaseModelSpec
from vbserve.settings import Settings
from vbserve.tenancy import ConcurrencyLimiter, Limits, RateLimiter, TenantLimits, TenantRegistry, effective_limits
from vbserve.tenancy.keys import secret_matches
from vbserve.training.files import FileStore
from vbserve.training.jobs import JobQueue
from vbserve_store.store import AdapterStore, StoreQuota

from .errors import APIError
from .tokenizing import TokenizerPool
from .tool_calls import ChatTemplate, read_chat_template

# Training uploads that may wait for the one dataset-checking thread before a 429.
DATASET_CHECKS_WAITING = 4

DEFAULT_TENANT = "default"


@dataclass
class Services:
    settings: Settings
    engine: Engine
    store: AdapterStore
    tokenizer: PreTrainedTokenizerBase
    base_model: BaseModelSpec  # the one description of the model the engine serves
    metrics: Metrics
    jobs: JobQueue | None = None  # None: fine-tuning disabled
    files: FileStore | None = None  # uploaded training files, beside the queue; None with it
    tenants: TenantRegistry | None = None  # None: single-tenant (no admin key configured)
    # In this process by default; the app's lifespan puts the one beside the registry here
    # (`open_rate_limiter`: shared by every replica when that is Redis).
    rates: RateLimiter = field(default_factory=RateLimiter)
    generations: ConcurrencyLimiter = field(default_factory=ConcurrencyLimiter)
    started: float = field(default_factory=time.time)
    chat_template: ChatTemplate = field(init=False)  # what the tokenizer's template does with tools

    def __post_init__(self) -> None:
        self.chat_template = read_chat_template(self.tokenizer)

    @property
    def model_name(self) -> str:
        """What clients pass as `model` for the base model without an adapter."""
        return self.base_model.name

    @cached_property
    def tokenizing(self) -> TokenizerPool:
        """Where prompts are tokenized (made on first use, on the event loop)."""
        return TokenizerPool(self.tokenizer, self.settings.tokenizer_threads, max_waiting=self.settings.max_queue)

    @cached_property
    def dataset_checks(self) -> TokenizerPool:
        """Where uploaded training files are checked and tokenized, before a job is queued or
        a file stored: one thread at low priority, a few uploads waiting (then 429). Tokenizing a 32 MB
        file takes minutes of CPU; in the default thread pool three such uploads at once
        slowed another tenant's completions 4x (12 s instead of 2.6 s, measured)."""
        return TokenizerPool(self.tokenizer, 1, max_waiting=DATASET_CHECKS_WAITING, nice=10, what="training files")


@dataclass(frozen=True)
class Caller:
    """Who a request acts for. `incarnation`: the tenant's, as it authenticated (None in
    single-tenant mode, where no tenant is ever deleted)."""

    tenant: str
    limits: Limits
    incarnation: str | None = None

    @property
    def quota(self) -> StoreQuota:
        return self.limits.store_quota


def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:  # only reachable before the lifespan finished starting
        raise APIError("unavailable", "the server is still starting")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

_BAD_KEY = "missing, malformed, unknown or revoked API key: send `Authorization: Bearer <key>`"


def bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError("unauthorized", _BAD_KEY, "Authorization")
    return token.strip()


def is_admin_key(token: str, settings: Settings) -> bool:
    return settings.admin_key is not None and secret_matches(token, settings.admin_key.get_secret_value())


async def authenticate(request: Request, services: ServicesDep) -> Caller:
    """The caller's tenant (from its key) and limits; then one request of its rate."""
    settings = services.settings
    if services.tenants is None:
        caller = Caller(DEFAULT_TENANT, effective_limits(TenantLimits(), settings))
    else:
        token = bearer_token(request)
        if is_admin_key(token, settings):
            raise APIError("forbidden", "the admin key manages tenants; act as a tenant with its key", "Authorization")
        tenant = await run_in_threadpool(services.tenants.authenticate, token)
        if tenant is None:
            raise APIError("unauthorized", _BAD_KEY, "Authorization")
        caller = Caller(tenant.name, effective_limits(tenant.limits, settings), tenant.incarnation)
    request.state.tenant = caller.tenant  # for the request log
    if caller.limits.requests_per_s is not None:
        # A thread: on Redis this is a round trip (a fallback to the local bucket if down).
        wait = await run_in_threadpool(services.rates.acquire, caller.tenant, caller.limits.requests_per_s)
        if wait is not None:
            raise APIError(
                "rate_limited",
                f"more than {caller.limits.requests_per_s:g} requests per second; retry in {wait:.2f} s",
                "Authorization",
            )
    return caller


CallerDep = Annotated[Caller, Depends(authenticate)]


def still_current(services: Services, caller: Caller) -> bool:
    """After a write: whether the caller's tenant still exists as the incarnation it
    authenticated as. A write that finds it deleted undoes itself and raises
    `tenant_deleted()` (see `vbserve.tenancy.deletion`). Blocking: call it in a thread."""
    if services.tenants is None or caller.incarnation is None:
        return True
    return services.tenants.is_current(caller.tenant, caller.incarnation)


def tenant_deleted() -> APIError:
    return APIError(
        "unauthorized", "the tenant was deleted while this request ran; nothing was stored", "Authorization"
    )


def current_tenant(caller: CallerDep) -> str:
    """The tenant a request acts for; every store and queue access is scoped by it."""
    return caller.tenant


TenantDep = Annotated[str, Depends(current_tenant)]


class HeldGenerations:
    """The tenant's concurrent generations that one request holds until its response ends."""

    def __init__(self, services: Services, caller: Caller) -> None:
        self._services = services
        self._caller = caller
        self.count = 0

    def hold(self, count: int, field: str) -> None:
        """Hold `count` in all: a request for OpenAI's `n` choices runs n generations, each
        a batch row, so it counts n towards the tenant's limit (all taken or none)."""
        limit = self._caller.limits.max_concurrent_generations
        if limit is not None and count > limit:
            raise APIError("invalid_request", f"the tenant may run at most {limit} generations at once", field)
        extra = count - self.count
        if extra > 0 and not self._services.generations.acquire(self._caller.tenant, limit, extra):
            raise APIError(
                "rate_limited", f"the tenant already runs its limit of {limit} concurrent generations", field
            )
        self.count = max(self.count, count)

    def release(self) -> None:
        if self.count:
            self._services.generations.release(self._caller.tenant, self.count)
            self.count = 0


async def generation_slot(caller: CallerDep, services: ServicesDep) -> AsyncIterator[HeldGenerations]:
    """Hold one of the tenant's concurrent generations (more with `HeldGenerations.hold`) for
    the whole response, streamed or not (FastAPI runs the code after `yield` once the
    response is sent or abandoned)."""
    held = HeldGenerations(services, caller)
    held.hold(1, "model")
    try:
        yield held
    finally:
        held.release()


GenerationSlot = Depends(generation_slot)
GenerationsDep = Annotated[HeldGenerations, GenerationSlot]


async def require_admin(request: Request, services: ServicesDep) -> TenantRegistry:
    """The registry, for a caller holding the admin key."""
    if services.tenants is None:
        raise APIError("forbidden", "the admin API is off: the server runs single-tenant (no VBSERVE_ADMIN_KEY)")
    token = bearer_token(request)
    if is_admin_key(token, services.settings):
        request.state.tenant = "<admin>"
        return services.tenants
    if await run_in_threadpool(services.tenants.authenticate, token) is not None:
        raise APIError("forbidden", "this route needs the admin key, not a tenant's", "Authorization")
    raise APIError("unauthorized", _BAD_KEY, "Authorization")


AdminDep = Annotated[TenantRegistry, Depends(require_admin)]


async def metrics_access(request: Request, services: ServicesDep) -> None:
    """`/metrics` is open, unless `VBSERVE_METRICS_REQUIRE_ADMIN_KEY`: then it takes the
    admin key only (401 without it, 403 with a tenant's key), as the admin API does."""
    if services.settings.metrics_require_admin_key:
        await require_admin(request, services)


MetricsAccess = Depends(metrics_access)
