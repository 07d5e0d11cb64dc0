"""Uploaded files in a local SQLite file, beside the embedded job queue (same database
helper, `vbserve.backends.sqlite_db`): every write is one `BEGIN IMMEDIATE` transaction, so
the quota check and the insert are one atomic step."""

from __future__ import annotations

import math
import os
import sqlite3
from pathlib import Path

from vbserve.backends import SQLiteDatabase

from .base import FileLimits, FileRecord, FileStore, files_quota_exceeded

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    content BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_tenant ON files (tenant, created);
"""

_RECORD_COLUMNS = "id, tenant, filename, purpose, bytes, created"


class SQLiteFileStore(FileStore):
    unavailable_errors = (sqlite3.OperationalError,)

    def __init__(
        self, path: str | os.PathLike[str], *, limits: FileLimits | None = None, timeout: float = 30.0
    ) -> None:
        super().__init__(limits or FileLimits())
        self.path = Path(path)
        with self._guard():
            self._db = SQLiteDatabase(self.path, SCHEMA, timeout=timeout)

    def __repr__(self) -> str:
        return f"SQLiteFileStore({str(self.path)!r})"

    def _put(self, record: FileRecord, content: bytes) -> None:
        with self._db.write() as conn:
            count, stored = conn.execute(
                "SELECT count(*), coalesce(sum(bytes), 0) FROM files WHERE tenant = ?", (record.tenant,)
            ).fetchone()
            if count + 1 > self.limits.max_files_per_tenant:
                raise files_quota_exceeded("files", self.limits)
            if stored + record.bytes > self.limits.max_bytes_per_tenant:
                raise files_quota_exceeded("bytes", self.limits)
            conn.execute(
                f"INSERT INTO files ({_RECORD_COLUMNS}, content) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.tenant, record.filename, record.purpose, record.bytes, record.created, content),
            )

    def _get(self, tenant: str, file_id: str) -> FileRecord | None:
        row = (
            self._db.conn()
            .execute(f"SELECT {_RECORD_COLUMNS} FROM files WHERE id = ? AND tenant = ?", (file_id, tenant))
            .fetchone()
        )
        return FileRecord(*row) if row else None

    def _content(self, tenant: str, file_id: str) -> bytes | None:
        row = (
            self._db.conn()
            .execute("SELECT content FROM files WHERE id = ? AND tenant = ?", (file_id, tenant))
            .fetchone()
        )
        return bytes(row[0]) if row else None

    def _list(self, tenant: str, limit: int, after: FileRecord | None) -> list[FileRecord]:
        created, file_id = (math.inf, "") if after is None else (after.created, after.id)
        rows = (
            self._db.conn()
            .execute(
                f"SELECT {_RECORD_COLUMNS} FROM files WHERE tenant = ? AND (created < ? OR (created = ? AND id < ?))"
                " ORDER BY created DESC, id DESC LIMIT ?",
                (tenant, created, created, file_id, limit),
            )
            .fetchall()
        )
        return [FileRecord(*row) for row in rows]

    def _delete(self, tenant: str, file_id: str) -> bool:
        with self._db.write() as conn:
            return conn.execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).rowcount > 0

    def _ping(self) -> None:
        self._db.conn().execute("SELECT count(*) FROM files WHERE 0").fetchone()

    def _close(self) -> None:
        self._db.close()
