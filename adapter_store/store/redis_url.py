"""Redis URLs, shared by everything that keeps state in Redis (adapter store, tenant
registry, job queue, rate limits): `redis://`/`rediss://` name one server (or a primary),
`redis+cluster://host:port`/`rediss+cluster://` a Redis Cluster found from that one node.
redis-py has no URL scheme for a cluster, hence the `+cluster` spelling."""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import RedisCluster

from ..errors import StoreUnavailableError

# Our cluster schemes, and the plain scheme redis-py's RedisCluster expects instead.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
REDIS_SCHEMES = ("redis", "rediss", *CLUSTER_SCHEMES)
# What a Redis or Redis Cluster that cannot be reached raises (as opposed to a refused command).
REDIS_UNAVAILABLE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError)


def is_redis_url(url: str) -> bool:
    return url.partition("://")[0] in REDIS_SCHEMES


def redis_client(url: str, *, field: str = "store", **options: Any) -> redis.Redis | RedisCluster:
    """A client for `url`, with redis-py connection `options`. A single server's client
    connects lazily (no I/O until first use); a cluster client connects at once, to learn
    the slot map, and raises `StoreUnavailableError` on `field` (the setting that named
    the URL) if no node answers."""
    scheme, _, rest = url.partition("://")
    if scheme not in CLUSTER_SCHEMES:
        return redis.Redis.from_url(url, **options)
    try:
        return RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}", **options)
    except (*REDIS_UNAVAILABLE_ERRORS, redis.exceptions.RedisClusterException) as exc:
        raise StoreUnavailableError(field, f"no Redis Cluster node answers at {url}: {exc}") from exc
