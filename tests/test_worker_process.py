"""Durability with real processes: a `vbserve worker` process killed with SIGKILL mid-job is
replaced by another that re-runs the job, and nothing is half-published; an API server
restarted while jobs wait in the queue loses none of them (both on a real Redis,
`VBSERVE_TEST_REDIS_URL`, skipped with the reason when none answers); and the API's own
embedded worker, a child process, killed mid-job: the API keeps serving, starts another
child, and the job runs again (on the default SQLite deployment)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, byte_tokenizer, redis_test_prefix, tiny_llama
from tests.test_api import api_settings
from tests.test_jobs import HP, REPO, ROWS, final, wait_for
from tests.test_jobs import one_torch_thread as one_torch_thread  # autouse
from tests.test_jobs_api import served
from vbserve.app import create_app
from vbserve.training.jobs import JobState, QueueLimits, RedisJobQueue
from vbserve.worker_host import TRAINING_NICE, WorkerProcess
from vbserve_store import RedisAdapterStore

LEASE_S = 1.0  # a killed worker's job is taken over this soon


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    with redis_test_prefix() as (_, prefix):
        yield prefix


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama and its tokenizer saved as a model directory a worker process loads."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(seed=3).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@contextmanager
def worker_process(model_dir: Path, prefix: str, log: Path) -> Iterator[subprocess.Popen]:
    """`vbserve worker` on the tiny model over Redis; stopped with SIGTERM unless killed."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "VBSERVE_REDIS_PREFIX": prefix,
        "VBSERVE_TRAINING_LEASE_S": str(LEASE_S),
    }
    command = [sys.executable, "-m", "vbserve.cli", "worker", "--model", str(model_dir)]
    command += ["--store-url", REDIS_URL, "--jobs-url", REDIS_URL]
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.redis
def test_a_killed_worker_process_is_replaced_and_nothing_is_half_published(
    model_dir: Path, redis_prefix: str, tmp_path: Path
) -> None:
    queue = RedisJobQueue.from_url(REDIS_URL, prefix=redis_prefix, limits=QueueLimits(lease_s=LEASE_S))
    store = RedisAdapterStore.from_url(REDIS_URL, prefix=redis_prefix)
    submitted = queue.submit("acme", "bot", HP.model_copy(update={"max_steps": 400}), ROWS)

    with worker_process(model_dir, redis_prefix, tmp_path / "first.log") as first:
        running = wait_for(queue, submitted.id, lambda r: r.step >= 1 or final(r), timeout=120)
        assert running.state is JobState.RUNNING, running
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    killed_at = queue.get("acme", submitted.id)
    assert killed_at.state is JobState.RUNNING and killed_at.step < 400 and killed_at.attempts == 1
    assert store.get_version("acme", "bot") is None  # nothing half-published
    assert f"job {submitted.id}: step 1/400, loss" in (tmp_path / "first.log").read_text()  # progress in the log

    with worker_process(model_dir, redis_prefix, tmp_path / "second.log") as second:
        done = wait_for(queue, submitted.id, final, timeout=120)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0  # a clean shutdown
    assert done.state is JobState.SUCCEEDED, done.error
    assert (done.attempts, done.adapter_version, done.step) == (2, 1, 400)
    record, adapter = store.get("acme", "bot")  # one complete version, which loads and validates
    assert record.version == 1 and adapter.bank_id == record.bank_id
    assert f"job {submitted.id}: published acme/bot v1" in (tmp_path / "second.log").read_text()
    queue.close()
    store.close()


@pytest.mark.redis
async def test_restarting_the_api_loses_no_queued_job(redis_prefix: str) -> None:
    form = {"adapter": "bot", "hyperparameters": HP.model_dump_json()}
    settings = api_settings(store_url=REDIS_URL, jobs_url=REDIS_URL, redis_prefix=redis_prefix)
    no_worker = settings.model_copy(update={"embedded_worker": False})  # the jobs stay queued
    before = create_app(no_worker, model=tiny_llama(seed=3), tokenizer=byte_tokenizer())
    async with served(before) as api:
        ids = []
        for name in ("bot", "bot2"):
            r = await api.post("/v1/fine_tuning/jobs", data={**form, "adapter": name}, files={"training_file": ROWS})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])

    after = create_app(settings, model=tiny_llama(seed=3), tokenizer=byte_tokenizer())  # with its worker this time
    async with served(after) as api:
        listed = (await api.get("/v1/fine_tuning/jobs")).json()["data"]
        assert [j["id"] for j in listed] == ids[::-1] and {j["status"] for j in listed} <= {"queued", "running"}
        for job_id in ids:
            r = await api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"})
            assert '"status":"succeeded"' in r.text, r.text
        assert (await api.get("/v1/adapters/bot2")).json()["version"] == 1


async def test_a_killed_embedded_worker_never_takes_the_api_down(model_dir: Path, tmp_path: Path) -> None:
    """`vbserve serve`'s shape (the app loads its model and opens SQLite store and queue
    itself, so its embedded worker is a child process): SIGKILL the child mid-job. The API
    keeps answering generations, starts a new child, and the job runs again as attempt 2."""
    settings = api_settings(
        model=str(model_dir),
        store_url=f"sqlite:///{tmp_path / 'adapters.db'}",
        embedded_worker=True,
        training_lease_s=LEASE_S,
    )
    app = create_app(settings)
    form = {"adapter": "bot", "hyperparameters": HP.model_copy(update={"max_steps": 400}).model_dump_json()}
    async with served(app) as api:
        worker = app.state.training_worker
        assert isinstance(worker, WorkerProcess) and worker.process.is_alive()
        r = await api.post("/v1/fine_tuning/jobs", data=form, files={"training_file": ROWS})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job = await wait_for_job(api, job_id, lambda j: j["progress"]["step"] >= 1 or j["status"] != "queued")
        assert job["status"] == "running" and job["attempts"] == 1, job
        killed = worker.process.pid
        assert os.getpriority(os.PRIO_PROCESS, killed) == TRAINING_NICE  # serving comes first
        os.kill(killed, signal.SIGKILL)
        killed_at = time.monotonic()

        model = (await api.get("/v1/models")).json()["data"][0]["id"]
        latencies = []
        for _ in range(3):  # the API serves on, whatever the worker does
            start = time.monotonic()
            r = await api.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 4})
            assert r.status_code == 200, r.text
            latencies.append(time.monotonic() - start)
        while worker.restarts == 0:
            assert time.monotonic() - killed_at < 60, "no new worker process"
            await asyncio.sleep(0.05)
        restarted_s = time.monotonic() - killed_at
        done = await wait_for_job(api, job_id, lambda j: j["status"] in ("succeeded", "failed"), timeout=180)
        assert (done["status"], done["attempts"], done["adapter_version"]) == ("succeeded", 2, 1), done
        assert worker.restarts == 1 and worker.process.pid != killed and worker.process.is_alive()
        assert (await api.get("/healthz")).status_code == 200
        print(
            f"\nembedded worker SIGKILLed mid-job: completions meanwhile 200 in {max(latencies):.2f} s at most; "
            f"new worker process after {restarted_s:.1f} s; job succeeded as attempt 2, "
            f"{time.monotonic() - killed_at:.1f} s after the kill"
        )
    assert not worker.process.is_alive()  # stopped with the app


async def wait_for_job(api, job_id: str, done, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = (await api.get(f"/v1/fine_tuning/jobs/{job_id}")).json()
        if done(job):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job}")
