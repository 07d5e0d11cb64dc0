"""Tenancy: who is calling (API keys -> tenants) and what they may use (per-tenant limits).

With no admin key configured the server is single-tenant: every request acts for the
tenant "default" and no registry is opened.
"""

from __future__ import annotations

from server.settings import Settings

from .limits import ConcurrencyLimiter, Limits, RateLimiter
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
    "RedisTenantRegistry",
    "RegistryUnavailableError",
    "SQLiteTenantRegistry",
    "TenancyError",
    "Tenant",
    "TenantExistsError",
    "TenantLimits",
    "TenantNotFoundError",
    "TenantRegistry",
    "effective_limits",
    "open_tenant_registry",
]


def open_tenant_registry(settings: Settings) -> TenantRegistry:
    """The registry beside the adapter store: the same Redis, or `tenants.db` beside the
    SQLite store."""
    url = settings.url_beside_store("tenants.db")
    pepper = settings.key_pepper.get_secret_value().encode() if settings.key_pepper else None
    if url.startswith(("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")):
        return RedisTenantRegistry.from_url(url, prefix=settings.redis_prefix, pepper=pepper)
    return SQLiteTenantRegistry(url.removeprefix("sqlite:///"), pepper=pepper)


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
