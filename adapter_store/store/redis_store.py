"""The production store: Redis, tenant-namespaced keys, atomic publish of each version.

Keys (`p` is the configurable prefix; `{tenant}` in braces is a Redis Cluster hash tag,
so all keys of one tenant share a slot):

    p:a:{tenant}:n:<name>   hash: version, bank_id, config, body, body_bytes, bank_bytes, created, updated
    p:a:{tenant}:versions   hash: name -> last version ever given (survives delete)
    p:a:{tenant}:names      sorted set, all scores 0: names in byte order, for paging
    p:a:{tenant}:bytes      integer: sum of stored_bytes of the tenant's adapters
    p:b:<bank_id>           hash: data (encode_bank blob), refs (number of adapters using it)

Every write (put, delete) is one Lua script, which Redis runs atomically: the version
check, the new body + record, the bank reference and the release of the replaced bank
happen together or not at all, so a reader sees the old or the new version, never a mix.
`get` is one (read-only) script too: record, body and bank come from one instant. Reading
the record and then the bank in two round trips would race a writer that replaces the
version and drops the old bank in between; retrying such misses starves a reader of a
name that is rewritten continuously (measured: 8 writers on one name beat 8 retries).

Cluster caveat: a script may only touch keys of one slot on Redis Cluster, and bank keys
are global (content addressed, shared across tenants), so they live in other slots than
the adapter keys, and the scripts build bank keys from the prefix inside Lua. This store
therefore targets single-node Redis (or a primary with replicas). Bank keys are built
only by `_bank_key`/`_bank_key_prefix` and touched only by the three scripts,
`_get_bank` and `_has_bank`, so moving banks to their own slot-safe scheme later (e.g.
two-phase refcounting outside the adapter script) stays local to this file.
"""

from __future__ import annotations

import json

import redis

from ..errors import BankNotFoundError, VersionConflictError
from .base import AdapterRecord, AdapterStore, Records, StoreQuota, not_found, quota_exceeded, validate_key

_RECORD_FIELDS = (b"version", b"bank_id", b"config", b"body_bytes", b"bank_bytes", b"created", b"updated")

_RELEASE_BANK_LUA = """
local function release_bank(key)
    if redis.call('HINCRBY', key, 'refs', -1) <= 0 then
        redis.call('DEL', key)
    end
end
"""

# KEYS: adapter hash, versions hash, names zset, bytes counter, new bank hash.
# ARGV: name, expected version ('' = unconditional), bank_id, config JSON, body,
#       bank blob ('' = only if the bank is missing: the script then answers 'need_bank'),
#       now, bank key prefix, max adapters ('' = no limit), max bytes ('' = no limit).
# Every check comes before the first write, so a refused put changes nothing.
_PUT_LUA = (
    _RELEASE_BANK_LUA
    + """
local name = ARGV[1]
local cur = redis.call('HMGET', KEYS[1], 'version', 'bank_id', 'body_bytes', 'bank_bytes', 'created')
local cur_version = tonumber(cur[1]) or 0
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= cur_version then
    return {'conflict', cur_version}
end
local bank_stored = redis.call('EXISTS', KEYS[5]) == 1
if not bank_stored and ARGV[6] == '' then
    return {'need_bank'}
end
local bank_bytes = string.len(ARGV[6])
if bank_stored then
    bank_bytes = redis.call('HSTRLEN', KEYS[5], 'data')
end
local delta = string.len(ARGV[5]) + bank_bytes
if cur[1] then
    delta = delta - tonumber(cur[3]) - tonumber(cur[4])
elseif ARGV[9] ~= '' and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[9]) then
    return {'quota', 'adapters'}
end
if ARGV[10] ~= '' and delta > 0 and (tonumber(redis.call('GET', KEYS[4])) or 0) + delta > tonumber(ARGV[10]) then
    return {'quota', 'bytes'}
end
if not bank_stored then
    redis.call('HSET', KEYS[5], 'data', ARGV[6], 'refs', 0)
end
-- Take the new reference before releasing the old one: they may be the same bank.
redis.call('HINCRBY', KEYS[5], 'refs', 1)
local created = ARGV[7]
if cur[1] then
    release_bank(ARGV[8] .. cur[2])
    created = cur[5]
end
local version = math.max(tonumber(redis.call('HGET', KEYS[2], name)) or 0, cur_version) + 1
redis.call('HSET', KEYS[2], name, version)
redis.call('HSET', KEYS[1], 'version', version, 'bank_id', ARGV[3], 'config', ARGV[4], 'body', ARGV[5],
           'body_bytes', string.len(ARGV[5]), 'bank_bytes', bank_bytes, 'created', created, 'updated', ARGV[7])
redis.call('ZADD', KEYS[3], 0, name)
redis.call('INCRBY', KEYS[4], delta)
return {'ok', version, created, bank_bytes}
"""
)

