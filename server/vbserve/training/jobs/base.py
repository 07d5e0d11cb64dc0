"""The job queue interface every backend implements, and the rules they share.

As in `vbserve_store.store.base`, the public methods live here once: they validate the
caller's input, then call a backend's protected `_` methods, so both backends refuse the
same input and only storage differs.

Life of a job:

    queued  --claim-->   running  --finish-->  succeeded | failed | cancelled
    running --retry-->   queued     (a transient error, or the worker shutting down)
    running --its lease lapses (worker died), another worker claims it-->  running,
                         attempt + 1; past `max_attempts` it ends failed instead
    queued  --cancel-->  cancelled
    running --cancel-->  a flag the worker sees within a step; it then ends cancelled

A running job is owned by one worker (`worker` field) under a lease the worker renews
with `heartbeat`. Every worker-side write (`report`, `mark_publishing`, `finish`,
`retry`) checks ownership atomically and answers False when the job was taken over, so a
worker that stalled past its lease can no longer change the job's state. Publishing is
"mark the bank id, then store.put, then finish": a worker that dies between put and
finish leaves the mark, and the next claimer sees the store already holds that bank and
finishes the job without training again or publishing a second version.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import abstractmethod
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from vbserve.backends import Backend, BackendInputError, validate_key

from ..errors import DatasetError, DatasetTooLargeError, JobNotFoundError, TrainingError, check_key
from ..hyperparams import TrainingHyperparameters

MAX_LIST_LIMIT = 100
JOB_ID_PREFIX = "ftjob-"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobRecord:
    """What a tenant sees of a job (no files)."""

    id: str
    tenant: str
    adapter_name: str
    state: JobState
    hyperparameters: dict[str, Any]
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    val_loss: float | None = None  # the last validation loss measured
    tokens_per_s: float | None = None
    error: str | None = None
    adapter_version: int | None = None  # the store version published on success
    attempts: int = 0
    cancel_requested: bool = False
    created: float = 0.0
    updated: float = 0.0
    # What OpenAI's job object shows beside the trainer's inputs: the ids of the uploaded
    # files the job was made from (None for a multipart upload), and the tokens it trains
    # on (its rows' tokens times its epochs; None with max_steps).
    training_file_id: str | None = None
    validation_file_id: str | None = None
    trained_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}


@dataclass(frozen=True)
class JobEvent:
    """One progress report. `val_loss` (and `val_exact_match`, when the job asks for it)
    is set on the steps that ran validation; `best_step` and `best_val_loss` then name the
    checkpoint the job would publish now (the lowest validation loss so far)."""

    step: int
    total_steps: int
    loss: float
    tokens_per_s: float
    val_loss: float | None
    time: float
    # Absent from events written before they existed: they read as None.
    val_exact_match: float | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    # A fit_lora job's last event, whose `loss` is the published adapter's fit error.
    output_rel_error: float | None = None
    top1_agreement: float | None = None


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds: its record and everything needed to run it."""

    record: JobRecord
    worker_id: str
    training_file: bytes
    validation_file: bytes | None
    publish_bank_id: str | None  # set when an earlier attempt got as far as publishing

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def hyperparameters(self) -> TrainingHyperparameters:
        """Validated again: a job queued by an older server may break today's bounds, which
        must fail the job with `HyperparameterError`, not crash the worker."""
        return TrainingHyperparameters.parse(self.record.hyperparameters)


@dataclass(frozen=True)
class Heartbeat:
    owned: bool  # False: the lease was lost (another worker runs the job now) or it ended
    cancel_requested: bool


@dataclass(frozen=True)
class QueueLimits:
    max_active_per_tenant: int = 4  # queued + running
    max_file_bytes: int = 32 << 20
    max_attempts: int = 3
    lease_s: float = 30.0
    max_events: int = 1000
    retention_s: float = 7 * 86400.0

    def __post_init__(self) -> None:
        if self.lease_s <= 0 or self.max_attempts < 1 or self.max_active_per_tenant < 1 or self.max_events < 1:
            raise ValueError(f"bad queue limits {self}")


def new_job_id() -> str:
    return JOB_ID_PREFIX + uuid.uuid4().hex[:24]


def validate_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not job_id.startswith(JOB_ID_PREFIX) or len(job_id) > 64:
        raise JobNotFoundError("job_id", f"no job {job_id!r}")
    try:
        validate_key("job_id", job_id)
    except BackendInputError:
        raise JobNotFoundError("job_id", f"no job {job_id!r}") from None
    return job_id


