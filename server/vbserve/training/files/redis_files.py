"""Uploaded files on Redis, beside the job queue. Keys (`p` is the prefix, `t` the tenant):

    p:{files:t}:<id>           hash: the file's record
    p:{files:t}:<id>:content   string: the file's bytes
    p:{files:t}:index          sorted set: the tenant's file ids by upload time
    p:{files:t}:bytes          integer: the bytes of all the tenant's files (the quota)

Each tenant's keys share one hash tag, so on a Redis Cluster a tenant's files sit in one
slot (tenants spread over the cluster) and the upload script, which checks the quota and
writes in one atomic step, stays legal.
"""

from __future__ import annotations

import redis
from redis.cluster import RedisCluster

from vbserve.backends import REDIS_UNAVAILABLE_ERRORS, redis_client

from .base import FileLimits, FileRecord, FileStore, files_quota_exceeded

# KEYS: record, content, index, bytes. ARGV: id, created, size, max files, max bytes, content, field pairs...
_PUT_LUA = """
if redis.call('ZCARD', KEYS[3]) + 1 > tonumber(ARGV[4]) then
    return 'files'
end
if tonumber(redis.call('GET', KEYS[4]) or '0') + tonumber(ARGV[3]) > tonumber(ARGV[5]) then
    return 'bytes'
end
local fields = {}
for i = 7, #ARGV do
    fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('SET', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('INCRBY', KEYS[4], ARGV[3])
return 'ok'
"""

# KEYS: record, content, index, bytes. ARGV: id.
_DELETE_LUA = """
local size = redis.call('HGET', KEYS[1], 'bytes')
if not size then
    return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DECRBY', KEYS[4], size)
return 1
"""


class RedisFileStore(FileStore):
    unavailable_errors = REDIS_UNAVAILABLE_ERRORS

    def __init__(
        self, client: redis.Redis | RedisCluster, *, prefix: str = "vbs", limits: FileLimits | None = None
    ) -> None:
        """client: must return bytes (`decode_responses=False`)."""
        super().__init__(limits or FileLimits())
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisFileStore needs a client with decode_responses=False")
        self.prefix = prefix
        self._redis = client
        self._put_script = client.register_script(_PUT_LUA)
        self._delete_script = client.register_script(_DELETE_LUA)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "vbs", limits: FileLimits | None = None, timeout: float = 5.0
    ) -> RedisFileStore:
        client = redis_client(
            url, field="jobs_url", decode_responses=False, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        return cls(client, prefix=prefix, limits=limits)

    def __repr__(self) -> str:
        return f"RedisFileStore({self._redis!r}, prefix={self.prefix!r})"

    def _key(self, tenant: str, suffix: str) -> str:
        return f"{self.prefix}:{{files:{tenant}}}:{suffix}"

    def _keys(self, tenant: str, file_id: str) -> list[str]:
        return [
            self._key(tenant, file_id),
            self._key(tenant, f"{file_id}:content"),
            self._key(tenant, "index"),
            self._key(tenant, "bytes"),
        ]

    def _put(self, record: FileRecord, content: bytes) -> None:
        fields = {
            "id": record.id,
            "tenant": record.tenant,
            "filename": record.filename,
            "purpose": record.purpose,
            "bytes": record.bytes,
            "created": repr(record.created),
        }
        limits = self.limits
        args = [record.id, repr(record.created), record.bytes, limits.max_files_per_tenant, limits.max_bytes_per_tenant]
        args += [content, *(x for pair in fields.items() for x in pair)]
        reply = self._put_script(keys=self._keys(record.tenant, record.id), args=args)
        if reply != b"ok":
            raise files_quota_exceeded(reply.decode(), limits)

    def _get(self, tenant: str, file_id: str) -> FileRecord | None:
        raw = self._redis.hgetall(self._key(tenant, file_id))
        return _record(raw) if raw else None

    def _content(self, tenant: str, file_id: str) -> bytes | None:
        return self._redis.get(self._key(tenant, f"{file_id}:content"))

    def _list(self, tenant: str, limit: int, after: FileRecord | None) -> list[FileRecord]:
        index = self._key(tenant, "index")
        start = 0
        if after is not None:
            rank = self._redis.zrevrank(index, after.id)
            if rank is None:  # deleted since the caller looked it up
                return []
            start = rank + 1
        ids = self._redis.zrevrange(index, start, start + limit - 1)
        pipe = self._redis.pipeline(transaction=False)
        for file_id in ids:
            pipe.hgetall(self._key(tenant, file_id.decode()))
        return [_record(raw) for raw in pipe.execute() if raw]

    def _delete(self, tenant: str, file_id: str) -> bool:
        return bool(self._delete_script(keys=self._keys(tenant, file_id), args=[file_id]))

    def _ping(self) -> None:
        self._redis.ping()

    def _close(self) -> None:
        self._redis.close()


def _record(raw: dict[bytes, bytes]) -> FileRecord:
    def text(key: str) -> str:
        return raw[key.encode()].decode()

    return FileRecord(
        id=text("id"),
        tenant=text("tenant"),
        filename=text("filename"),
        purpose=text("purpose"),
        bytes=int(text("bytes")),
        created=float(text("created")),
    )
