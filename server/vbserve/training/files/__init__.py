"""Files tenants upload for fine-tuning (OpenAI's files API): one `FileStore` interface,
a Redis backend and an embedded SQLite backend, opened beside the job queue (the same
Redis, or the same SQLite file as the queue), with one contract test suite for both
(tests/test_files.py)."""

from __future__ import annotations

from vbserve.backends import parse_backend_url
from vbserve.settings import Settings

from ..jobs import jobs_url
from .base import FileLimits, FileRecord, FileStore
from .redis_files import RedisFileStore
from .sqlite_files import SQLiteFileStore

__all__ = [
    "FileLimits",
    "FileRecord",
    "FileStore",
    "RedisFileStore",
    "SQLiteFileStore",
    "file_limits",
    "open_file_store",
]


def file_limits(settings: Settings) -> FileLimits:
    return FileLimits(
        max_file_bytes=settings.training_max_file_bytes,
        max_files_per_tenant=settings.files_max_per_tenant,
        max_bytes_per_tenant=settings.files_max_bytes_per_tenant,
    )


def open_file_store(settings: Settings) -> FileStore:
    """The file store beside the job queue: on the queue's Redis, or in its SQLite file."""
    where = parse_backend_url(jobs_url(settings), "jobs_url")
    if where.kind == "redis":
        return RedisFileStore.from_url(where.url, prefix=settings.redis_prefix, limits=file_limits(settings))
    return SQLiteFileStore(where.path, limits=file_limits(settings))
