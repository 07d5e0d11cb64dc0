"""Tenants and their API keys, shared by every API replica: one `TenantRegistry`
interface, on Redis (beside the adapter store) or SQLite (the embedded default).

The registry is a handful of JSON documents (a tenant, a key) in two collections; the
logic lives once here and a backend only stores documents. Tenants are few and admin
writes rare, so listing scans a collection; the hot path, `authenticate`, is one lookup
by key id.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from abc import abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from vbserve.backends import (
    REDIS_UNAVAILABLE_ERRORS,
    Backend,
    BackendUnavailableError,
    FieldError,
    SQLiteDatabase,
    redis_client,
    validate_key,
)

from .keys import DEFAULT_PEPPER, hash_key, key_id_of, key_matches, new_key


class TenancyError(FieldError):
    """Like the store's and the trainer's errors: the field at fault, why, and a stable
    `kind` that the HTTP layer maps to a status."""


class TenantNotFoundError(TenancyError):
    kind = "not_found"


class TenantExistsError(TenancyError):
    kind = "conflict"


class RegistryUnavailableError(TenancyError, BackendUnavailableError):
    kind = "unavailable"


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's own limits; None = the server's default (`VBSERVE_TENANT_*`)."""

    max_adapters: int | None = None
    max_adapter_bytes: int | None = None
    requests_per_s: float | None = None
    max_concurrent_generations: int | None = None


@dataclass(frozen=True)
class Tenant:
    """incarnation: random, set when the tenant is created. A tenant deleted and created
    again under the same name is another incarnation: its keys, and writes that
    authenticated as the old one, never act for the new one (see `vbserve.tenancy.deletion`).
    Empty for tenants stored before incarnations existed."""

    name: str
    created: float
    limits: TenantLimits = field(default_factory=TenantLimits)
    incarnation: str = ""

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Tenant:
        return cls(doc["name"], doc["created"], TenantLimits(**doc["limits"]), doc.get("incarnation", ""))


@dataclass(frozen=True)
class ApiKey:
    """A stored key: never the key itself, only its hash. `incarnation`: the tenant's
    when the key was made; the key works only for that incarnation."""

    key_id: str
    tenant: str
    key_hash: str
    created: float
    description: str = ""
    revoked: float | None = None
    incarnation: str = ""

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ApiKey:
        return cls(**doc)


# Stale-on-outage for authentication. While the registry cannot be reached, a key that
# authenticated here within the last OUTAGE_GRACE_S still authenticates (for the tenant
# and limits it had then), so requests the server can answer from memory (an adapter
# already composed, the base model) keep being served through a short Redis outage.
# Only hashes of keys are remembered, at most OUTAGE_CACHE_KEYS of them; the entry is
# consulted only when the registry is down (a revocation needs the registry up, and the
# first successful lookup after it forgets the key), and dropped as soon as a lookup
# answers that the key is no longer valid.
OUTAGE_GRACE_S = 300.0
OUTAGE_CACHE_KEYS = 10_000