# KEYS: adapter hash, names zset, bytes counter. ARGV: name, bank key prefix.
_DELETE_LUA = (
    _RELEASE_BANK_LUA
    + """
local cur = redis.call('HMGET', KEYS[1], 'bank_id', 'body_bytes', 'bank_bytes')
if not cur[1] then
    return 0
end
release_bank(ARGV[2] .. cur[1])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[3])
else
    redis.call('DECRBY', KEYS[3], tonumber(cur[2]) + tonumber(cur[3]))
end
return 1
"""
)

# KEYS: adapter hash. ARGV: bank key prefix. Returns nil, or {flat record hash, bank blob or nil}.
_READ_LUA = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
    return false
end
for i = 1, #fields, 2 do
    if fields[i] == 'bank_id' then
        return {fields, redis.call('HGET', ARGV[1] .. fields[i + 1], 'data')}
    end
end
return {fields, false}
"""


class RedisAdapterStore(AdapterStore):
    """Adapter store on a Redis server. Thread-safe: redis-py's client pools connections."""

    unavailable_errors = (redis.ConnectionError, redis.TimeoutError)

    def __init__(self, client: redis.Redis, *, prefix: str = "vbs") -> None:
        """client: must return bytes (`decode_responses=False`): bodies and banks are binary."""
        super().__init__()
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisAdapterStore needs a client with decode_responses=False")
        self.prefix = validate_key("prefix", prefix)
        self._redis = client
        self._put_script = client.register_script(_PUT_LUA)
        self._delete_script = client.register_script(_DELETE_LUA)
        self._read_script = client.register_script(_READ_LUA)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "vbs", timeout: float = 5.0) -> RedisAdapterStore:
        """Connect lazily to `redis://` or `rediss://` `url`; no I/O happens until first use.
        timeout: seconds for connecting and for each command."""
        client = redis.Redis.from_url(
            url, decode_responses=False, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        return cls(client, prefix=prefix)

    def __repr__(self) -> str:
        return f"RedisAdapterStore({self._redis!r}, prefix={self.prefix!r})"

    # -- keys ---------------------------------------------------------------------------

    def _tenant_key(self, tenant: str, suffix: str) -> str:
        return f"{self.prefix}:a:{{{tenant}}}:{suffix}"

    def _adapter_key(self, tenant: str, name: str) -> str:
        return self._tenant_key(tenant, f"n:{name}")

    def _bank_key_prefix(self) -> str:
        return f"{self.prefix}:b:"

    def _bank_key(self, bank_id: str) -> str:
        return self._bank_key_prefix() + bank_id

    # -- backend operations -------------------------------------------------------------

    def _put(
        self,
        tenant: str,
        name: str,
        expected_version: int | None,
        bank_id: str,
        config_json: str,
        body: bytes,
        bank: bytes,
        now: float,
        quota: StoreQuota,
    ) -> AdapterRecord:
        keys = [
            self._adapter_key(tenant, name),
            self._tenant_key(tenant, "versions"),
            self._tenant_key(tenant, "names"),
            self._tenant_key(tenant, "bytes"),
            self._bank_key(bank_id),
        ]
        expected = "" if expected_version is None else str(expected_version)
        limits = ["" if limit is None else str(limit) for limit in (quota.max_adapters, quota.max_bytes)]
        args = [name, expected, bank_id, config_json, body, b"", repr(now), self._bank_key_prefix(), *limits]
        reply = self._put_script(keys=keys, args=args)
        if reply[0] == b"need_bank":
            # Send the bank only when it is not stored yet: most puts reuse a stored bank.
            args[5] = bank
            reply = self._put_script(keys=keys, args=args)
        if reply[0] == b"conflict":
            raise VersionConflictError("version", f"expected version {expected_version}, stored version is {reply[1]}")
        if reply[0] == b"quota":
            raise quota_exceeded(reply[1].decode(), quota)
        _, version, created, bank_bytes = reply
        return AdapterRecord(
            tenant, name, version, bank_id, json.loads(config_json), len(body), bank_bytes, float(created), now
        )

    def _read(self, tenant: str, name: str) -> tuple[AdapterRecord, bytes, bytes]:
        reply = self._read_script(keys=[self._adapter_key(tenant, name)], args=[self._bank_key_prefix()])
        if reply is None:
            raise not_found(tenant, name)
        flat, bank = reply
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        record = _record(tenant, name, [fields.get(f) for f in _RECORD_FIELDS])
        if bank is None:  # refcounting should never allow this
            raise BankNotFoundError("bank_id", f"bank {record.bank_id!r} of {tenant}/{name} is missing")
        return record, fields[b"body"], bank

    def _get_record(self, tenant: str, name: str) -> AdapterRecord:
        values = self._redis.hmget(self._adapter_key(tenant, name), _RECORD_FIELDS)
        if values[0] is None:
            raise not_found(tenant, name)
        return _record(tenant, name, values)

    def _get_version(self, tenant: str, name: str) -> int | None:
        version = self._redis.hget(self._adapter_key(tenant, name), b"version")
        return None if version is None else int(version)

    def _list(self, tenant: str, after: str | None, limit: int) -> Records:
        low = b"(" + after.encode() if after else b"-"
        names = self._redis.zrangebylex(self._tenant_key(tenant, "names"), low, b"+", start=0, num=limit)
        pipe = self._redis.pipeline(transaction=False)
        for raw in names:
            pipe.hmget(self._adapter_key(tenant, raw.decode()), _RECORD_FIELDS)
        records = []
        for raw, values in zip(names, pipe.execute(), strict=True):
            if values[0] is not None:  # deleted between the two round trips
                records.append(_record(tenant, raw.decode(), values))
        return records

    def _count(self, tenant: str) -> tuple[int, int]:
        pipe = self._redis.pipeline(transaction=True)
        pipe.zcard(self._tenant_key(tenant, "names"))
        pipe.get(self._tenant_key(tenant, "bytes"))
        number, total = pipe.execute()
        return number, int(total or 0)

    def _delete(self, tenant: str, name: str) -> None:
        keys = [
            self._adapter_key(tenant, name),
            self._tenant_key(tenant, "names"),
            self._tenant_key(tenant, "bytes"),
        ]
        if not self._delete_script(keys=keys, args=[name, self._bank_key_prefix()]):
            raise not_found(tenant, name)

    def _get_bank(self, bank_id: str) -> bytes | None:
        return self._redis.hget(self._bank_key(bank_id), b"data")

    def _has_bank(self, bank_id: str) -> bool:
        return bool(self._redis.exists(self._bank_key(bank_id)))

    def _ping(self) -> None:
        self._redis.ping()

    def _close(self) -> None:
        self._redis.close()


def _record(tenant: str, name: str, values: list[bytes | None]) -> AdapterRecord:
    """Build a record from the values of `_RECORD_FIELDS`, in that order."""
    version, bank_id, config, body_bytes, bank_bytes, created, updated = values
    return AdapterRecord(
        tenant,
        name,
        int(version),
        bank_id.decode(),
        json.loads(config),
        int(body_bytes),
        int(bank_bytes),
        float(created),
        float(updated),
    )
