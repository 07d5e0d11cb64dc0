"""Where adapters live: one `AdapterStore` interface, a Redis backend for production and
an embedded SQLite backend for a machine with no Redis."""

from __future__ import annotations

from ..errors import AdapterValidationError
from .base import AdapterRecord, AdapterStore, StoreQuota, validate_key
from .redis_store import RedisAdapterStore
from .redis_url import REDIS_UNAVAILABLE_ERRORS, is_redis_url, redis_client
from .sqlite_store import SQLiteAdapterStore

__all__ = [
    "REDIS_UNAVAILABLE_ERRORS",
    "AdapterRecord",
    "AdapterStore",
    "RedisAdapterStore",
    "SQLiteAdapterStore",
    "StoreQuota",
    "is_redis_url",
    "open_store",
    "redis_client",
    "validate_key",
]


def open_store(url: str, *, redis_prefix: str = "vbs") -> AdapterStore:
    """Open the store a URL names.

    `redis://...` or `rediss://...`: Redis (connects lazily; call `ping()` to check it).
    `redis+cluster://host:port` or `rediss+cluster://...`: Redis Cluster, discovered from
    that one node (connects at once: `StoreUnavailableError` if it does not answer).
    `sqlite:///rel/path.db`, `sqlite:////abs/path.db` (SQLAlchemy's spelling) or a plain
    file path: SQLite. `:memory:` is refused: every thread would get its own empty database.
    """
    if not isinstance(url, str) or not url:
        raise AdapterValidationError("url", "must be a non-empty string")
    if is_redis_url(url):
        return RedisAdapterStore.from_url(url, prefix=redis_prefix)
    path = url.removeprefix("sqlite:///")
    if "://" in path or not path:
        raise AdapterValidationError(
            "url", f"unsupported store URL {url!r}: use redis://, rediss://, redis+cluster:// or sqlite:///"
        )
    if path == ":memory:":
        raise AdapterValidationError("url", "an in-memory SQLite store cannot be shared between threads")
    return SQLiteAdapterStore(path)
