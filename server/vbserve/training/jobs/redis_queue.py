"""The production job queue: a thin layer on a Redis Stream with one consumer group.

Keys (`p` is the prefix; every multi-key change is one Lua script, which Redis runs
atomically):

    p:{jobs}:stream             stream of {job: id}; consumer group "workers"
    p:{jobs}:<id>               hash: the job record (+ worker, entry, cancel, publish_bank_id)
    p:{jobs}:<id>:files         hash: training, validation (dropped when the job ends)
    p:{jobs}:<id>:events        list of JSON progress events, trimmed to the newest max_events
    p:{jobs}:<id>:hb            string: the worker holding the job, expires after the lease
    p:{jobs}:t:<tenant>:jobs    sorted set: the tenant's job ids by creation time
    p:{jobs}:t:<tenant>:active  set: the tenant's queued + running job ids (the limit)

Every key carries the hash tag `{jobs}`, so on a Redis Cluster the whole queue sits in one
slot and the scripts, which touch the stream, a job and its tenant's sets at once, stay
legal. One slot means one shard holds every job and its dataset until the job ends; jobs
are few and short-lived next to adapters (which spread over the cluster by tenant), so
that is the trade for atomic state changes.

A worker gets work with XREADGROUP (new entries) and XAUTOCLAIM (entries whose worker
has been silent for a lease: it died). While it runs a job it renews the lease every
third of it: the heartbeat script re-sets the `hb` key with a TTL and XCLAIMs the entry to
itself, which resets the entry's idle time, so XAUTOCLAIM only ever picks up jobs of
workers that stopped heartbeating. The entry is XACKed and deleted when the job ends.
Finished jobs expire after the retention time.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from redis.cluster import RedisCluster

from vbserve.backends import REDIS_UNAVAILABLE_ERRORS, redis_client

from ..errors import JobStateError, TooManyJobsError
from .base import (
    ClaimedJob,
    Heartbeat,
    JobEvent,
    JobQueue,
    JobRecord,
    JobState,
    QueueLimits,
    event_from_json,
    event_json,
    job_not_found,
    unknown_cursor,
)

GROUP = "workers"
# How long one XREADGROUP blocks before the claim loop checks for stale jobs again.
MAX_BLOCK_MS = 1000
# The newest jobs per tenant that `list` can page through.
MAX_LISTED_JOBS = 10_000

# Shared by the scripts that end a job. KEYS: 1 job, 2 hb, 3 files, 4 active, 5 stream, 6 events.
_CLOSE_LUA = """
local function close(state, err, version, now, retention, group, job_id)
    redis.call('HSET', KEYS[1], 'state', state, 'error', err, 'adapter_version', version, 'updated', now)
    redis.call('DEL', KEYS[2], KEYS[3])
    redis.call('SREM', KEYS[4], job_id)
    local entry = redis.call('HGET', KEYS[1], 'entry')
    if entry then
        redis.call('XACK', KEYS[5], group, entry)
        redis.call('XDEL', KEYS[5], entry)
    end
    redis.call('EXPIRE', KEYS[1], retention)
    redis.call('EXPIRE', KEYS[6], retention)
end
local function owned(worker)
    return redis.call('HGET', KEYS[1], 'worker') == worker and redis.call('HGET', KEYS[1], 'state') == 'running'
end
"""

# KEYS: job, files, tenant jobs, tenant active, stream.
# ARGV: job id, limit, created, training, validation ('' = none), max listed, field pairs...
_SUBMIT_LUA = """
local active = redis.call('SCARD', KEYS[4])
if active >= tonumber(ARGV[2]) then
    return {'limit', active}
end
local fields = {}
for i = 7, #ARGV do
    fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HSET', KEYS[2], 'training', ARGV[4])
