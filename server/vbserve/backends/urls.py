"""The one parser of backend URLs (adapter store, job queue, file store, tenant registry).

`redis://...`/`rediss://...`: one Redis server (or a primary). `redis+cluster://host:port`
/`rediss+cluster://...`: a Redis Cluster found from that one node (redis-py has no URL
scheme for a cluster, hence the `+cluster` spelling). `sqlite:///rel/path.db`,
`sqlite:////abs/path.db` (SQLAlchemy's spelling) or a plain file path: SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import BackendInputError

# Our cluster schemes, and the plain scheme redis-py's RedisCluster expects instead.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
REDIS_SCHEMES = ("redis", "rediss", *CLUSTER_SCHEMES)
SQLITE_PREFIX = "sqlite:///"


@dataclass(frozen=True)
class BackendURL:
    """kind "redis": `url` is the Redis URL as given; kind "sqlite": `path` is the file."""

    kind: Literal["redis", "sqlite"]
    url: str
    path: Path | None = None


def parse_backend_url(url: object, field: str) -> BackendURL:
    """Where a backend lives, or `BackendInputError(field)` naming the setting at fault.
    `:memory:` is refused: every thread would get its own empty database."""
    if not isinstance(url, str) or not url:
        raise BackendInputError(field, "must be a non-empty string")
    if url.partition("://")[0] in REDIS_SCHEMES:
        return BackendURL("redis", url)
    path = url.removeprefix(SQLITE_PREFIX)
    if "://" in path or not path:
        raise BackendInputError(
            field, f"unsupported URL {url!r}: use redis://, rediss://, redis+cluster:// or sqlite:///"
        )
    if path == ":memory:":
        raise BackendInputError(field, "an in-memory SQLite database cannot be shared between threads")
    return BackendURL("sqlite", url, Path(path))
