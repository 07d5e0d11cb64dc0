"""The durable queue of fine-tuning jobs: one `JobQueue` interface, a Redis backend for
production and an embedded SQLite backend for a machine with no Redis.

Why a thin layer on Redis Streams and not rq or arq: a job here is not a function call
to pickle and run, it is a record tenants read while it runs (state, step, loss,
tokens/s, events), a dataset kept beside it, a cancel flag the trainer polls every step
and an adapter published at most once. rq and arq would hold the "run this" part (rq
pickles the call, arq is asyncio-only, the worker here is a blocking torch loop) and we
would still keep all of the above in our own keys, with two sources of truth for a job's
state. A consumer group gives what they would: at-least-once delivery (XREADGROUP),
acknowledgement (XACK) and takeover of a dead worker's job (XAUTOCLAIM after a lease of
silence), in about a dozen commands; every state change is one Lua script next to the
record it changes, so a job's state has one owner. The same interface over SQLite
(a lease timestamp instead of XAUTOCLAIM) serves the embedded deployment, and one
contract test suite runs against both.
"""

from __future__ import annotations

from vbserve.backends import parse_backend_url
from vbserve.settings import Settings

from .base import ClaimedJob, Heartbeat, JobEvent, JobQueue, JobRecord, JobState, QueueLimits
from .redis_queue import RedisJobQueue
from .sqlite_queue import SQLiteJobQueue

__all__ = [
    "ClaimedJob",
    "Heartbeat",
    "JobEvent",
    "JobQueue",
    "JobRecord",
    "JobState",
    "QueueLimits",
    "RedisJobQueue",
    "SQLiteJobQueue",
    "jobs_url",
    "open_job_queue",
    "queue_limits",
]


def queue_limits(settings: Settings) -> QueueLimits:
    return QueueLimits(
        max_active_per_tenant=settings.training_max_jobs_per_tenant,
        max_file_bytes=settings.training_max_file_bytes,
        max_attempts=settings.training_max_attempts,
        lease_s=settings.training_lease_s,
        max_events=settings.training_max_events,
        retention_s=settings.training_job_retention_s,
    )


def jobs_url(settings: Settings) -> str:
    """`settings.jobs_url`, or where jobs live by default: the store's Redis when the store
    is on Redis (API and workers already share it), else `jobs.db` beside the SQLite store."""
    return settings.jobs_url or settings.url_beside_store("jobs.db")


def open_job_queue(url: str, *, redis_prefix: str = "vbs", limits: QueueLimits | None = None) -> JobQueue:
    """Open the queue a URL names (see `vbserve.backends.urls`); a bad URL raises
    `BackendInputError` on `jobs_url`."""
    where = parse_backend_url(url, "jobs_url")
    if where.kind == "redis":
        return RedisJobQueue.from_url(url, prefix=redis_prefix, limits=limits)
    return SQLiteJobQueue(where.path, limits=limits)