class TenantRegistry(Backend):
    """Thread-safe. Every method may raise `RegistryUnavailableError`. The circuit breaker
    of `Backend` makes authentication fall back at once, while the backend hangs, to the
    keys confirmed before the outage, not after 5 s."""

    backend = "tenants"
    description = "tenant registry"
    unavailable_error = RegistryUnavailableError

    def __init__(self, pepper: bytes | None = None) -> None:
        super().__init__()
        self._pepper = pepper or DEFAULT_PEPPER
        self._confirmed: OrderedDict[str, tuple[Tenant, float]] = OrderedDict()  # key hash -> (tenant, when)
        self._confirmed_lock = threading.Lock()

    # -- tenants -----------------------------------------------------------------------

    def create_tenant(self, name: str, limits: TenantLimits | None = None) -> Tenant:
        validate_key("name", name)
        tenant = Tenant(name, time.time(), limits or TenantLimits(), uuid.uuid4().hex)
        with self._guard():
            if not self._insert("tenant", name, _dump(tenant)):
                raise TenantExistsError("name", f"tenant {name!r} already exists")
        return tenant

    def get_tenant(self, name: str) -> Tenant:
        validate_key("name", name)
        with self._guard():
            doc = self._get("tenant", name)
        if doc is None:
            raise TenantNotFoundError("name", f"no tenant {name!r}")
        return Tenant.from_json(json.loads(doc))

    def list_tenants(self) -> list[Tenant]:
        with self._guard():
            docs = self._all("tenant")
        return sorted((Tenant.from_json(json.loads(d)) for d in docs), key=lambda t: t.name)

    def set_limits(self, name: str, limits: TenantLimits) -> Tenant:
        tenant = replace(self.get_tenant(name), limits=limits)
        with self._guard():
            self._set("tenant", name, _dump(tenant))
        return tenant

    def is_current(self, name: str, incarnation: str) -> bool:
        """Whether the tenant `name` still exists as the incarnation a request authenticated
        as: False once it was deleted, also if it was created again since."""
        try:
            return self.get_tenant(name).incarnation == incarnation
        except TenantNotFoundError:
            return False

    def delete_tenant(self, name: str) -> None:
        """Remove the tenant; its keys stop working at once (authentication checks that the
        tenant exists, as the key's incarnation) and are removed, so a tenant created again
        under the name lists none of them. Its adapters and jobs are the caller's to
        delete (`vbserve.tenancy.deletion.delete_tenant` does all of it)."""
        validate_key("name", name)
        with self._guard():
            if not self._remove("tenant", name):
                raise TenantNotFoundError("name", f"no tenant {name!r}")
        for key in self.list_keys(name):
            with self._guard():
                self._remove("key", key.key_id)
            self._forget(key)

    # -- keys ---------------------------------------------------------------------------

    def create_key(self, tenant: str, description: str = "") -> tuple[ApiKey, str]:
        """A new key for `tenant`: its record and the key itself, which is not stored."""
        incarnation = self.get_tenant(tenant).incarnation
        key_id, key = new_key()
        record = ApiKey(key_id, tenant, hash_key(key, self._pepper), time.time(), description, None, incarnation)
        with self._guard():
            if not self._insert("key", key_id, _dump(record)):  # 48 random bits collided
                raise RegistryUnavailableError("key_id", "key id collision, try again")
        return record, key

    def list_keys(self, tenant: str, *, include_revoked: bool = True) -> list[ApiKey]:
        with self._guard():
            docs = self._all("key")
        keys = (ApiKey.from_json(json.loads(d)) for d in docs)
        return sorted(
            (k for k in keys if k.tenant == tenant and (include_revoked or k.revoked is None)), key=lambda k: k.created
        )

    def revoke_key(self, tenant: str, key_id: str) -> ApiKey:
        key = self._get_key(key_id)
        if key is None or key.tenant != tenant:
            raise TenantNotFoundError("key_id", f"tenant {tenant!r} has no key {key_id!r}")
        return key if key.revoked is not None else self._revoke(key)

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant a presented key belongs to, or None for a malformed, unknown, wrong or
        revoked key, or one whose tenant is gone. While the registry is unreachable, a key
        confirmed within `OUTAGE_GRACE_S` still answers its tenant (see above); any other
        key raises `RegistryUnavailableError`."""
        key_id = key_id_of(key)
        if key_id is None:
            return None
        digest = hash_key(key, self._pepper)
        try:
            tenant = self._lookup(key, key_id)
        except RegistryUnavailableError:
            with self._confirmed_lock:
                tenant, when = self._confirmed.get(digest, (None, 0.0))
            if tenant is None or time.monotonic() - when > OUTAGE_GRACE_S:
                raise
            return tenant
        with self._confirmed_lock:
            if tenant is None:
                self._confirmed.pop(digest, None)
            else:
                self._confirmed[digest] = (tenant, time.monotonic())
                self._confirmed.move_to_end(digest)
                if len(self._confirmed) > OUTAGE_CACHE_KEYS:
                    self._confirmed.popitem(last=False)
        return tenant

    def _lookup(self, key: str, key_id: str) -> Tenant | None:
        record = self._get_key(key_id)
        if record is None or record.revoked is not None or not key_matches(key, record.key_hash, self._pepper):
            return None
        try:
            tenant = self.get_tenant(record.tenant)
        except TenantNotFoundError:
            return None
        # A key left over from a deleted incarnation of the name (its delete still
        # removing keys) must not act for the new tenant.
        return tenant if tenant.incarnation == record.incarnation else None

    def _get_key(self, key_id: str) -> ApiKey | None:
        with self._guard():
            doc = self._get("key", key_id)
        return None if doc is None else ApiKey.from_json(json.loads(doc))

    def _revoke(self, key: ApiKey) -> ApiKey:
        revoked = replace(key, revoked=time.time())
        with self._guard():
            self._set("key", key.key_id, _dump(revoked))
        self._forget(key)
        return revoked

    def _forget(self, key: ApiKey) -> None:
        with self._confirmed_lock:  # not even an outage may bring it back
            self._confirmed.pop(key.key_hash, None)

    # -- what a backend implements: documents (JSON text) by collection and id ----------

    def _ping(self) -> None:
        self._get("tenant", "-")

    @abstractmethod
    def _insert(self, collection: str, doc_id: str, doc: str) -> bool:
        """Store the document only if the id is absent; True if stored."""

    @abstractmethod
    def _set(self, collection: str, doc_id: str, doc: str) -> None: ...

    @abstractmethod
    def _get(self, collection: str, doc_id: str) -> str | None: ...

    @abstractmethod
    def _all(self, collection: str) -> list[str]: ...

    @abstractmethod
    def _remove(self, collection: str, doc_id: str) -> bool:
        """Delete the document; True if it existed."""


def _dump(record: Tenant | ApiKey) -> str:
    return json.dumps(asdict(record), separators=(",", ":"))


class RedisTenantRegistry(TenantRegistry):
    """One Redis hash per collection. Both share the hash tag `{tenancy}`, so they sit in
    one slot of a Redis Cluster."""

    unavailable_errors = REDIS_UNAVAILABLE_ERRORS

    def __init__(self, client: redis.Redis | RedisCluster, *, prefix: str = "vbs", pepper: bytes | None = None) -> None:
        super().__init__(pepper)
        self._redis = client
        self._prefix = validate_key("prefix", prefix)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "vbs", pepper: bytes | None = None) -> RedisTenantRegistry:
        """`redis://`/`rediss://`, or `redis+cluster://`/`rediss+cluster://` for a Redis
        Cluster (all registry keys share the hash tag `{tenancy}`: one slot)."""
        options = {"decode_responses": True, "socket_timeout": 5.0, "socket_connect_timeout": 5.0}
        return cls(redis_client(url, **options), prefix=prefix, pepper=pepper)

    def _key(self, collection: str) -> str:
        return f"{self._prefix}:{{tenancy}}:{collection}"

    def _insert(self, collection: str, doc_id: str, doc: str) -> bool:
        return bool(self._redis.hsetnx(self._key(collection), doc_id, doc))

    def _set(self, collection: str, doc_id: str, doc: str) -> None:
        self._redis.hset(self._key(collection), doc_id, doc)

    def _get(self, collection: str, doc_id: str) -> str | None:
        return self._redis.hget(self._key(collection), doc_id)

    def _all(self, collection: str) -> list[str]:
        return self._redis.hvals(self._key(collection))

    def _remove(self, collection: str, doc_id: str) -> bool:
        return bool(self._redis.hdel(self._key(collection), doc_id))

    def _close(self) -> None:
        self._redis.close()


class SQLiteTenantRegistry(TenantRegistry):
    unavailable_errors = (sqlite3.OperationalError,)
    SCHEMA = """
    CREATE TABLE IF NOT EXISTS documents (
        collection TEXT NOT NULL,
        id TEXT NOT NULL,
        doc TEXT NOT NULL,
        PRIMARY KEY (collection, id)
    )
    """

    def __init__(self, path: str | Path, *, pepper: bytes | None = None) -> None:
        super().__init__(pepper)
        with self._guard():
            self._db = SQLiteDatabase(path, self.SCHEMA)

    def _insert(self, collection: str, doc_id: str, doc: str) -> bool:
        with self._db.write() as conn:
            cursor = conn.execute(
                "INSERT INTO documents VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (collection, doc_id, doc)
            )
            return cursor.rowcount == 1

    def _set(self, collection: str, doc_id: str, doc: str) -> None:
        with self._db.write() as conn:
            conn.execute(
                "INSERT INTO documents VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET doc = excluded.doc",
                (collection, doc_id, doc),
            )

    def _get(self, collection: str, doc_id: str) -> str | None:
        row = (
            self._db.conn()
            .execute("SELECT doc FROM documents WHERE collection = ? AND id = ?", (collection, doc_id))
            .fetchone()
        )
        return row[0] if row else None

    def _all(self, collection: str) -> list[str]:
        rows = self._db.conn().execute("SELECT doc FROM documents WHERE collection = ?", (collection,)).fetchall()
        return [row[0] for row in rows]

    def _remove(self, collection: str, doc_id: str) -> bool:
        with self._db.write() as conn:
            cursor = conn.execute("DELETE FROM documents WHERE collection = ? AND id = ?", (collection, doc_id))
            return cursor.rowcount == 1

    def _close(self) -> None:
        self._db.close()
