"""The embedded job queue: one SQLite file, for a machine with no Redis.

Connections and transactions come from `vbserve.backends.sqlite_db`, as for the SQLite
adapter store: every write is one `BEGIN IMMEDIATE` transaction, so two workers never
claim the same job. The
lease is a `lease_until` timestamp the heartbeat pushes forward; a running job whose
lease has passed is claimable again, which is how a dead worker's job is noticed.

Workers in other processes find new jobs by polling (every `POLL_S`); a worker in this
process (the embedded worker thread) is woken at once by `submit`.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from pathlib import Path

from vbserve.backends import SQLiteDatabase

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

POLL_S = 0.25

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    adapter_name TEXT NOT NULL,
    state TEXT NOT NULL,
    hyperparameters TEXT NOT NULL,
    training BLOB,
    validation BLOB,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    val_loss REAL,
    tokens_per_s REAL,
    error TEXT,
    adapter_version INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until REAL,
    publish_bank_id TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
"""

# Columns added since the table was first released: `SQLiteJobQueue` adds them to a
# jobs.db written before them when it opens it.
ADDED_COLUMNS = {"training_file_id": "TEXT", "validation_file_id": "TEXT", "trained_tokens": "INTEGER"}
_RECORD_COLUMNS = (
    "id, tenant, adapter_name, state, hyperparameters, step, total_steps, loss, val_loss, tokens_per_s, "
    "error, adapter_version, attempts, cancel_requested, created, updated, "
    "training_file_id, validation_file_id, trained_tokens"
)
_ACTIVE = "state IN ('queued', 'running')"
_COUNT_ACTIVE = f"SELECT count(*) FROM jobs WHERE tenant = ? AND {_ACTIVE}"


