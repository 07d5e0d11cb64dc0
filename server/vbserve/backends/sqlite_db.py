"""One SQLite file shared by many threads: what the SQLite adapter store, job queue, file
store and tenant registry have in common.

WAL mode lets readers run beside the one writer; every write is one `BEGIN IMMEDIATE`
transaction (it takes the write lock up front, so two writers never both read an old row
and then both write). Each thread gets its own connection (sqlite3 connections must not
be shared between threads mid-transaction); `close()` closes all of them.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SQLiteDatabase:
    def __init__(self, path: str | os.PathLike[str], schema: str, *, timeout: float = 30.0) -> None:
        """schema: `;`-separated statements applied on open (use IF NOT EXISTS).
        timeout: seconds a write waits for another writer's lock before giving up."""
        self.path = Path(path)
        self._timeout = timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.write() as conn:
            for statement in schema.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: no implicit transactions, we open them ourselves.
            # check_same_thread=False only so that close() may close every thread's connection.
            conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
            with self._lock:
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the write lock from its first statement."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
