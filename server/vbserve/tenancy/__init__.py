"""Tenancy: who is calling (API keys -> tenants) and what they may use (per-tenant limits).

With no admin key configured the server is single-tenant: every request acts for the
tenant "default" and no registry is opened. Request rates are limited either way, by the
limiter `open_rate_limiter` picks (shared by replicas on Redis, see `limits`).
"""

from __future__ import annotations

import contextlib

from vbserve.backends import parse_backend_url
from vbserve.settings import Settings
from vbserve_store.store import StoreQuota

from .deletion import delete_tenant, withdraw_adapter
from .limits import ConcurrencyLimiter, Limits, RateLimiter, RedisRateLimiter
from .registry import (
    ApiKey,
    RedisTenantRegistry,
    RegistryUnavailableError,
    SQLiteTenantRegistry,
    TenancyError,
    Tenant,
    TenantExistsError,
    TenantLimits,
    TenantNotFoundError,
    TenantRegistry,
)

__all__ = [
    "ApiKey",
    "ConcurrencyLimiter",
    "Limits",
    "RateLimiter",
    "RedisRateLimiter",
    "RedisTenantRegistry",
    "RegistryUnavailableError",
    "SQLiteTenantRegistry",
    "TenancyError",
    "Tenant",
    "TenantExistsError",
    "TenantLimits",
    "TenantNotFoundError",
    "TenantRegistry",
    "delete_tenant",
    "effective_limits",
    "open_rate_limiter",
    "open_tenant_registry",
    "store_quota",
    "withdraw_adapter",
]


def open_tenant_registry(settings: Settings) -> TenantRegistry:
    """The registry beside the adapter store: the same Redis, or `tenants.db` beside the
    SQLite store."""
    where = parse_backend_url(settings.url_beside_store("tenants.db"), "store_url")
    pepper = settings.key_pepper.get_secret_value().encode() if settings.key_pepper else None
    if where.kind == "redis":
        return RedisTenantRegistry.from_url(where.url, prefix=settings.redis_prefix, pepper=pepper)
    return SQLiteTenantRegistry(where.path, pepper=pepper)


def open_rate_limiter(settings: Settings) -> RateLimiter:
    """The request-rate limiter beside the tenant registry: token buckets in the same Redis
    (same prefix), shared by every replica, or in this process on the SQLite deployment.
    The caller closes it. A cluster URL connects at once (raises if no node answers)."""
    where = parse_backend_url(settings.url_beside_store("tenants.db"), "store_url")
    if where.kind == "redis":
        return RedisRateLimiter.from_url(where.url, prefix=settings.redis_prefix)
    return RateLimiter()


def effective_limits(own: TenantLimits, settings: Settings) -> Limits:
    """A tenant's own limits, each falling back to the server's default."""

    def pick(value: float | None, default: float | None) -> float | None:
        return default if value is None else value

    return Limits(
        max_adapters=pick(own.max_adapters, settings.tenant_max_adapters),
        max_adapter_bytes=pick(own.max_adapter_bytes, settings.tenant_max_adapter_bytes),
        requests_per_s=pick(own.requests_per_s, settings.tenant_requests_per_s),
        max_concurrent_generations=pick(own.max_concurrent_generations, settings.tenant_max_concurrent_generations),
    )


def store_quota(settings: Settings, registry: TenantRegistry | None, tenant: str) -> StoreQuota:
    """The store quota a write of `tenant` is checked against: its own limits in the
    registry, each falling back to the server's default; the defaults alone in
    single-tenant mode (no registry) or for a tenant no longer in it (being deleted: its
    write is withdrawn anyway, see `deletion`)."""
    own = TenantLimits()
    if registry is not None:
        with contextlib.suppress(TenantNotFoundError):
            own = registry.get_tenant(tenant).limits
    return effective_limits(own, settings).store_quota
