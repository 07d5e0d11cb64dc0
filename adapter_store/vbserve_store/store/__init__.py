"""Where adapters live: one `AdapterStore` interface, a Redis backend for production and
an embedded SQLite backend for a machine with no Redis."""

from __future__ import annotations

from vbserve.backends import parse_backend_url

from .base import AdapterRecord, AdapterStore, StoreQuota
from .redis_store import RedisAdapterStore
from .sqlite_store import SQLiteAdapterStore

__all__ = [
    "AdapterRecord",
    "AdapterStore",
    "RedisAdapterStore",
    "SQLiteAdapterStore",
    "StoreQuota",
    "open_store",
]


def open_store(url: str, *, redis_prefix: str = "vbs") -> AdapterStore:
    """Open the store a URL names (see `vbserve.backends.urls`); a bad URL raises
    `BackendInputError` on `store_url`. A Redis Cluster is contacted at once
    (`StoreUnavailableError` if no node answers); a single Redis server lazily (call
    `ping()` to check it)."""
    where = parse_backend_url(url, "store_url")
    if where.kind == "redis":
        return RedisAdapterStore.from_url(url, prefix=redis_prefix)
    return SQLiteAdapterStore(where.path)
