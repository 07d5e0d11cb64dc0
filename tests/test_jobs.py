"""One contract for both job queue backends, run against SQLite (in a tmp folder), a
real Redis server (`VBSERVE_TEST_REDIS_URL`, default redis://127.0.0.1:6379/15) and a local
Redis Cluster (tests/redis_cluster.py), each under a random key prefix deleted afterwards;
never mocked, skipped with the reason when no server answers. Then workers: in-process on a tiny model, and in a subprocess that is
killed with SIGKILL mid-job, to show a job survives its worker and is never half-published.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from tests.conftest import byte_tokenizer, described, tiny_llama
from tests.redis_cluster import redis_under_test
from vbserve.backends import BackendInputError, BackendUnavailableError
from vbserve.model import BaseModelSpec
from vbserve.settings import Settings
from vbserve.training import (
    DatasetError,
    DatasetTooLargeError,
    HyperparameterError,
    JobNotFoundError,
    JobStateError,
    TooManyJobsError,
    TrainingError,
    TrainingHyperparameters,
    prepare_job,
    train_adapter,
)
from vbserve.training.jobs import (
    Heartbeat,
    JobEvent,
    JobQueue,
    JobState,
    QueueLimits,
    RedisJobQueue,
    SQLiteJobQueue,
    jobs_url,
    open_job_queue,
)
from vbserve.training.jobs.sqlite_queue import SCHEMA
from vbserve.training.worker import Worker
from vbserve.worker_host import start_embedded_worker
from vbserve_store import AdapterStore, RedisAdapterStore, SQLiteAdapterStore
from vbserve_store.store import StoreQuota

pytest_plugins = ["tests.redis_cluster"]  # the session fixture redis_cluster

REPO = Path(__file__).resolve().parent.parent
ROWS = b'{"prompt": "key0:", "completion": "apple"}\n{"prompt": "key1:", "completion": "river"}\n'
HP = TrainingHyperparameters(
    target_modules=["q_proj", "v_proj"], vector_length=16, num_vectors=32, max_steps=3, batch_size=2, max_seq_len=32
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- backends ----------------------------------------------------------------------------


@dataclass
class Backend:
    """Opens queues (and an adapter store) on one storage location, as a restarted server would."""

    kind: str
    url: str  # for a subprocess: VBSERVE_JOBS_URL
    store_url: str
    prefix: str
    open: Callable[..., JobQueue]  # open(**QueueLimits fields)
    open_store: Callable[[], AdapterStore]


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path, store_path = tmp_path / "jobs.db", tmp_path / "adapters.db"
        yield Backend(
            "sqlite",
            f"sqlite:///{path}",
            f"sqlite:///{store_path}",
            "",
            lambda **kw: SQLiteJobQueue(path, limits=QueueLimits(**kw)),
            lambda: SQLiteAdapterStore(store_path),
        )
        return
    url, context = redis_under_test(request, request.param)
    with context as (_, prefix):
        yield Backend(
            request.param,
            url,
            url,
            prefix,
            lambda **kw: RedisJobQueue.from_url(url, prefix=prefix, limits=QueueLimits(**kw)),
            lambda: RedisAdapterStore.from_url(url, prefix=prefix),
        )


@pytest.fixture
def queue(backend: Backend) -> Iterator[JobQueue]:
    opened = backend.open()
    yield opened
    opened.close()


def event(step: int, val_loss: float | None = None) -> JobEvent:
    return JobEvent(step, 10, 1.0 / step, 100.0, val_loss, time.time())


# -- tenant side ---------------------------------------------------------------------------


def test_submit_get_list_and_tenant_isolation(queue: JobQueue) -> None:
    first = queue.submit("acme", "bot", {"r": 2, "vector_length": 16}, ROWS)
    second = queue.submit("acme", "bot2", HP, ROWS, validation_file=ROWS)
    assert first.state is JobState.QUEUED and first.id.startswith("ftjob-") and first.attempts == 0
    assert first.hyperparameters["r"] == 2 and first.hyperparameters["lr_bank"] == 1e-2
    got = queue.get("acme", first.id)
    assert got == first
    assert got.to_json()["state"] == "queued" and json.dumps(got.to_json())
    assert [j.id for j in queue.list("acme")] == [second.id, first.id]
    assert [j.id for j in queue.list("acme", limit=1)] == [second.id]
    assert queue.list("other") == []
    with pytest.raises(JobNotFoundError):
        queue.get("other", first.id)  # another tenant's job looks absent
    with pytest.raises(JobNotFoundError):
        queue.cancel("other", first.id)
    with pytest.raises(JobNotFoundError):
        queue.get("acme", "ftjob-" + "0" * 24)
    with pytest.raises(JobNotFoundError):
        queue.get("acme", "../etc")


def test_list_pages_with_an_after_cursor(backend: Backend) -> None:
    queue = backend.open(max_active_per_tenant=10)
    submitted = [queue.submit("acme", f"bot{i}", HP, ROWS).id for i in range(5)]
    newest_first = [j.id for j in queue.list("acme")]
    assert sorted(newest_first) == sorted(submitted)
    pages, after = [], None
    while page := queue.list("acme", limit=2, after=after):
        pages.append([j.id for j in page])
        after = page[-1].id
    assert [len(p) for p in pages] == [2, 2, 1] and [i for p in pages for i in p] == newest_first
    other = queue.submit("other", "bot", HP, ROWS)
    for cursor in (other.id, "ftjob-" + "0" * 24, "../etc", 7):
        with pytest.raises(TrainingError) as err:
            queue.list("acme", after=cursor)  # another tenant's job is no cursor either
        assert err.value.field == "after"
    queue.close()


def test_bad_submissions_are_refused_and_queue_nothing(backend: Backend) -> None:
    queue = backend.open(max_file_bytes=1000)
    cases = [
        (("bad tenant", "bot", None, ROWS), TrainingError, "tenant"),
        (("acme", "a/b", None, ROWS), TrainingError, "adapter_name"),
        (("acme", "bot", {"lr_logits": 0}, ROWS), HyperparameterError, "hyperparameters.lr_logits"),
        (("acme", "bot", None, b" \n"), DatasetError, "training_file"),
        (("acme", "bot", None, ROWS * 100), DatasetTooLargeError, "training_file"),
        (("acme", "bot", None, ROWS, ROWS * 100), DatasetTooLargeError, "validation_file"),
    ]
    for args, error, field in cases:
        with pytest.raises(error) as err:
            queue.submit(*args)
        assert err.value.field == field
    assert queue.list("acme") == []
    assert queue.claim("w1", 0) is None
    queue.close()


def test_per_tenant_limit_counts_queued_and_running(backend: Backend) -> None:
    queue = backend.open(max_active_per_tenant=2)
    a = queue.submit("acme", "a", HP, ROWS)
    queue.submit("acme", "b", HP, ROWS)
    with pytest.raises(TooManyJobsError) as err:
        queue.submit("acme", "c", HP, ROWS)
    assert err.value.kind == "overloaded" and "limit is 2" in err.value.reason
    queue.submit("other", "a", HP, ROWS)  # other tenants are not affected
    assert (queue.active_count("acme"), queue.active_count("other"), queue.active_count("nobody")) == (2, 1, 0)
    job = queue.claim("w1", 1)
    assert job is not None and job.id == a.id  # oldest first; running still counts
    with pytest.raises(TooManyJobsError):
        queue.submit("acme", "c", HP, ROWS)
    assert queue.active_count("acme") == 2
    assert queue.finish(job, JobState.SUCCEEDED, adapter_version=1)
    assert queue.active_count("acme") == 1
    queue.submit("acme", "c", HP, ROWS)
    queue.close()


# -- worker side ---------------------------------------------------------------------------


def test_claim_report_finish(queue: JobQueue) -> None:
    submitted = queue.submit("acme", "bot", HP, ROWS, validation_file=b'{"prompt": "x", "completion": "y"}')
    job = queue.claim("w1", 2)
    assert job is not None and job.id == submitted.id and job.worker_id == "w1"
    assert (job.training_file, job.validation_file, job.publish_bank_id) == (
        ROWS,
        b'{"prompt": "x", "completion": "y"}',
        None,
    )
    assert job.hyperparameters == HP
    assert job.record.state is JobState.RUNNING and job.record.attempts == 1
    assert queue.claim("w2", 0) is None  # one job, one worker
    assert queue.heartbeat(job).owned
    assert queue.report(job, event(1)) and queue.report(job, event(2, val_loss=0.7)) and queue.report(job, event(3))
    record = queue.get("acme", submitted.id)
    assert (record.step, record.total_steps, record.loss, record.val_loss, record.tokens_per_s) == (
        3,
        10,
        1 / 3,
        0.7,  # the last validation loss stays
        100.0,
    )
    assert [(e.step, e.val_loss) for e in queue.events("acme", submitted.id)] == [(1, None), (2, 0.7), (3, None)]
    assert queue.finish(job, JobState.SUCCEEDED, adapter_version=4)
    done = queue.get("acme", submitted.id)
    assert (done.state, done.adapter_version, done.error) == (JobState.SUCCEEDED, 4, None)
    assert not queue.heartbeat(job).owned and not queue.report(job, event(4))
    assert not queue.finish(job, JobState.FAILED, error="late")  # a final state is final
    assert queue.get("acme", submitted.id).state is JobState.SUCCEEDED
    assert queue.claim("w1", 0) is None


def test_events_are_capped_to_the_newest(backend: Backend) -> None:
    queue = backend.open(max_events=3)
    first, second = queue.submit("acme", "bot", HP, ROWS), queue.submit("acme", "bot2", HP, ROWS)
    jobs = [queue.claim("w1", 2), queue.claim("w2", 2)]
    for step in range(1, 6):
        for job in jobs:  # two jobs report in turn: each keeps its own newest three
            assert queue.report(job, event(step))
    assert [e.step for e in queue.events("acme", first.id)] == [3, 4, 5]
    assert [e.step for e in queue.events("acme", second.id)] == [3, 4, 5]
    queue.close()


def test_cancel_queued_running_and_finished(queue: JobQueue) -> None:
    queued = queue.submit("acme", "a", HP, ROWS)
    assert queue.cancel("acme", queued.id).state is JobState.CANCELLED
    assert queue.cancel("acme", queued.id).state is JobState.CANCELLED  # idempotent
    running = queue.submit("acme", "b", HP, ROWS)
    job = queue.claim("w1", 2)
    assert job is not None and job.id == running.id  # the cancelled job is never handed out
    assert not queue.heartbeat(job).cancel_requested
    record = queue.cancel("acme", running.id)
    assert record.state is JobState.RUNNING and record.cancel_requested  # the worker decides when
    assert queue.heartbeat(job) == Heartbeat(owned=True, cancel_requested=True)
    assert queue.finish(job, JobState.CANCELLED)
    assert queue.get("acme", running.id).state is JobState.CANCELLED
    done = queue.submit("acme", "c", HP, ROWS)
    job = queue.claim("w1", 2)
    queue.finish(job, JobState.FAILED, error="boom")
    with pytest.raises(JobStateError) as err:
        queue.cancel("acme", done.id)
    assert err.value.kind == "conflict" and "failed" in err.value.reason
    assert queue.get("acme", done.id).error == "boom"


def test_removing_a_tenants_jobs_forgets_them_and_takes_a_running_one_from_its_worker(queue: JobQueue) -> None:
    running = queue.submit("acme", "a", HP, ROWS)
    job = queue.claim("w1", 2)
    assert queue.report(job, event(1))
    queued = queue.submit("acme", "b", HP, ROWS)
    finished = queue.submit("acme", "c", HP, ROWS, validation_file=ROWS)
    other = queue.submit("globex", "a", HP, ROWS)
    assert queue.remove("globex", running.id) == 0  # another tenant's job: as if absent
    assert queue.remove("acme", finished.id) == 1  # one job
    assert queue.remove("acme") == 2  # the rest: running and queued
    for job_id in (running.id, queued.id, finished.id):
        with pytest.raises(JobNotFoundError):
            queue.get("acme", job_id)
    assert queue.list("acme") == []
    # The worker of the running job loses it: every write of its answers False.
    assert queue.heartbeat(job) == Heartbeat(owned=False, cancel_requested=False)
    assert not queue.report(job, event(2)) and not queue.mark_publishing(job, "b" * 10)
    assert not queue.finish(job, JobState.SUCCEEDED, adapter_version=1)
    # The queued job is never handed out; the other tenant's is.
    claimed = queue.claim("w2", 1)
    assert claimed is not None and claimed.id == other.id
    assert queue.claim("w2", 0.2) is None
    assert queue.get("globex", other.id).state is JobState.RUNNING
    # A new job of the name's next owner is counted afresh against the per-tenant limit.
    assert queue.submit("acme", "a", HP, ROWS).state is JobState.QUEUED


def test_a_dead_workers_job_is_claimed_again_then_fails_past_max_attempts(backend: Backend) -> None:
    queue = backend.open(lease_s=0.3, max_attempts=2)
    submitted = queue.submit("acme", "bot", HP, ROWS)
    first = queue.claim("w1", 2)
    assert first is not None and first.record.attempts == 1
    assert queue.claim("w2", 0.1) is None  # the lease still holds
    time.sleep(0.4)  # w1 "died": no heartbeat for a lease
    second = queue.claim("w2", 2)
    assert second is not None and second.id == submitted.id and second.record.attempts == 2
    assert second.training_file == ROWS
    # The stalled first worker has lost the job: none of its writes count any more.
    assert not queue.heartbeat(first).owned
    assert not queue.report(first, event(1))
    assert not queue.mark_publishing(first, "sha256-" + "0" * 40)
    assert not queue.finish(first, JobState.SUCCEEDED, adapter_version=1)
    assert queue.heartbeat(second).owned
    time.sleep(0.4)  # the second worker dies too: two attempts were allowed
    assert queue.claim("w3", 0.5) is None
    failed = queue.get("acme", submitted.id)
    assert failed.state is JobState.FAILED and "gave up after 2 attempts" in failed.error
    queue.submit("acme", "next", HP, ROWS)  # it no longer counts against the tenant
    queue.close()


def test_heartbeats_keep_a_long_job(backend: Backend) -> None:
    queue = backend.open(lease_s=0.3)
    queue.submit("acme", "bot", HP, ROWS)
    job = queue.claim("w1", 2)
    for _ in range(6):
        time.sleep(0.1)
        assert queue.heartbeat(job).owned
    assert queue.claim("w2", 0.2) is None
    queue.close()


def test_retry_requeues_and_a_shutdown_does_not_count(queue: JobQueue) -> None:
    submitted = queue.submit("acme", "bot", HP, ROWS)
    job = queue.claim("w1", 2)
    assert queue.retry(job, "worker shut down", count_attempt=False)
    assert queue.get("acme", submitted.id).state is JobState.QUEUED
    again = queue.claim("w2", 2)
    assert again.id == submitted.id and again.record.attempts == 1
    assert queue.retry(again, "store unreachable")
    assert not queue.retry(again, "twice")  # no longer running
    third = queue.claim("w1", 2)
    assert third.record.attempts == 2 and third.record.error == "store unreachable"


def test_a_job_keeps_the_ids_of_its_uploaded_files_and_its_token_count(backend: Backend) -> None:
    queue = backend.open()
    made = queue.submit(
        "acme", "bot", HP, ROWS, ROWS, training_file_id="file-a", validation_file_id="file-b", trained_tokens=96
    )
    plain = queue.submit("acme", "bot2", HP, ROWS)
    queue.close()
    queue = backend.open()
    got = queue.get("acme", made.id)
    assert (got.training_file_id, got.validation_file_id, got.trained_tokens) == ("file-a", "file-b", 96)
    assert got == made and queue.list("acme")[1] == made
    assert queue.get("acme", plain.id).training_file_id is None and queue.get("acme", plain.id).trained_tokens is None
    queue.close()


def test_a_jobs_db_written_before_the_file_ids_opens_with_its_jobs(tmp_path: Path) -> None:
    """A jobs.db from before `ADDED_COLUMNS` (the table as SCHEMA creates it) gets them on open."""
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA)
        conn.execute(
            "INSERT INTO jobs (id, tenant, adapter_name, state, hyperparameters, training, created, updated) "
            "VALUES ('ftjob-old', 'acme', 'bot', 'queued', ?, ?, 1.0, 1.0)",
            (json.dumps(HP.model_dump(mode="json")), ROWS),
        )
    conn.close()
    queue = SQLiteJobQueue(path)
    old = queue.get("acme", "ftjob-old")
    assert old.state is JobState.QUEUED and old.training_file_id is None and old.trained_tokens is None
    new = queue.submit("acme", "bot2", HP, ROWS, training_file_id="file-a")
    assert queue.get("acme", new.id).training_file_id == "file-a"
    assert queue.claim("w1", 2).training_file == ROWS  # the old job runs
    queue.close()
    SQLiteJobQueue(path).close()  # opening it again adds nothing twice


def test_jobs_survive_a_restart(backend: Backend) -> None:
    before = backend.open()
    queued = before.submit("acme", "bot", HP, ROWS)
    running = before.submit("acme", "bot2", HP, ROWS)
    before.close()
    after = backend.open()  # a new process, say
    assert after.get("acme", queued.id).state is JobState.QUEUED
    job = after.claim("w1", 2)
    assert job.id == queued.id and job.training_file == ROWS
    assert after.claim("w1", 2).id == running.id
    after.close()


def test_open_job_queue_urls(tmp_path: Path) -> None:
    queue = open_job_queue(f"sqlite:///{tmp_path}/j/jobs.db")
    assert isinstance(queue, SQLiteJobQueue) and queue.path == tmp_path / "j" / "jobs.db"
    queue.close()
    assert isinstance(open_job_queue("redis://127.0.0.1:6379/15"), RedisJobQueue)
    for bad in ("", "http://x", "sqlite:///:memory:"):
        with pytest.raises(BackendInputError) as bad_url:
            open_job_queue(bad)
        assert bad_url.value.field == "jobs_url"  # names the setting, not an adapter
    assert jobs_url(Settings(store_url="sqlite:////var/x/adapters.db")) == "sqlite:////var/x/jobs.db"
    assert jobs_url(Settings(store_url="redis://r:6379/0")) == "redis://r:6379/0"
    assert jobs_url(Settings(jobs_url="sqlite:///j.db", store_url="redis://r")) == "sqlite:///j.db"
    assert jobs_url(Settings(store_url="redis+cluster://r:7000")) == "redis+cluster://r:7000"
    # A cluster is contacted at once: no node answering is a typed error naming the setting.
    with pytest.raises(BackendUnavailableError) as err:
        RedisJobQueue.from_url("redis+cluster://127.0.0.1:1", timeout=0.5)
    assert type(err.value) is BackendUnavailableError  # a queue outage is not the adapter store's
    assert err.value.field == "jobs_url" and "no Redis Cluster node answers" in err.value.reason


# -- workers -------------------------------------------------------------------------------


def _worker_model() -> tuple[torch.nn.Module, PreTrainedTokenizerBase, BaseModelSpec]:
    """The tiny model (seed 3) a test worker trains, its tokenizer and its description."""
    model = tiny_llama(seed=3)
    return model, byte_tokenizer(), described(model)


class ThreadWorker:
    """A `Worker` over the tiny model, in a thread of the test."""

    def __init__(self, queue: JobQueue, store: AdapterStore, worker_id: str = "inproc") -> None:
        self.worker = Worker(queue, store, *_worker_model(), worker_id=worker_id)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,), kwargs={"poll_s": 0.1})

    def __enter__(self) -> ThreadWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def wait_for(queue: JobQueue, job_id: str, done: Callable, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = queue.get("acme", job_id)
        if done(record):
            return record
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {record}")


def final(record) -> bool:
    return record.state.terminal


def test_worker_trains_publishes_and_fails_bad_input(backend: Backend) -> None:
    queue, store = backend.open(), backend.open_store()
    good = queue.submit("acme", "bot", HP.model_copy(update={"max_steps": 6}), ROWS, validation_file=ROWS)
    bad_rows = queue.submit("acme", "bad", HP, ROWS + b'{"prompt": "x"}\n')
    bad_fit = queue.submit("acme", "bad2", {"vector_length": 24, "max_seq_len": 32}, ROWS)
    with ThreadWorker(queue, store):
        done = wait_for(queue, good.id, final)
        failed = wait_for(queue, bad_rows.id, final)
        unfit = wait_for(queue, bad_fit.id, final)
    assert done.state is JobState.SUCCEEDED, done.error
    assert (done.adapter_version, done.step, done.total_steps) == (1, 6, 6)
    assert done.loss is not None and done.val_loss is not None and done.tokens_per_s > 0
    events = queue.events("acme", good.id)
    assert events[0].step == 1 and events[-1].step == 6 and events[-1].val_loss is not None
    record, adapter = store.get("acme", "bot")
    assert record.version == 1 and adapter.config.r == HP.r and adapter.weights.dtype == torch.float16
    assert failed.state is JobState.FAILED and failed.error == "training_file line 3: missing field 'completion'"
    assert unfit.state is JobState.FAILED and unfit.error.startswith("hyperparameters.vector_length: 24 does not")
    assert store.get_version("acme", "bad") is None and store.get_version("acme", "bad2") is None
    queue.close()
    store.close()


def test_cancel_a_running_job_publishes_nothing(backend: Backend) -> None:
    queue, store = backend.open(lease_s=0.6), backend.open_store()
    long = queue.submit("acme", "bot", HP.model_copy(update={"max_steps": 100_000}), ROWS)
    with ThreadWorker(queue, store):
        wait_for(queue, long.id, lambda r: r.step >= 1)
        queue.cancel("acme", long.id)
        cancelled = wait_for(queue, long.id, final, timeout=10)
    assert cancelled.state is JobState.CANCELLED and cancelled.step < 100_000
    assert store.get_version("acme", "bot") is None
    queue.close()
    store.close()


def test_a_publish_over_the_tenants_quota_fails_the_job_and_stores_nothing(backend: Backend) -> None:
    queue, store = backend.open(), backend.open_store()
    store.put("acme", "first", _trained_adapter())
    quotas = {"count": StoreQuota(max_adapters=1), "bytes": StoreQuota(max_bytes=1 << 10)}
    for name, quota in quotas.items():
        submitted = queue.submit("acme", name, HP, ROWS)
        worker = Worker(queue, store, *_worker_model(), quota_of=lambda tenant, quota=quota: quota)
        worker.run_job(queue.claim("w1", 2))
        record = queue.get("acme", submitted.id)
        assert record.state is JobState.FAILED and record.error.startswith("quota: "), record
        assert store.get_version("acme", name) is None
    assert store.count("acme")[0] == 1
    queue.close()
    store.close()


def test_a_publish_that_lands_after_its_tenant_was_deleted_is_withdrawn(backend: Backend) -> None:
    """The tenant's delete (jobs removed, adapters swept) runs between the worker's
    `mark_publishing` and its `store.put`: the put lands after the sweep, and the worker,
    finding its job gone at `finish`, removes it again."""
    queue, store = backend.open(), backend.open_store()
    submitted = queue.submit("acme", "bot", HP, ROWS)
    worker = Worker(queue, store, *_worker_model())
    real_put = store.put

    def put_after_the_delete(tenant, name, adapter, **kw):
        assert queue.remove(tenant) == 1 and store.list(tenant) == []  # the delete's steps 2 and 3
        return real_put(tenant, name, adapter, **kw)

    store.put = put_after_the_delete
    worker.run_job(queue.claim("w1", 2))
    assert store.get_version("acme", "bot") is None and store.count("acme") == (0, 0)
    with pytest.raises(JobNotFoundError):
        queue.get("acme", submitted.id)
    queue.close()
    store.close()


def _trained_adapter():
    model = tiny_llama(seed=3)
    prepared = prepare_job(described(model), byte_tokenizer(), HP, ROWS)
    return train_adapter(model, prepared.train, HP, prepared.config).adapter


def test_a_publish_interrupted_after_put_is_not_published_twice(backend: Backend) -> None:
    """The worker died between store.put and finish: the next attempt sees its bank in the
    store and finishes the job with that version instead of training and publishing again."""
    queue, store = backend.open(lease_s=0.3), backend.open_store()
    submitted = queue.submit("acme", "bot", HP, ROWS)
    job = queue.claim("dead", 2)
    worker = Worker(queue, store, *_worker_model(), worker_id="w2")
    prepared = prepare_job(worker.base_model, worker.tokenizer, HP, ROWS)
    adapter = train_adapter(worker.model, prepared.train, HP, prepared.config).adapter
    assert queue.mark_publishing(job, adapter.bank_id)
    store.put("acme", "bot", adapter)
    time.sleep(0.4)  # ... and died before finish
    again = queue.claim("w2", 2)
    assert again.publish_bank_id == adapter.bank_id
    worker.run_job(again)
    record = queue.get("acme", submitted.id)
    assert (record.state, record.adapter_version, record.step) == (JobState.SUCCEEDED, 1, 0)
    assert store.get_version("acme", "bot") == 1
    queue.close()
    store.close()


def test_a_family_members_earlier_version_is_not_taken_for_this_jobs_publish(backend: Backend) -> None:
    """A frozen-bank job publishes on a bank the adapter's earlier version has too: after
    an attempt that died having marked that bank, the next one must not take the earlier
    version for its own publish; it trains and publishes version 2 on the same bank."""
    queue, store = backend.open(lease_s=0.3), backend.open_store()
    earlier = _trained_adapter()
    store.put("acme", "bot", earlier)
    submitted = queue.submit("acme", "bot", HP.model_copy(update={"bank_id": earlier.bank_id}), ROWS)
    assert queue.mark_publishing(queue.claim("dead", 2), earlier.bank_id)
    time.sleep(0.4)  # ... and died before its put
    worker = Worker(queue, store, *_worker_model(), worker_id="w2")
    worker.run_job(queue.claim("w2", 2))
    record = queue.get("acme", submitted.id)
    assert (record.state, record.adapter_version, record.step) == (JobState.SUCCEEDED, 2, record.total_steps)
    assert record.step > 0 and store.get_record("acme", "bot").bank_id == earlier.bank_id
    queue.close()
    store.close()


def test_a_worker_killed_mid_job_is_replaced_and_nothing_is_half_published(backend: Backend, tmp_path: Path) -> None:
    """A real `run_worker` process gets SIGKILL while training. The job stays running
    until its lease lapses, nothing reaches the store, and another worker (the embedded
    one, in a thread here) re-runs it to completion."""
    model_dir = tmp_path / "tiny-model"
    tiny_llama(seed=3).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "VBSERVE_MODEL": str(model_dir),
        "VBSERVE_STORE_URL": backend.store_url,
        "VBSERVE_JOBS_URL": backend.url,
        "VBSERVE_REDIS_PREFIX": backend.prefix or "unused",
        "VBSERVE_TRAINING_LEASE_S": "1.0",
    }
    queue, store = backend.open(lease_s=1.0), backend.open_store()
    submitted = queue.submit("acme", "bot", HP.model_copy(update={"max_steps": 400}), ROWS)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from vbserve.worker_host import run_worker; run_worker()"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        running = wait_for(queue, submitted.id, lambda r: r.step >= 1 or r.state.terminal, timeout=120)
        assert running.state is JobState.RUNNING, running
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = queue.get("acme", submitted.id)
    assert killed_at.state is JobState.RUNNING and killed_at.step < 400 and killed_at.attempts == 1
    assert store.get_version("acme", "bot") is None  # nothing half-published
    settings = Settings(
        model=str(model_dir),
        store_url=backend.store_url,
        jobs_url=backend.url,
        redis_prefix=backend.prefix or "vbs",
        training_lease_s=1.0,
    )
    replacement = start_embedded_worker(settings)  # the same loop, in a thread of this process
    try:
        done = wait_for(queue, submitted.id, final, timeout=120)
    finally:
        replacement.stop(30)
    assert done.state is JobState.SUCCEEDED, done.error
    assert (done.attempts, done.adapter_version, done.step) == (2, 1, 400)
    assert store.get_version("acme", "bot") == 1
    queue.close()
    store.close()