class SQLiteJobQueue(JobQueue):
    """Job queue in a local SQLite file (created with its parent folder if missing)."""

    unavailable_errors = (sqlite3.OperationalError,)

    def __init__(
        self, path: str | os.PathLike[str], *, limits: QueueLimits | None = None, timeout: float = 30.0
    ) -> None:
        super().__init__(limits or QueueLimits())
        self.path = Path(path)
        self._submitted = threading.Condition()
        with self._guard():
            self._db = SQLiteDatabase(self.path, SCHEMA, timeout=timeout)
            with self._db.write() as conn:
                present = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
                for name, kind in ADDED_COLUMNS.items():
                    if name not in present:
                        conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def __repr__(self) -> str:
        return f"SQLiteJobQueue({str(self.path)!r})"

    # -- tenant side -------------------------------------------------------------------------

    def _submit(self, record: JobRecord, training_file: bytes, validation_file: bytes | None) -> None:
        with self._db.write() as conn:
            self._purge(conn, record.created)
            (active,) = conn.execute(_COUNT_ACTIVE, (record.tenant,)).fetchone()
            if active >= self.limits.max_active_per_tenant:
                raise TooManyJobsError(
                    "tenant", f"{active} jobs are queued or running; the limit is {self.limits.max_active_per_tenant}"
                )
            conn.execute(
                "INSERT INTO jobs (id, tenant, adapter_name, state, hyperparameters, training, validation, created, "
                "updated, training_file_id, validation_file_id, trained_tokens) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.tenant,
                    record.adapter_name,
                    record.state.value,
                    json.dumps(record.hyperparameters, separators=(",", ":")),
                    training_file,
                    validation_file,
                    record.created,
                    record.updated,
                    record.training_file_id,
                    record.validation_file_id,
                    record.trained_tokens,
                ),
            )
        with self._submitted:
            self._submitted.notify_all()

    def _get(self, job_id: str) -> JobRecord | None:
        row = self._db.conn().execute(f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def _list(self, tenant: str, limit: int, after: str | None) -> list[JobRecord]:
        conn = self._db.conn()
        # Newest first, ties by id: a cursor is the (created, id) of the previous page's last row.
        created, job_id = math.inf, ""
        if after is not None:
            row = conn.execute("SELECT created, id FROM jobs WHERE id = ? AND tenant = ?", (after, tenant)).fetchone()
            if row is None:
                raise unknown_cursor(after)
            created, job_id = row
        rows = conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE tenant = ? AND (created < ? OR (created = ? AND id > ?))"
            " ORDER BY created DESC, id LIMIT ?",
            (tenant, created, created, job_id, limit),
        ).fetchall()
        return [_record(row) for row in rows]

    def _active_count(self, tenant: str) -> int:
        return self._db.conn().execute(_COUNT_ACTIVE, (tenant,)).fetchone()[0]

    def _events(self, job_id: str) -> list[JobEvent]:
        rows = self._db.conn().execute("SELECT data FROM events WHERE job_id = ? ORDER BY seq", (job_id,)).fetchall()
        return [event_from_json(data) for (data,) in rows]

    def _cancel(self, job_id: str, now: float) -> None:
        with self._db.write() as conn:
            row = conn.execute("SELECT state, lease_until FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise job_not_found(job_id)
            state, lease_until = JobState(row[0]), row[1]
            if state is JobState.QUEUED or (state is JobState.RUNNING and (lease_until or 0) < now):
                # a running job past its lease has no live worker that could still publish
                _close(conn, job_id, JobState.CANCELLED, None, None, now)
            elif state is JobState.RUNNING:
                conn.execute("UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ?", (now, job_id))
            elif state is not JobState.CANCELLED:
                raise JobStateError("job_id", f"the job has already {state.value}")

    def _remove(self, tenant: str, job_id: str | None) -> int:
        where, args = ("tenant = ?", (tenant,)) if job_id is None else ("tenant = ? AND id = ?", (tenant, job_id))
        with self._db.write() as conn:
            conn.execute(f"DELETE FROM events WHERE job_id IN (SELECT id FROM jobs WHERE {where})", args)
            return conn.execute(f"DELETE FROM jobs WHERE {where}", args).rowcount

    # -- worker side -------------------------------------------------------------------------

    def _claim(self, worker_id: str, deadline: float) -> ClaimedJob | None:
        while True:
            job = self._try_claim(worker_id)
            if job is not None:
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with self._submitted:
                self._submitted.wait(min(POLL_S, remaining))

    def _try_claim(self, worker_id: str) -> ClaimedJob | None:
        now = time.time()
        with self._db.write() as conn:
            while True:
                row = conn.execute(
                    "SELECT id, attempts, cancel_requested, error FROM jobs "
                    "WHERE state = 'queued' OR (state = 'running' AND lease_until < ?) ORDER BY created, id LIMIT 1",
                    (now,),
                ).fetchone()
                if row is None:
                    return None
                job_id, attempts, cancel, last_error = row
                if cancel:
                    _close(conn, job_id, JobState.CANCELLED, None, None, now)
                    continue
                if attempts + 1 > self.limits.max_attempts:
                    last = last_error or "its worker stopped while running it"
                    _close(conn, job_id, JobState.FAILED, f"gave up after {attempts} attempts; last: {last}", None, now)
                    continue
                conn.execute(
                    "UPDATE jobs SET state = 'running', worker = ?, lease_until = ?, attempts = attempts + 1, "
                    "updated = ? WHERE id = ?",
                    (worker_id, now + self.limits.lease_s, now, job_id),
                )
                record_row = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
                training, validation, publish = conn.execute(
                    "SELECT training, validation, publish_bank_id FROM jobs WHERE id = ?", (job_id,)
                ).fetchone()
                return ClaimedJob(_record(record_row), worker_id, training, validation, publish)

    def _owned(self, conn: sqlite3.Connection, job: ClaimedJob) -> bool:
        row = conn.execute("SELECT worker, state FROM jobs WHERE id = ?", (job.id,)).fetchone()
        return row is not None and row[0] == job.worker_id and row[1] == JobState.RUNNING.value

    def _heartbeat(self, job: ClaimedJob, now: float) -> Heartbeat:
        with self._db.write() as conn:
            if not self._owned(conn, job):
                return Heartbeat(False, False)
            conn.execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (now + self.limits.lease_s, job.id))
            (cancel,) = conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job.id,)).fetchone()
        return Heartbeat(True, bool(cancel))

    def _report(self, job: ClaimedJob, event: JobEvent) -> bool:
        with self._db.write() as conn:
            if not self._owned(conn, job):
                return False
            conn.execute(
                "UPDATE jobs SET step = ?, total_steps = ?, loss = ?, tokens_per_s = ?, "
                "val_loss = coalesce(?, val_loss), updated = ? WHERE id = ?",
                (event.step, event.total_steps, event.loss, event.tokens_per_s, event.val_loss, event.time, job.id),
            )
            conn.execute("INSERT INTO events (job_id, data) VALUES (?, ?)", (job.id, event_json(event)))
            # seq is global across jobs: keep this job's newest max_events by position.
            conn.execute(
                "DELETE FROM events WHERE job_id = ? AND seq <= (SELECT seq FROM events WHERE job_id = ? "
                "ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (job.id, job.id, self.limits.max_events),
            )
        return True

    def _mark_publishing(self, job: ClaimedJob, bank_id: str, now: float) -> bool:
        with self._db.write() as conn:
            if not self._owned(conn, job):
                return False
            conn.execute("UPDATE jobs SET publish_bank_id = ?, updated = ? WHERE id = ?", (bank_id, now, job.id))
        return True

    def _finish(
        self, job: ClaimedJob, state: JobState, error: str | None, adapter_version: int | None, now: float
    ) -> bool:
        with self._db.write() as conn:
            if not self._owned(conn, job):
                return False
            _close(conn, job.id, state, error, adapter_version, now)
        return True

    def _retry(self, job: ClaimedJob, error: str, count_attempt: bool, now: float) -> bool:
        with self._db.write() as conn:
            if not self._owned(conn, job):
                return False
            conn.execute(
                "UPDATE jobs SET state = 'queued', worker = NULL, lease_until = NULL, error = ?, "
                "attempts = attempts - ?, updated = ? WHERE id = ?",
                (error, 0 if count_attempt else 1, now, job.id),
            )
        with self._submitted:
            self._submitted.notify_all()
        return True

    def _purge(self, conn: sqlite3.Connection, now: float) -> None:
        """Forget finished jobs past their retention."""
        old = now - self.limits.retention_s
        conn.execute(
            f"DELETE FROM events WHERE job_id IN (SELECT id FROM jobs WHERE NOT {_ACTIVE} AND updated < ?)",
            (old,),
        )
        conn.execute(f"DELETE FROM jobs WHERE NOT {_ACTIVE} AND updated < ?", (old,))

    def _ping(self) -> None:
        self._db.conn().execute("SELECT count(*) FROM jobs WHERE 0").fetchone()

    def _close(self) -> None:
        self._db.close()


