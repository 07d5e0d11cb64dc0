"""Per-tenant request-rate and concurrency limits.

Request rate: a token bucket per tenant, `rate` requests per second with bursts of
`rate * BURST_SECONDS`. Where the tenant registry lives on Redis (the deployment for
several API replicas), the buckets live there too (`RedisRateLimiter`): one bucket
per tenant shared by every replica, so a tenant gets its rate from the service as a whole,
however many replicas the balancer spreads its requests over. That costs each
rate-limited request one Redis round trip (one small script). On the embedded SQLite
deployment (one process) the buckets are in that process (`RateLimiter`). If Redis cannot
be reached, each replica limits on its own until it answers again: a limiter must neither
take serving down nor refuse everyone, so during an outage a tenant may reach N times its
rate over N replicas.

Concurrency (`ConcurrencyLimiter`): counted per API replica, in its process. A generation
occupies one replica's engine (a row of its batch, its queue), and the limit exists so
that one tenant cannot fill that engine's batch and queue and starve the others; a count
shared across replicas would not protect any one engine better, and would need leases
that expire when a replica dies mid-generation. With N replicas a tenant may have up to N
times its limit in flight, at most its limit on each engine.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from vbserve.backends import CircuitBreaker, redis_client, validate_key
from vbserve_store.store import StoreQuota

BURST_SECONDS = 2.0  # a tenant may send this many seconds' worth of requests at once


@dataclass(frozen=True)
class Limits:
    """The limits that apply to one tenant (None = unlimited)."""

    max_adapters: int | None
    max_adapter_bytes: int | None
    requests_per_s: float | None
    max_concurrent_generations: int | None

    @property
    def store_quota(self) -> StoreQuota:
        """The limits the store checks atomically with each put."""
        return StoreQuota(self.max_adapters, self.max_adapter_bytes)


class RateLimiter:
    """A token bucket per tenant, in this process: `rate` requests per second, bursts of
    `rate * BURST_SECONDS`. Thread-safe."""

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

    def close(self) -> None:
        """Release what the limiter holds (nothing, in process)."""


# One tenant's bucket: a hash {tokens, ts (ms, Redis clock)}. Redis's own clock, so
# replicas with skewed clocks agree; the key expires once the bucket would be full again,
# so an idle tenant takes no memory (a missing bucket is a full one). A refusal writes
# nothing: the bucket's state then is what it was, refilled to now. Returns 0 when
# granted, else the milliseconds until a token is free.
_TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
    tokens = capacity
else
    tokens = math.min(capacity, tokens + math.max(0, now - last) * rate / 1000)
end
if tokens < 1 - 1e-9 then
    return math.max(1, math.ceil((1 - tokens) * 1000 / rate))
end
tokens = math.max(0, tokens - 1)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((capacity - tokens) * 1000 / rate)))
return 0
"""

# While Redis is unreachable, a probe pings it this often; calls meanwhile use the
# in-process bucket at once, so an outage makes one request wait for Redis, not each one.
REDIS_RETRY_INTERVAL_S = 1.0
# Connect and command timeout: the limiter sits on every rate-limited request's path, and
# falling back to the local bucket is better than making the request wait.
REDIS_TIMEOUT_S = 0.5


class _RedisUnavailable(Exception):
    """Raised by the breaker instead of Redis's error: limit in this process instead."""


class RedisRateLimiter(RateLimiter):
    """The token buckets in Redis, one hash per tenant (`<prefix>:rl:{<tenant>}`: the hash
    tag puts each bucket in one slot of a Redis Cluster), shared by every replica using the
    same Redis and prefix. While Redis is unreachable each call falls back to this
    process's own bucket (the inherited `RateLimiter`): the store's circuit breaker,
    opened by any failure here, skips Redis until its probe gets an answer."""

    # Any failure of Redis (down, hung, a cluster without a slot's node, out of memory,
    # read-only after a failover): limit locally rather than fail the request.
    unavailable_errors: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException)

    def __init__(self, client: redis.Redis | RedisCluster, *, prefix: str = "vbs") -> None:
        super().__init__()
        self.prefix = validate_key("prefix", prefix)
        self._redis = client
        self._script = client.register_script(_TOKEN_BUCKET_LUA)
        # slow_s=0: unlike the store, which fails fast only once calls are slow, the limiter
        # has a fallback, so any failure is reason enough to stop asking Redis for a while.
        self._breaker = CircuitBreaker(
            client.ping, self.unavailable_errors, name="rate-limit Redis", slow_s=0.0, interval_s=REDIS_RETRY_INTERVAL_S
        )

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "vbs", timeout: float = REDIS_TIMEOUT_S) -> RedisRateLimiter:
        """`redis://`/`rediss://` (connected lazily) or `redis+cluster://`/`rediss+cluster://`
        (connected at once, to learn the slot map; raises if no node answers). No retries
        with backoff: a failed call falls back to the local bucket at once."""
        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 1)}
        return cls(redis_client(url, **options), prefix=prefix)

    def __repr__(self) -> str:
        return f"RedisRateLimiter({self._redis!r}, prefix={self.prefix!r})"

    def key(self, tenant: str) -> str:
        return f"{self.prefix}:rl:{{{tenant}}}"

    def acquire(self, tenant: str, rate: float) -> float | None:
        capacity = max(1.0, rate * BURST_SECONDS)
        try:
            with self._breaker.call(_RedisUnavailable):
                wait_ms = self._script(keys=[self.key(tenant)], args=[repr(float(rate)), repr(capacity)])
        except _RedisUnavailable:
            return super().acquire(tenant, rate)
        return None if int(wait_ms) == 0 else int(wait_ms) / 1000

    def close(self) -> None:
        self._breaker.stop()
        self._redis.close()


class ConcurrencyLimiter:
    """How many generations each tenant has in flight (queued or running) on this replica."""

    def __init__(self) -> None:
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, tenant: str, limit: int | None, count: int = 1) -> bool:
        """Take `count` more of the tenant's `limit`, all or none."""
        with self._lock:
            active = self._active.get(tenant, 0)
            if active + count > (limit if limit is not None else math.inf):
                return False
            self._active[tenant] = active + count
            return True

    def release(self, tenant: str, count: int = 1) -> None:
        with self._lock:
            active = self._active[tenant] - count
            if active:
                self._active[tenant] = active
            else:
                del self._active[tenant]  # idle tenants take no memory

    def active(self, tenant: str) -> int:
        with self._lock:
            return self._active.get(tenant, 0)
