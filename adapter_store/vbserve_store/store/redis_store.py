"""The production store: Redis or Redis Cluster, tenant-namespaced keys, atomic publish of
each version.

Keys (`p` is the configurable prefix; `{tenant}` in braces is a Redis Cluster hash tag,
so all keys of one tenant share a slot):

    p:a:{tenant}:n:<name>   hash: version, bank_id, bank_ref, config, body, body_bytes, bank_bytes, created, updated
    p:a:{tenant}:versions   hash: name -> last version ever given (survives delete)
    p:a:{tenant}:names      sorted set, all scores 0: names in byte order, for paging
    p:a:{tenant}:bytes      integer: sum of stored_bytes of the tenant's adapters
    p:a:{tenant}:banks      hash: bank_id -> how many of the tenant's adapters use it (the
                            index behind `tenant_uses_bank`: one HEXISTS, whatever the
                            number of adapters; kept by the same scripts as the records)
    p:b:<bank_id>           hash: data (encode_bank blob), and one field per reference,
                            r:<tenant>/<name>/<token> -> server time (ms) it was taken

Banks are content addressed and global: one copy serves every tenant that uses it, and
`get_bank(bank_id)` needs no tenant. So a bank key hashes to another cluster slot than
the adapter keys, and Redis Cluster refuses a script that touches both. Every script
here therefore touches one slot: the tenant's keys, or one bank key. Keeping a copy of
each bank per tenant in the tenant's slot would have made every operation one script,
but it breaks the interface (`get_bank`/`has_bank` take no tenant, and would need a
global index: cross-slot again) and stores a 32 KiB float16 bank (SmolLM2 q,v, b=64,
h=256) once per tenant instead of once. The two-phase design below keeps banks global
and runs unchanged on a single node, so there is one code path for both.

A put takes three steps, each one atomic script:

1. bank slot: store the bank if new and add a reference field for this put (a random
   token), whose value is when it was taken;
2. tenant slot: check the version and the quota, then publish body + record, naming the
   bank and the reference (`bank_ref`); refuse if the reference is older than
   `ref_timeout_s` (see garbage collection);
3. bank slots: drop the reference of the version just replaced, or on a refused put the
   one taken in step 1.

A delete is step 2 (remove the record) then step 3. A reference is always taken before
the record that names it is published and dropped only after that record is gone, so a
published adapter's bank is never freed under it. A crash or a lost connection between
steps can leave a reference that no record names: storage, never a missing bank.
`collect_garbage()` drops such references once they are older than twice
`ref_timeout_s` (a margin for clock skew between cluster nodes): step 2 refuses a
reference that old, so no record can come to name it afterwards.

A bank whose last reference is dropped is not deleted at once: it expires after
`bank_grace_s`. `get` reads the record (one HGETALL: one instant) and then the bank,
two round trips that a writer can fall between, replacing the version and dropping its
bank; the grace period keeps that bank readable for such a reader, who thus gets the
old version whole (never a mix, never a missing bank). Retrying a reader on a miss
instead starves it on a name rewritten continuously (measured: 8 writers on one name
beat 8 retries). A bank without references counts as absent (`has_bank`, `get_bank`)
and a put of the same bank revives it.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script

from vbserve.backends import REDIS_UNAVAILABLE_ERRORS, redis_client

from ..errors import BankNotFoundError, StoreUnavailableError, VersionConflictError
from .base import (
    Adapter,
    AdapterRecord,
    AdapterStore,
    Records,
    StoreQuota,
    check_key,
    encode_for_store,
    not_found,
    quota_exceeded,
)

log = logging.getLogger(__name__)

_RECORD_FIELDS = (b"version", b"bank_id", b"config", b"body_bytes", b"bank_bytes", b"created", b"updated")

_NOW_MS_LUA = """
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Step 1. KEYS: bank hash. ARGV: reference field, bank blob ('' = only if the bank is
# stored already: the script then answers 'need_bank' when it is not).
# Returns {'ok', stored blob length, time the reference was taken (ms)}.
_REF_BANK_LUA = (
    _NOW_MS_LUA
    + """
if redis.call('HEXISTS', KEYS[1], 'data') == 0 then
    if ARGV[2] == '' then
        return {'need_bank'}
    end
    redis.call('HSET', KEYS[1], 'data', ARGV[2])
end
local taken = now_ms()
redis.call('HSET', KEYS[1], ARGV[1], taken)
redis.call('PERSIST', KEYS[1])  -- it may be an unreferenced bank waiting out its grace period
return {'ok', redis.call('HSTRLEN', KEYS[1], 'data'), taken}
"""
)

# Step 2. KEYS: adapter hash, versions hash, names zset, bytes counter, banks-in-use hash.
# ARGV: name, expected version ('' = unconditional), bank_id, bank reference field,
#       config JSON, body, bank blob length, now (unix s), reference time (ms, '' = no
#       bank: a LoRA adapter), reference timeout (ms), max adapters ('' = no limit), max
#       bytes ('' = no limit).
# Every check comes before the first write, so a refused put changes nothing. Returns
# {'ok', version, created, replaced bank_id or nil, replaced reference or nil}.
_PUT_LUA = (
    _NOW_MS_LUA
    + """
local name = ARGV[1]
local cur = redis.call('HMGET', KEYS[1], 'version', 'bank_id', 'bank_ref', 'body_bytes', 'bank_bytes', 'created')
local cur_version = tonumber(cur[1]) or 0
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= cur_version then
    return {'conflict', cur_version}
end
if ARGV[9] ~= '' and now_ms() - tonumber(ARGV[9]) > tonumber(ARGV[10]) then
    return {'stale_ref'}
end
local delta = string.len(ARGV[6]) + tonumber(ARGV[7])
if cur[1] then
    delta = delta - tonumber(cur[4]) - tonumber(cur[5])
elseif ARGV[11] ~= '' and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[11]) then
    return {'quota', 'adapters'}
end
if ARGV[12] ~= '' and delta > 0 and (tonumber(redis.call('GET', KEYS[4])) or 0) + delta > tonumber(ARGV[12]) then
    return {'quota', 'bytes'}
end
local created = cur[6] or ARGV[8]
local version = math.max(tonumber(redis.call('HGET', KEYS[2], name)) or 0, cur_version) + 1
redis.call('HSET', KEYS[2], name, version)
redis.call('HSET', KEYS[1], 'version', version, 'bank_id', ARGV[3], 'bank_ref', ARGV[4], 'config', ARGV[5],
           'body', ARGV[6], 'body_bytes', string.len(ARGV[6]), 'bank_bytes', ARGV[7], 'created', created,
           'updated', ARGV[8])
redis.call('ZADD', KEYS[3], 0, name)
redis.call('INCRBY', KEYS[4], delta)
-- The new bank's use first: a replacement with the same bank never drops it from the index.
if ARGV[3] ~= '' then
    redis.call('HINCRBY', KEYS[5], ARGV[3], 1)
end
if cur[2] and cur[2] ~= '' and redis.call('HINCRBY', KEYS[5], cur[2], -1) <= 0 then
    redis.call('HDEL', KEYS[5], cur[2])
end
return {'ok', version, created, cur[2], cur[3]}
"""
)

# Step 2 of a delete. KEYS: adapter hash, names zset, bytes counter, banks-in-use hash. ARGV: name.
# Returns false if absent, else {bank_id, reference} to drop.
_DELETE_LUA = """
local cur = redis.call('HMGET', KEYS[1], 'bank_id', 'bank_ref', 'body_bytes', 'bank_bytes')
if not cur[1] then
    return false
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[3])
else
    redis.call('DECRBY', KEYS[3], tonumber(cur[3]) + tonumber(cur[4]))
end
if cur[1] ~= '' and redis.call('HINCRBY', KEYS[4], cur[1], -1) <= 0 then
    redis.call('HDEL', KEYS[4], cur[1])
end
return {cur[1], cur[2]}
"""

# Step 3. KEYS: bank hash. ARGV: reference field, grace period (ms). Returns 1 if the
# reference was there (0: already dropped, e.g. by both a put and garbage collection).
_RELEASE_LUA = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
    return 0
end
if redis.call('HLEN', KEYS[1]) <= 1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

# KEYS: bank hash. The blob if the bank has a reference (is not waiting to expire).
_LIVE_BANK_LUA = """
if redis.call('HLEN', KEYS[1]) > 1 then
    return redis.call('HGET', KEYS[1], 'data')
end
return false
"""

# KEYS: names zset, bytes counter: both counts from one instant.
_COUNT_LUA = """
return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[2])) or 0}
"""


class RedisAdapterStore(AdapterStore):
    """Adapter store on a Redis server or cluster. Thread-safe: redis-py pools connections."""

    unavailable_errors = REDIS_UNAVAILABLE_ERRORS

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        prefix: str = "vbs",
        bank_grace_s: float = 60.0,
        ref_timeout_s: float = 60.0,
    ) -> None:
        """client: must return bytes (`decode_responses=False`): bodies and banks are binary.
        bank_grace_s: how long an unreferenced bank stays readable for in-flight `get`s.
        ref_timeout_s: the longest a put may take between its first and second step."""
        super().__init__()
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisAdapterStore needs a client with decode_responses=False")
        self.prefix = check_key("prefix", prefix)
        self._redis = client
        self._grace_ms = max(1, round(bank_grace_s * 1000))
        self._ref_timeout_ms = max(1, round(ref_timeout_s * 1000))
        self._ref_bank_script = client.register_script(_REF_BANK_LUA)
        self._put_script = client.register_script(_PUT_LUA)
        self._delete_script = client.register_script(_DELETE_LUA)
        self._release_script = client.register_script(_RELEASE_LUA)
        self._live_bank_script = client.register_script(_LIVE_BANK_LUA)
        self._count_script = client.register_script(_COUNT_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "vbs",
        timeout: float = 5.0,
        bank_grace_s: float = 60.0,
        ref_timeout_s: float = 60.0,
    ) -> RedisAdapterStore:
        """`redis://` or `rediss://`: one server (or a primary), connected lazily: no I/O
        until first use. `redis+cluster://host:port` or `rediss+cluster://`: a Redis
        Cluster, found from that one node; connected at once, to learn the slot map
        (`StoreUnavailableError` if no node answers). timeout: seconds for connecting and
        for each command."""
        options = {"decode_responses": False, "socket_timeout": timeout, "socket_connect_timeout": timeout}
        return cls(
            redis_client(url, error=StoreUnavailableError, **options),
            prefix=prefix,
            bank_grace_s=bank_grace_s,
            ref_timeout_s=ref_timeout_s,
        )

    def __repr__(self) -> str:
        return f"RedisAdapterStore({self._redis!r}, prefix={self.prefix!r})"

    # -- keys ---------------------------------------------------------------------------

    def _tenant_key(self, tenant: str, suffix: str) -> str:
        return f"{self.prefix}:a:{{{tenant}}}:{suffix}"

    def _adapter_key(self, tenant: str, name: str) -> str:
        return self._tenant_key(tenant, f"n:{name}")

    def _bank_key(self, bank_id: str) -> str:
        return f"{self.prefix}:b:{bank_id}"

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
        put = _Put(name, expected_version, bank_id, config_json, body, bank)
        [(reply, bank_bytes)] = self._publish(tenant, [put], now, quota)
        if reply[0] == b"conflict":
            raise VersionConflictError("version", f"expected version {expected_version}, stored version is {reply[1]}")
        if reply[0] == b"quota":
            raise quota_exceeded(reply[1].decode(), quota)
        return _published(tenant, put, reply, bank_bytes, now)

    def put_many(self, tenant: str, adapters: Mapping[str, Adapter]) -> list[AdapterRecord]:
        """Publish each adapter as the next version of its name, unconditionally and with
        no quota: a bulk import (moving adapters over from another store, loading a
        benchmark). Each adapter is published atomically, as by `put`; the steps of all
        of them are pipelined, so the batch costs a few round trips instead of three per
        adapter (except on a cluster, whose client cannot pipeline scripts)."""
        check_key("tenant", tenant)
        puts = []
        for name, adapter in adapters.items():
            check_key("name", name)
            puts.append(_Put(name, None, *encode_for_store(adapter)))
        now = time.time()
        with self._guard("put_many"):
            replies = self._publish(tenant, puts, now, StoreQuota())
        return [
            _published(tenant, put, reply, bank_bytes, now)
            for put, (reply, bank_bytes) in zip(puts, replies, strict=True)
        ]

    def _publish(self, tenant: str, puts: list[_Put], now: float, quota: StoreQuota) -> list[tuple[list, int]]:
        """Steps 1 to 3 of each put, each step for all puts at once. Returns each put's
        step 2 reply and the stored length of its bank. A put that stalled past the
        reference timeout raises `StoreUnavailableError` (after the others are done)."""
        # Tenants and names cannot contain '/' (validate_key), so the field parses back.
        refs = [f"r:{tenant}/{put.name}/{secrets.token_hex(8)}" if put.bank_id else "" for put in puts]
        bank_keys = [self._bank_key(put.bank_id) for put in puts]
        banked = [i for i, put in enumerate(puts) if put.bank_id]  # a LoRA adapter has no bank
        taken: list = [[b"ok", 0, ""] for _ in puts]  # step 1's reply, as if for an empty bank
        referenced = self._run(self._ref_bank_script, [([bank_keys[i]], [refs[i], b""]) for i in banked])
        # Send a bank only when it is not stored yet: most puts reuse a stored bank.
        missing = [i for i, reply in zip(banked, referenced, strict=True) if reply[0] == b"need_bank"]
        resent = self._run(self._ref_bank_script, [([bank_keys[i]], [refs[i], puts[i].bank]) for i in missing])
        for i, reply in [*zip(banked, referenced, strict=True), *zip(missing, resent, strict=True)]:
            taken[i] = reply
        calls = []
        for put, ref, (_, bank_bytes, taken_ms) in zip(puts, refs, taken, strict=True):
            keys = [self._adapter_key(tenant, put.name)] + [
                self._tenant_key(tenant, suffix) for suffix in ("versions", "names", "bytes", "banks")
            ]
            expected = "" if put.expected_version is None else str(put.expected_version)
            args = [put.name, expected, put.bank_id, ref, put.config_json, put.body, bank_bytes, repr(now)]
            args += [taken_ms, self._ref_timeout_ms]
            args += ["" if limit is None else str(limit) for limit in (quota.max_adapters, quota.max_bytes)]
            calls.append((keys, args))
        # If this raises, an adapter may or may not name its reference now: keep them all
        # (collect_garbage drops the unused ones) rather than risk freeing a published bank.
        replies = self._run(self._put_script, calls)
        releases = []
        for put, ref, reply in zip(puts, refs, replies, strict=True):
            if reply[0] != b"ok":
                if put.bank_id:
                    releases.append((put.bank_id, ref))  # refused: drop the reference step 1 took
            elif reply[3]:  # nil for a new name, b"" for a replaced LoRA adapter (no bank)
                releases.append((reply[3].decode(), reply[4]))  # the replaced version's
        self._release(releases)
        if any(reply[0] == b"stale_ref" for reply in replies):
            raise StoreUnavailableError("store", "a put stalled between its steps for too long; retry")
        return [(reply, t[1]) for reply, t in zip(replies, taken, strict=True)]

    def _run(self, script: Script, calls: list[tuple[list[str], list]]) -> list:
        """Run `script` once per (keys, args): in one round trip on a single server; one
        by one on a cluster, whose client refuses scripts in a pipeline."""
        if len(calls) <= 1 or isinstance(self._redis, RedisCluster):
            return [script(keys=keys, args=args) for keys, args in calls]
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in calls:
            script(keys=keys, args=args, client=pipe)
        return pipe.execute()

    def _release(self, references: list[tuple[str, str | bytes]]) -> int:
        """Drop references on banks (step 3): (bank_id, reference field) pairs. Returns
        how many were still there. The operation this cleans up after has already
        succeeded or been refused, so a failure here is logged, not raised: it leaves
        references that `collect_garbage` drops later."""
        calls = [([self._bank_key(bank_id)], [ref, self._grace_ms]) for bank_id, ref in references]
        try:
            return sum(self._run(self._release_script, calls))
        except self.unavailable_errors as exc:
            log.warning("could not drop %d bank references (collect_garbage will): %s", len(calls), exc)
            return 0

    def _read(self, tenant: str, name: str) -> tuple[AdapterRecord, bytes, bytes]:
        key = self._adapter_key(tenant, name)
        # A reader that stalls between its two reads for longer than the grace period may
        # find the bank of a version replaced meanwhile gone; it then reads the then
        # current version once more. A second miss is a bank that really is missing.
        for _ in range(2):
            fields = self._redis.hgetall(key)
            if not fields:
                raise not_found(tenant, name)
            record = _record(tenant, name, [fields.get(f) for f in _RECORD_FIELDS])
            if not record.bank_id:  # a LoRA adapter: its body is all of it
                return record, fields[b"body"], b""
            bank = self._redis.hget(self._bank_key(record.bank_id), b"data")
            if bank is not None:
                return record, fields[b"body"], bank
        raise BankNotFoundError("bank_id", f"bank {record.bank_id!r} of {tenant}/{name} is missing")

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
        number, total = self._count_script(keys=[self._tenant_key(tenant, "names"), self._tenant_key(tenant, "bytes")])
        return number, total

    def _delete(self, tenant: str, name: str) -> None:
        keys = [
            self._adapter_key(tenant, name),
            self._tenant_key(tenant, "names"),
            self._tenant_key(tenant, "bytes"),
            self._tenant_key(tenant, "banks"),
        ]
        reply = self._delete_script(keys=keys, args=[name])
        if reply is None:
            raise not_found(tenant, name)
        bank_id, ref = reply
        if bank_id:
            self._release([(bank_id.decode(), ref)])

    def _tenant_uses_bank(self, tenant: str, bank_id: str) -> bool:
        return bool(self._redis.hexists(self._tenant_key(tenant, "banks"), bank_id))

    def _get_bank(self, bank_id: str) -> bytes | None:
        return self._live_bank_script(keys=[self._bank_key(bank_id)])

    def _has_bank(self, bank_id: str) -> bool:
        return self._redis.hlen(self._bank_key(bank_id)) > 1

    def _ping(self) -> None:
        self._redis.ping()

    def _close(self) -> None:
        self._redis.close()

    # -- maintenance --------------------------------------------------------------------

    def collect_garbage(self) -> int:
        """Drop bank references that no adapter names: left by a process that died, or
        lost its connection, in the middle of a put or delete. Banks left without any
        reference then expire. Safe at any time, from any process; it walks every bank
        (SCAN, on every node of a cluster), so run it now and then, not per request.
        Returns the number of references dropped."""
        with self._guard("collect_garbage"):
            oldest_ms = _server_time_ms(self._redis) - 2 * self._ref_timeout_ms
            dropped = 0
            for bank_key in self._redis.scan_iter(match=self._bank_key("*"), count=1000):
                for field, taken_ms in self._redis.hscan_iter(bank_key, match="r:*", count=1000):
                    if int(taken_ms) > oldest_ms:
                        continue  # its put may still be between steps 1 and 2
                    tenant, name, _ = field[2:].decode().split("/")
                    if self._redis.hget(self._adapter_key(tenant, name), b"bank_ref") != field:
                        bank_id = bank_key.decode().removeprefix(self._bank_key(""))
                        dropped += self._release([(bank_id, field)])
            return dropped


@dataclass(frozen=True)
class _Put:
    """One adapter version to publish, encoded."""

    name: str
    expected_version: int | None
    bank_id: str
    config_json: str
    body: bytes
    bank: bytes


def _published(tenant: str, put: _Put, reply: list, bank_bytes: int, now: float) -> AdapterRecord:
    """The record of a put whose step 2 replied {'ok', version, created, ...}."""
    _, version, created, *_ = reply
    return AdapterRecord(
        tenant,
        put.name,
        version,
        put.bank_id,
        json.loads(put.config_json),
        len(put.body),
        bank_bytes,
        float(created),
        now,
    )


def _server_time_ms(client: redis.Redis | RedisCluster) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


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