def _close(
    conn: sqlite3.Connection, job_id: str, state: JobState, error: str | None, version: int | None, now: float
) -> None:
    """End a job: final state, files dropped, lease released."""
    conn.execute(
        "UPDATE jobs SET state = ?, error = ?, adapter_version = ?, training = NULL, validation = NULL, "
        "lease_until = NULL, updated = ? WHERE id = ?",
        (state.value, error, version, now, job_id),
    )


def _record(row: tuple) -> JobRecord:
    (
        job_id,
        tenant,
        adapter_name,
        state,
        hyperparameters,
        step,
        total_steps,
        loss,
        val_loss,
        tokens_per_s,
        error,
        adapter_version,
        attempts,
        cancel,
        created,
        updated,
        training_file_id,
        validation_file_id,
        trained_tokens,
    ) = row
    return JobRecord(
        id=job_id,
        tenant=tenant,
        adapter_name=adapter_name,
        state=JobState(state),
        hyperparameters=json.loads(hyperparameters),
        step=step,
        total_steps=total_steps,
        loss=loss,
        val_loss=val_loss,
        tokens_per_s=tokens_per_s,
        error=error,
        adapter_version=adapter_version,
        attempts=attempts,
        cancel_requested=bool(cancel),
        created=created,
        updated=updated,
        training_file_id=training_file_id,
        validation_file_id=validation_file_id,
        trained_tokens=trained_tokens,
    )
