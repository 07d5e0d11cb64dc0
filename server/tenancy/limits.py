"""Per-tenant request-rate and concurrency limits, enforced in this process.

Each API replica enforces them on its own: with N replicas behind a balancer a tenant may
reach N times its rate. That keeps every request free of an extra Redis round trip; the
limits protect each replica's engine, which is what they are for.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

BURST_SECONDS = 2.0  # a tenant may send this many seconds' worth of requests at once


@dataclass(frozen=True)
class Limits:
    """The limits that apply to one tenant (None = unlimited)."""

    max_adapters: int | None
    max_adapter_bytes: int | None
    requests_per_s: float | None
    max_concurrent_generations: int | None


class RateLimiter:
    """A token bucket per tenant: `rate` requests per second, bursts of `rate * BURST_SECONDS`."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, time of last update)
        self._lock = threading.Lock()

    def acquire(self, tenant: str, rate: float) -> float | None:
        """Take one request's token. None if granted, else the seconds until one is free."""
        capacity = max(1.0, rate * BURST_SECONDS)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(tenant, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[tenant] = (tokens, now)
                return (1.0 - tokens) / rate
            self._buckets[tenant] = (tokens - 1.0, now)
            return None


class ConcurrencyLimiter:
    """How many generations each tenant has in flight (queued or running)."""

    def __init__(self) -> None:
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, tenant: str, limit: int | None) -> bool:
        with self._lock:
            active = self._active.get(tenant, 0)
            if active >= (limit if limit is not None else math.inf):
                return False
            self._active[tenant] = active + 1
            return True

    def release(self, tenant: str) -> None:
        with self._lock:
            active = self._active[tenant] - 1
            if active:
                self._active[tenant] = active
            else:
                del self._active[tenant]  # idle tenants take no memory

    def active(self, tenant: str) -> int:
        with self._lock:
            return self._active.get(tenant, 0)
