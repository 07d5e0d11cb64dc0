"""The embedded store: one SQLite file, so a machine with no Redis still serves.

Connections and write transactions come from `vbserve.backends.sqlite_db` (WAL, a connection
per thread, `BEGIN IMMEDIATE` writes); every read is one SQL statement, so it sees one
committed version.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from vbserve.backends import SQLiteDatabase

from ..errors import VersionConflictError
from .base import AdapterRecord, AdapterStore, Records, StoreQuota, not_found, quota_exceeded

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    bank_id TEXT NOT NULL,
    config_json TEXT NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
-- "Does this tenant use bank X" (may it read the bank, reference it in an upload) is one
-- index lookup, whatever the number of the tenant's adapters.
CREATE INDEX IF NOT EXISTS adapters_by_bank ON adapters (tenant, bank_id);
-- Survives delete, so a re-put name continues from a higher version.
CREATE TABLE IF NOT EXISTS versions (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    last_version INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS banks (
    bank_id TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    refcount INTEGER NOT NULL
);
"""

# length() of a BLOB reads its size from the row header, not the blob itself.
_RECORD_COLUMNS = (
    "a.version, a.bank_id, a.config_json, length(a.body), coalesce(length(b.data), 0), a.created, a.updated"
)
_RECORD_FROM = "adapters a LEFT JOIN banks b ON b.bank_id = a.bank_id"


class SQLiteAdapterStore(AdapterStore):
    """Adapter store in a local SQLite file (created with its parent folder if missing)."""

    unavailable_errors = (sqlite3.OperationalError,)

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        """timeout: seconds a write waits for another writer's lock before giving up."""
        super().__init__()
        self.path = Path(path)
        with self._guard("open"):
            self._db = SQLiteDatabase(self.path, SCHEMA, timeout=timeout)

    def __repr__(self) -> str:
        return f"SQLiteAdapterStore({str(self.path)!r})"

    # -- backend operations -----------------------------------------------------------

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
        with self._db.write() as conn:
            current = conn.execute(
                f"SELECT a.version, a.bank_id, a.created, length(a.body) + coalesce(length(b.data), 0) "
                f"FROM {_RECORD_FROM} WHERE a.tenant = ? AND a.name = ?",
                (tenant, name),
            ).fetchone()
            current_version = current[0] if current else 0
            if expected_version is not None and expected_version != current_version:
                raise VersionConflictError(
                    "version", f"expected version {expected_version}, stored version is {current_version}"
                )
            _check_quota(conn, tenant, quota, replaced_bytes=current[3] if current else None, body=body, bank=bank)
            row = conn.execute(
                "SELECT last_version FROM versions WHERE tenant = ? AND name = ?", (tenant, name)
            ).fetchone()
            version = max(row[0] if row else 0, current_version) + 1
            # Take the new reference before releasing the old one: they may be the same bank.
            if bank_id:
                conn.execute(
                    "INSERT INTO banks (bank_id, data, refcount) VALUES (?, ?, 1) "
                    "ON CONFLICT (bank_id) DO UPDATE SET refcount = refcount + 1",
                    (bank_id, bank),
                )
            if current and current[1]:
                _release_bank(conn, current[1])
            created = current[2] if current else now
            conn.execute(
                "INSERT INTO adapters (tenant, name, version, bank_id, config_json, body, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, name) DO UPDATE SET "
                "version = excluded.version, bank_id = excluded.bank_id, config_json = excluded.config_json, "
                "body = excluded.body, updated = excluded.updated",
                (tenant, name, version, bank_id, config_json, body, created, now),
            )
            conn.execute(
                "INSERT INTO versions (tenant, name, last_version) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant, name) DO UPDATE SET last_version = excluded.last_version",
                (tenant, name, version),
            )
            row = conn.execute("SELECT length(data) FROM banks WHERE bank_id = ?", (bank_id,)).fetchone()
            bank_bytes = row[0] if row else 0
        return AdapterRecord(
            tenant, name, version, bank_id, json.loads(config_json), len(body), bank_bytes, created, now
        )

    def _read(self, tenant: str, name: str) -> tuple[AdapterRecord, bytes, bytes]:
        # One statement reads record, body and bank from one committed state.
        row = (
            self._db.conn()
            .execute(
                f"SELECT {_RECORD_COLUMNS}, a.body, b.data FROM {_RECORD_FROM} WHERE a.tenant = ? AND a.name = ?",
                (tenant, name),
            )
            .fetchone()
        )
        if row is None:
            raise not_found(tenant, name)
        return _record(tenant, name, row), row[-2], row[-1] or b""

    def _get_record(self, tenant: str, name: str) -> AdapterRecord:
        row = (
            self._db.conn()
            .execute(f"SELECT {_RECORD_COLUMNS} FROM {_RECORD_FROM} WHERE a.tenant = ? AND a.name = ?", (tenant, name))
            .fetchone()
        )
        if row is None:
            raise not_found(tenant, name)
        return _record(tenant, name, row)

    def _get_version(self, tenant: str, name: str) -> int | None:
        row = (
            self._db.conn()
            .execute("SELECT version FROM adapters WHERE tenant = ? AND name = ?", (tenant, name))
            .fetchone()
        )
        return row[0] if row else None

    def _list(self, tenant: str, after: str | None, limit: int) -> Records:
        rows = (
            self._db.conn()
            .execute(
                f"SELECT a.name, {_RECORD_COLUMNS} FROM {_RECORD_FROM} "
                "WHERE a.tenant = ? AND a.name > ? ORDER BY a.name LIMIT ?",
                (tenant, after or "", limit),
            )
            .fetchall()
        )
        return [_record(tenant, row[0], row[1:]) for row in rows]

    def _count(self, tenant: str) -> tuple[int, int]:
        return _tenant_usage(self._db.conn(), tenant)

    def _delete(self, tenant: str, name: str) -> None:
        with self._db.write() as conn:
            row = conn.execute("SELECT bank_id FROM adapters WHERE tenant = ? AND name = ?", (tenant, name)).fetchone()
            if row is None:
                raise not_found(tenant, name)
            conn.execute("DELETE FROM adapters WHERE tenant = ? AND name = ?", (tenant, name))
            if row[0]:
                _release_bank(conn, row[0])

    def _tenant_uses_bank(self, tenant: str, bank_id: str) -> bool:
        query = "SELECT 1 FROM adapters WHERE tenant = ? AND bank_id = ? LIMIT 1"
        return self._db.conn().execute(query, (tenant, bank_id)).fetchone() is not None

    def _get_bank(self, bank_id: str) -> bytes | None:
        row = self._db.conn().execute("SELECT data FROM banks WHERE bank_id = ?", (bank_id,)).fetchone()
        return row[0] if row else None

    def _has_bank(self, bank_id: str) -> bool:
        return self._db.conn().execute("SELECT 1 FROM banks WHERE bank_id = ?", (bank_id,)).fetchone() is not None

    def _ping(self) -> None:
        self._db.conn().execute("SELECT count(*) FROM banks WHERE 0").fetchone()

    def _close(self) -> None:
        self._db.close()