if ARGV[5] ~= '' then
    redis.call('HSET', KEYS[2], 'validation', ARGV[5])
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -1 - tonumber(ARGV[6]))
redis.call('SADD', KEYS[4], ARGV[1])
local entry = redis.call('XADD', KEYS[5], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'entry', entry)
return {'ok'}
"""

# KEYS: close keys. ARGV: worker, lease ms, max attempts, entry, group, now, retention, job id.
_START_LUA = (
    _CLOSE_LUA
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or (state ~= 'queued' and state ~= 'running') or redis.call('HGET', KEYS[1], 'entry') ~= ARGV[4] then
    -- gone, finished, or an entry the job was re-queued from
    redis.call('XACK', KEYS[5], ARGV[5], ARGV[4])
    redis.call('XDEL', KEYS[5], ARGV[4])
    return {'skip'}
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
    return {'busy'}
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
    close('cancelled', '', '', ARGV[6], ARGV[7], ARGV[5], ARGV[8])
    return {'skip'}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[3]) then
    local last = redis.call('HGET', KEYS[1], 'error') or ''
    if last == '' then
        last = 'its worker stopped while running it'
    end
    close('failed', 'gave up after ' .. (attempts - 1) .. ' attempts; last: ' .. last, '', ARGV[6], ARGV[7],
          ARGV[5], ARGV[8])
    return {'skip'}
end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'updated', ARGV[6])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local validation = redis.call('HGET', KEYS[3], 'validation') or false
return {'ok', redis.call('HGETALL', KEYS[1]), redis.call('HGET', KEYS[3], 'training'), validation}
"""
)

# KEYS: job, hb, stream. ARGV: worker, lease ms, group.
_HEARTBEAT_LUA = (
    _CLOSE_LUA
    + """
if not owned(ARGV[1]) then
    return {0, 0}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('XCLAIM', KEYS[3], ARGV[3], ARGV[1], 0, redis.call('HGET', KEYS[1], 'entry'), 'JUSTID')
return {1, redis.call('HGET', KEYS[1], 'cancel') == '1' and 1 or 0}
"""
)

# KEYS: job, events. ARGV: worker, event JSON, max events, then field pairs.
_REPORT_LUA = (
    _CLOSE_LUA
    + """
if not owned(ARGV[1]) then
    return 0
end
local fields = {}
for i = 4, #ARGV do
    fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
return 1
"""
)

# KEYS: job. ARGV: worker, bank id, now.
_MARK_LUA = (
    _CLOSE_LUA
    + """
if not owned(ARGV[1]) then
    return 0
end
redis.call('HSET', KEYS[1], 'publish_bank_id', ARGV[2], 'updated', ARGV[3])
return 1
"""
)

# KEYS: close keys. ARGV: worker, state, error, version, now, retention, group, job id.
_FINISH_LUA = (
    _CLOSE_LUA
    + """
if not owned(ARGV[1]) then
    return 0
end
close(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
return 1
"""
)

# KEYS: job, hb, stream. ARGV: worker, error, count attempt (1/0), now, group.
_RETRY_LUA = (
    _CLOSE_LUA
    + """
if not owned(ARGV[1]) then
    return 0
end
if ARGV[3] == '0' then
    redis.call('HINCRBY', KEYS[1], 'attempts', -1)
end
local old = redis.call('HGET', KEYS[1], 'entry')
redis.call('XACK', KEYS[3], ARGV[5], old)
redis.call('XDEL', KEYS[3], old)
local entry = redis.call('XADD', KEYS[3], '*', 'job', redis.call('HGET', KEYS[1], 'id'))
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'error', ARGV[2], 'entry', entry, 'updated', ARGV[4])
redis.call('DEL', KEYS[2])
return 1
"""
)

# KEYS: close keys. ARGV: now, retention, group, job id.
_CANCEL_LUA = (
    _CLOSE_LUA
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
    return {'missing'}
end
if state == 'queued' or (state == 'running' and redis.call('EXISTS', KEYS[2]) == 0) then
    -- a running job without a heartbeat has no live worker that could still publish
    close('cancelled', '', '', ARGV[1], ARGV[2], ARGV[3], ARGV[4])
elseif state == 'running' then
    redis.call('HSET', KEYS[1], 'cancel', '1', 'updated', ARGV[1])
elseif state ~= 'cancelled' then
    return {'final', state}
end
return {'ok'}
"""
)

# KEYS: close keys, tenant jobs. ARGV: group, job id.
_REMOVE_LUA = """
local existed = redis.call('EXISTS', KEYS[1])
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry then
    redis.call('XACK', KEYS[5], ARGV[1], entry)
    redis.call('XDEL', KEYS[5], entry)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[6])
