"""The Redis client every Redis-backed component uses (adapter store, tenant registry, job
queue, file store, rate limits), for a URL `urls.parse_backend_url` accepted."""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import RedisCluster

from .errors import BackendUnavailableError
from .urls import CLUSTER_SCHEMES

# What a Redis or Redis Cluster that cannot be reached raises (as opposed to a refused command).
REDIS_UNAVAILABLE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError)


def redis_client(
    url: str, *, field: str = "store", error: type[BackendUnavailableError] = BackendUnavailableError, **options: Any
) -> redis.Redis | RedisCluster:
    """A client for `url`, with redis-py connection `options`. A single server's client
    connects lazily (no I/O until first use); a cluster client connects at once, to learn
    the slot map, and raises `error(field)` (`field`: the setting that named the URL) if
    no node answers."""
    scheme, _, rest = url.partition("://")
    if scheme not in CLUSTER_SCHEMES:
        return redis.Redis.from_url(url, **options)
    try:
        return RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}", **options)
    except (*REDIS_UNAVAILABLE_ERRORS, redis.exceptions.RedisClusterException) as exc:
        raise error(field, f"no Redis Cluster node answers at {url}: {exc}") from exc