def _tenant_usage(conn: sqlite3.Connection, tenant: str) -> tuple[int, int]:
    """(number of adapters, sum of their stored bytes)."""
    return conn.execute(
        "SELECT count(*), coalesce(sum(length(a.body) + coalesce(length(b.data), 0)), 0) "
        f"FROM {_RECORD_FROM} WHERE a.tenant = ?",
        (tenant,),
    ).fetchone()


def _check_quota(
    conn: sqlite3.Connection, tenant: str, quota: StoreQuota, *, replaced_bytes: int | None, body: bytes, bank: bytes
) -> None:
    """Inside the write transaction: refuse a put that takes the tenant over `quota`.
    `replaced_bytes` is the stored size of the version being replaced (None: a new name)."""
    if quota.max_adapters is None and quota.max_bytes is None:
        return
    count, total = _tenant_usage(conn, tenant)
    if replaced_bytes is None and quota.max_adapters is not None and count >= quota.max_adapters:
        raise quota_exceeded("adapters", quota)
    # The bank's stored size is the size of its blob, whether this put stores it or not.
    delta = len(body) + len(bank) - (replaced_bytes or 0)
    if quota.max_bytes is not None and delta > 0 and total + delta > quota.max_bytes:
        raise quota_exceeded("bytes", quota)


def _release_bank(conn: sqlite3.Connection, bank_id: str) -> None:
    """Drop one reference; the last one removes the bank."""
    conn.execute("UPDATE banks SET refcount = refcount - 1 WHERE bank_id = ?", (bank_id,))
    conn.execute("DELETE FROM banks WHERE bank_id = ? AND refcount <= 0", (bank_id,))


def _record(tenant: str, name: str, row: tuple) -> AdapterRecord:
    """Build a record from the `_RECORD_COLUMNS` part of a row."""
    version, bank_id, config_json, body_bytes, bank_bytes, created, updated = row[:7]
    return AdapterRecord(
        tenant, name, version, bank_id, json.loads(config_json), body_bytes, bank_bytes, created, updated
    )