redis.call('SREM', KEYS[4], ARGV[2])
redis.call('ZREM', KEYS[7], ARGV[2])
return existed
"""


class RedisJobQueue(JobQueue):
    """Job queue on a Redis server (5.0+ for streams, 6.2+ for XAUTOCLAIM)."""

    unavailable_errors = REDIS_UNAVAILABLE_ERRORS

    def __init__(
        self, client: redis.Redis | RedisCluster, *, prefix: str = "vbs", limits: QueueLimits | None = None
    ) -> None:
        """client: must return bytes (`decode_responses=False`), with a socket timeout
        above one second (a claim blocks up to a second)."""
        super().__init__(limits or QueueLimits())
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisJobQueue needs a client with decode_responses=False")
        self.prefix = prefix
        self._redis = client
        self._base = f"{prefix}:{{jobs}}"
        self._stream = f"{self._base}:stream"
        self._scripts = {
            name: client.register_script(src)
            for name, src in (
                ("submit", _SUBMIT_LUA),
                ("start", _START_LUA),
                ("heartbeat", _HEARTBEAT_LUA),
                ("report", _REPORT_LUA),
                ("mark", _MARK_LUA),
                ("finish", _FINISH_LUA),
                ("retry", _RETRY_LUA),
                ("cancel", _CANCEL_LUA),
                ("remove", _REMOVE_LUA),
            )
        }
        self._group_ready = False

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "vbs", limits: QueueLimits | None = None, timeout: float = 5.0
    ) -> RedisJobQueue:
        """`redis://`/`rediss://` (one server, connected lazily) or `redis+cluster://`/
        `rediss+cluster://` (a Redis Cluster, connected at once to learn its slot map;
        `BackendUnavailableError` on `jobs_url` if no node answers)."""
        client = redis_client(
            url,
            field="jobs_url",
            decode_responses=False,
            socket_timeout=timeout + MAX_BLOCK_MS / 1000,
            socket_connect_timeout=timeout,
        )
        return cls(client, prefix=prefix, limits=limits)

    def __repr__(self) -> str:
        return f"RedisJobQueue({self._redis!r}, prefix={self.prefix!r})"

    # -- keys -------------------------------------------------------------------------------

    def _job_key(self, job_id: str, suffix: str = "") -> str:
        return f"{self._base}:{job_id}{suffix}"

    def _tenant_key(self, tenant: str, suffix: str) -> str:
        return f"{self._base}:t:{tenant}:{suffix}"

    def _close_keys(self, job_id: str, tenant: str) -> list[str]:
        return [
            self._job_key(job_id),
            self._job_key(job_id, ":hb"),
            self._job_key(job_id, ":files"),
            self._tenant_key(tenant, "active"),
            self._stream,
            self._job_key(job_id, ":events"),
        ]

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # -- tenant side -------------------------------------------------------------------------

    def _submit(self, record: JobRecord, training_file: bytes, validation_file: bytes | None) -> None:
        self._ensure_group()
        keys = [
            self._job_key(record.id),
            self._job_key(record.id, ":files"),
            self._tenant_key(record.tenant, "jobs"),
            self._tenant_key(record.tenant, "active"),
            self._stream,
        ]
        fields = [x for pair in _record_fields(record).items() for x in pair]
        args = [
            record.id,
            self.limits.max_active_per_tenant,
            repr(record.created),
            training_file,
            validation_file or b"",
            MAX_LISTED_JOBS,
            *fields,
        ]
        reply = self._scripts["submit"](keys=keys, args=args)
        if reply[0] == b"limit":
            raise TooManyJobsError(
                "tenant", f"{reply[1]} jobs are queued or running; the limit is {self.limits.max_active_per_tenant}"
            )

    def _get(self, job_id: str) -> JobRecord | None:
        raw = self._redis.hgetall(self._job_key(job_id))
        return _record(raw) if raw else None

    def _active_count(self, tenant: str) -> int:
        return self._redis.scard(self._tenant_key(tenant, "active"))

    def _list(self, tenant: str, limit: int, after: str | None) -> list[JobRecord]:
        key = self._tenant_key(tenant, "jobs")
        start = 0
        if after is not None:
            rank = self._redis.zrevrank(key, after)
            if rank is None:
                raise unknown_cursor(after)
            start = rank + 1
        ids = self._redis.zrevrange(key, start, start + limit - 1)
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._job_key(job_id.decode()))
        records, expired = [], []
        for job_id, raw in zip(ids, pipe.execute(), strict=True):
            if raw:
                records.append(_record(raw))
            else:
                expired.append(job_id)
        if expired:
            self._redis.zrem(key, *expired)
        return records

    def _events(self, job_id: str) -> list[JobEvent]:
        return [event_from_json(e) for e in self._redis.lrange(self._job_key(job_id, ":events"), 0, -1)]

    def _cancel(self, job_id: str, now: float) -> None:
        record = self._get(job_id)
        if record is None:
            raise job_not_found(job_id)
        keys = self._close_keys(job_id, record.tenant)
        reply = self._scripts["cancel"](keys=keys, args=[repr(now), int(self.limits.retention_s), GROUP, job_id])
        if reply[0] == b"missing":
            raise job_not_found(job_id)
        if reply[0] == b"final":
            raise JobStateError("job_id", f"the job has already {reply[1].decode()}")

    def _remove(self, tenant: str, job_id: str | None) -> int:
        """One script per job (each removal is atomic); the tenant's sets hold every job id
        it has: `jobs` the newest MAX_LISTED_JOBS, `active` each queued or running one."""
        if job_id is not None:
            ids = [job_id.encode()]
        else:
            ids = list(
                {*self._redis.zrange(self._tenant_key(tenant, "jobs"), 0, -1)}
                | self._redis.smembers(self._tenant_key(tenant, "active"))
            )
        removed = 0
        for raw_id in ids:
            one = raw_id.decode()
            if job_id is not None and self._redis.hget(self._job_key(one), b"tenant") != tenant.encode():
                continue  # another tenant's job: as if absent
            keys = [*self._close_keys(one, tenant), self._tenant_key(tenant, "jobs")]
            removed += int(self._scripts["remove"](keys=keys, args=[GROUP, one]))
        return removed

    # -- worker side -------------------------------------------------------------------------

    def _claim(self, worker_id: str, deadline: float) -> ClaimedJob | None:
        self._ensure_group()
        lease_ms = int(self.limits.lease_s * 1000)
        while True:
            try:
                # Entries whose worker stopped heartbeating for a lease: it died.
                _, entries, *_ = self._redis.xautoclaim(
                    self._stream, GROUP, worker_id, min_idle_time=lease_ms, start_id="0-0", count=16
                )
                if not entries:
                    remaining_ms = int((deadline - time.monotonic()) * 1000)
                    block = min(remaining_ms, MAX_BLOCK_MS) if remaining_ms > 0 else None
                    reply = self._redis.xreadgroup(GROUP, worker_id, {self._stream: ">"}, count=1, block=block)
                    entries = reply[0][1] if reply else []
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_ready = False  # the stream was deleted under us; make it again
                self._ensure_group()
                continue
            for entry_id, fields in entries:
                job = self._start(worker_id, entry_id, fields)
                if job is not None:
                    return job
            if time.monotonic() >= deadline:
                return None

    def _start(self, worker_id: str, entry_id: bytes, fields: dict | None) -> ClaimedJob | None:
        job_id = fields.get(b"job", b"").decode() if fields else ""
        if not job_id:  # an entry deleted while pending
            self._redis.xack(self._stream, GROUP, entry_id)
            return None
        raw = self._redis.hget(self._job_key(job_id), b"tenant")
        tenant = raw.decode() if raw else "-"
        args = [
            worker_id,
            int(self.limits.lease_s * 1000),
            self.limits.max_attempts,
            entry_id,
            GROUP,
            repr(time.time()),
            int(self.limits.retention_s),
            job_id,
        ]
        reply = self._scripts["start"](keys=self._close_keys(job_id, tenant), args=args)
        if reply[0] != b"ok":
            return None
        flat, training, validation = reply[1], reply[2], reply[3]
        raw_record = dict(zip(flat[::2], flat[1::2], strict=True))
        publish = raw_record.get(b"publish_bank_id", b"").decode() or None
        return ClaimedJob(_record(raw_record), worker_id, training, validation, publish)

    def _heartbeat(self, job: ClaimedJob, now: float) -> Heartbeat:
        keys = [self._job_key(job.id), self._job_key(job.id, ":hb"), self._stream]
        owned, cancel = self._scripts["heartbeat"](
            keys=keys, args=[job.worker_id, int(self.limits.lease_s * 1000), GROUP]
        )
        return Heartbeat(bool(owned), bool(cancel))

    def _report(self, job: ClaimedJob, event: JobEvent) -> bool:
        fields: dict[str, Any] = {
            "step": event.step,
            "total_steps": event.total_steps,
            "loss": repr(event.loss),
            "tokens_per_s": repr(event.tokens_per_s),
            "updated": repr(event.time),
        }
        if event.val_loss is not None:
            fields["val_loss"] = repr(event.val_loss)
        args = [job.worker_id, event_json(event), self.limits.max_events, *(x for kv in fields.items() for x in kv)]
        return bool(self._scripts["report"](keys=[self._job_key(job.id), self._job_key(job.id, ":events")], args=args))

    def _mark_publishing(self, job: ClaimedJob, bank_id: str, now: float) -> bool:
        return bool(self._scripts["mark"](keys=[self._job_key(job.id)], args=[job.worker_id, bank_id, repr(now)]))

    def _finish(
        self, job: ClaimedJob, state: JobState, error: str | None, adapter_version: int | None, now: float
    ) -> bool:
        args = [
            job.worker_id,
            state.value,
            error or "",
            "" if adapter_version is None else adapter_version,
            repr(now),
            int(self.limits.retention_s),
            GROUP,
            job.id,
        ]
        return bool(self._scripts["finish"](keys=self._close_keys(job.id, job.record.tenant), args=args))

    def _retry(self, job: ClaimedJob, error: str, count_attempt: bool, now: float) -> bool:
        keys = [self._job_key(job.id), self._job_key(job.id, ":hb"), self._stream]
        args = [job.worker_id, error, "1" if count_attempt else "0", repr(now), GROUP]
        return bool(self._scripts["retry"](keys=keys, args=args))

    def _ping(self) -> None:
        self._redis.ping()

    def _close(self) -> None:
        self._redis.close()


def _record_fields(record: JobRecord) -> dict[str, str | int]:
    return {
        "id": record.id,
        "tenant": record.tenant,
        "adapter_name": record.adapter_name,
        "state": record.state.value,
        "hyperparameters": json.dumps(record.hyperparameters, separators=(",", ":")),
        "attempts": 0,
        "created": repr(record.created),
        "updated": repr(record.updated),
        "training_file_id": record.training_file_id or "",
        "validation_file_id": record.validation_file_id or "",
        "trained_tokens": "" if record.trained_tokens is None else record.trained_tokens,
    }


def _record(raw: dict[bytes, bytes]) -> JobRecord:
    def text(key: str) -> str | None:
        value = raw.get(key.encode(), b"").decode()
        return value or None

    def number(key: str, kind: type) -> Any:
        value = text(key)
        return None if value is None else kind(value)

    return JobRecord(
        id=text("id") or "",
        tenant=text("tenant") or "",
        adapter_name=text("adapter_name") or "",
        state=JobState(text("state")),
        hyperparameters=json.loads(text("hyperparameters") or "{}"),
        step=number("step", int) or 0,
        total_steps=number("total_steps", int) or 0,
        loss=number("loss", float),
        val_loss=number("val_loss", float),
        tokens_per_s=number("tokens_per_s", float),
        error=text("error"),
        adapter_version=number("adapter_version", int),
        attempts=number("attempts", int) or 0,
        cancel_requested=text("cancel") == "1",
        created=number("created", float) or 0.0,
        updated=number("updated", float) or 0.0,
        training_file_id=text("training_file_id"),
        validation_file_id=text("validation_file_id"),
        trained_tokens=number("trained_tokens", int),
    )