def job_not_found(job_id: str) -> JobNotFoundError:
    return JobNotFoundError("job_id", f"no job {job_id!r}")


def unknown_cursor(after: object) -> TrainingError:
    return TrainingError("after", f"no job {after!r} of yours to page after (or it has expired)")


class JobQueue(Backend):
    """A durable queue of fine-tuning jobs, shared by API processes and workers.
    Thread-safe. Every method may raise `BackendUnavailableError("jobs")`."""

    backend = "jobs"
    description = "job queue"
    # No circuit breaker: no request that serves tokens waits on the queue, and a worker's
    # `claim` blocks up to a second by design (a slow call that is no hang).
    fail_fast = False

    def __init__(self, limits: QueueLimits) -> None:
        super().__init__()
        self.limits = limits

    # -- tenant side ----------------------------------------------------------------------

    def submit(
        self,
        tenant: str,
        adapter_name: str,
        hyperparameters: TrainingHyperparameters | dict[str, Any] | None,
        training_file: bytes,
        validation_file: bytes | None = None,
        *,
        training_file_id: str | None = None,
        validation_file_id: str | None = None,
        trained_tokens: int | None = None,
    ) -> JobRecord:
        """Queue a job that will publish its adapter as the next version of
        (tenant, adapter_name). Raises `TooManyJobsError` past the tenant's limit. The
        job keeps its own copy of the files; their ids (`POST /v1/files`) are shown only.

        The files are checked for size only here; the caller validates their rows with
        `prepare_job` before submitting (it has the tokenizer), the worker again."""
        check_key("tenant", tenant)
        check_key("adapter_name", adapter_name)
        hp = (
            hyperparameters
            if isinstance(hyperparameters, TrainingHyperparameters)
            else TrainingHyperparameters.parse(hyperparameters)
        )
        files = {"training_file": training_file}
        if validation_file is not None:
            files["validation_file"] = validation_file
        for name, data in files.items():
            if not isinstance(data, bytes | bytearray):
                raise DatasetError(name, f"must be bytes, got {type(data).__name__}")
            if not data.strip():
                raise DatasetError(name, "contains no rows")
            if len(data) > self.limits.max_file_bytes:
                raise DatasetTooLargeError(name, f"{len(data)} bytes exceed the limit of {self.limits.max_file_bytes}")
        now = time.time()
        record = JobRecord(
            id=new_job_id(),
            tenant=tenant,
            adapter_name=adapter_name,
            state=JobState.QUEUED,
            hyperparameters=hp.model_dump(mode="json"),
            created=now,
            updated=now,
            training_file_id=training_file_id,
            validation_file_id=validation_file_id,
            trained_tokens=trained_tokens,
        )
        with self._guard():
            self._submit(record, bytes(training_file), None if validation_file is None else bytes(validation_file))
        return record

    def get(self, tenant: str, job_id: str) -> JobRecord:
        """The job, if it belongs to `tenant` (else `JobNotFoundError`, as if absent)."""
        check_key("tenant", tenant)
        validate_job_id(job_id)
        with self._guard():
            record = self._get(job_id)
        if record is None or record.tenant != tenant:
            raise job_not_found(job_id)
        return record

    def list(self, tenant: str, *, limit: int = 20, after: str | None = None) -> list[JobRecord]:
        """The tenant's jobs, newest first (finished ones until their retention ends). With
        `after` (a page cursor: the last job id of the previous page), the jobs older than
        that one; `TrainingError` on `after` if it is no job of the tenant's (any more)."""
        check_key("tenant", tenant)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise TrainingError("limit", f"must be an integer in [1, {MAX_LIST_LIMIT}], got {limit!r}")
        if after is not None:
            try:
                validate_job_id(after)
            except JobNotFoundError:
                raise unknown_cursor(after) from None
        with self._guard():
            return self._list(tenant, limit, after)

    def active_count(self, tenant: str) -> int:
        """The tenant's queued and running jobs: what `max_active_per_tenant` limits."""
        check_key("tenant", tenant)
        with self._guard():
            return self._active_count(tenant)

    def events(self, tenant: str, job_id: str) -> list[JobEvent]:
        """Progress reports, oldest first (the newest `max_events` are kept)."""
        self.get(tenant, job_id)
        with self._guard():
            return self._events(job_id)

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Cancel a job. A queued job is cancelled at once; a running one gets a flag its
        worker sees within a training step and then ends `cancelled`, publishing nothing.
        Cancelling a cancelled job is a no-op; a succeeded or failed one: `JobStateError`."""
        self.get(tenant, job_id)
        with self._guard():
            self._cancel(job_id, time.time())
        return self.get(tenant, job_id)

    def remove(self, tenant: str, job_id: str | None = None) -> int:
        """Forget the tenant's job `job_id`, or every job of the tenant (None), whatever its
        state, with its files and events: for a deleted tenant, whose name may be given to
        a new one. A queued job never runs. A running one's worker learns at its next
        heartbeat (within `CANCEL_POLL_S`) that the job is no longer its own and stops;
        every worker-side write answers False for a removed job, so it publishes nothing
        (or withdraws what it published: see `Worker`). Returns how many were removed."""
        check_key("tenant", tenant)
        if job_id is not None:
            validate_job_id(job_id)
        with self._guard():
            return self._remove(tenant, job_id)

    # -- worker side ----------------------------------------------------------------------

    def claim(self, worker_id: str, timeout_s: float) -> ClaimedJob | None:
        """The next job for `worker_id` to run, waiting up to `timeout_s` for one: a queued
        job, or a running one whose worker stopped renewing its lease (then this is a new
        attempt, and past `max_attempts` the job ends failed instead)."""
        check_key("worker_id", worker_id)
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._guard():
            return self._claim(worker_id, deadline)

    def heartbeat(self, job: ClaimedJob) -> Heartbeat:
        """Renew the lease and learn of a cancel. Call it more often than `lease_s` (the
        worker does every third of it, and at least every 2 s)."""
        with self._guard():
            return self._heartbeat(job, time.time())

    def report(self, job: ClaimedJob, event: JobEvent) -> bool:
        """Record progress; False if the job is no longer this worker's."""
        with self._guard():
            return self._report(job, event)

    def mark_publishing(self, job: ClaimedJob, bank_id: str) -> bool:
        """Note the bank of the adapter about to be published (see the module doc).
        False if the job is no longer this worker's: it must then not publish."""
        with self._guard():
            return self._mark_publishing(job, bank_id, time.time())

    def finish(
        self, job: ClaimedJob, state: JobState, *, error: str | None = None, adapter_version: int | None = None
    ) -> bool:
        """End the job in a terminal state and drop its files; False if not this worker's."""
        if not state.terminal:
            raise ValueError(f"{state} is not a final state")
        with self._guard():
            return self._finish(job, state, error, adapter_version, time.time())

    def retry(self, job: ClaimedJob, error: str, *, count_attempt: bool = True) -> bool:
        """Put a running job back in the queue after a transient failure (or a worker
        shutdown: `count_attempt=False`); past `max_attempts` it ends failed."""
        with self._guard():
            return self._retry(job, error, count_attempt, time.time())

    # -- what a backend implements ------------------------------------------------------

    @abstractmethod
    def _submit(self, record: JobRecord, training_file: bytes, validation_file: bytes | None) -> None:
        """Atomically: check the tenant's active count, store record + files, enqueue."""

    @abstractmethod
    def _get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def _list(self, tenant: str, limit: int, after: str | None) -> list[JobRecord]:
        """Raises `unknown_cursor(after)` if `after` is no job in the tenant's list."""

    @abstractmethod
    def _active_count(self, tenant: str) -> int: ...

    @abstractmethod
    def _events(self, job_id: str) -> list[JobEvent]: ...

    @abstractmethod
    def _cancel(self, job_id: str, now: float) -> None: ...

    @abstractmethod
    def _remove(self, tenant: str, job_id: str | None) -> int:
        """Delete the tenant's job `job_id` (None: all of them), files and events included."""

    @abstractmethod
    def _claim(self, worker_id: str, deadline: float) -> ClaimedJob | None: ...

    @abstractmethod
    def _heartbeat(self, job: ClaimedJob, now: float) -> Heartbeat: ...

    @abstractmethod
    def _report(self, job: ClaimedJob, event: JobEvent) -> bool: ...

    @abstractmethod
    def _mark_publishing(self, job: ClaimedJob, bank_id: str, now: float) -> bool: ...

    @abstractmethod
    def _finish(
        self, job: ClaimedJob, state: JobState, error: str | None, adapter_version: int | None, now: float
    ) -> bool: ...

    @abstractmethod
    def _retry(self, job: ClaimedJob, error: str, count_attempt: bool, now: float) -> bool: ...


def event_json(event: JobEvent) -> str:
    return json.dumps(asdict(event), separators=(",", ":"))


def event_from_json(text: str | bytes) -> JobEvent:
    return JobEvent(**json.loads(text))
