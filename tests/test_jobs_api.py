"""Fine-tuning over HTTP, in process (httpx over ASGI, lifespan running) on the tiny model
with the embedded worker: a job learns a made-up task and its adapter serves it; every
bad upload is refused with its status and field and queues nothing; cancel; tenants
see only their own jobs. Then the Python client and `vbctl` against a live server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from adapter_store.store import SQLiteAdapterStore
from clients import (
    AsyncVBServeClient,
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitedError,
    TooLargeError,
    VBServeClient,
)
from clients.cli import main as vbctl
from server.api import current_tenant
from server.app import create_app
from server.tenancy import SQLiteTenantRegistry
from tests.test_api import api_settings, chat_tokenizer, error_of, sse_events
from tests.test_training import ALL_LINEAR, TASK, TASK_FILE, jsonl, task_model
from tests.test_training import one_torch_thread as one_torch_thread  # autouse: tiny models run best on one thread

MAX_FILE_BYTES = 64 << 10
ADMIN_KEY = "admin-key-for-the-jobs-tests-0123456789"
# The task of tests/test_training.py as form fields: some in the JSON field, some apart.
TASK_FORM = {
    "adapter": "lookup",
    "hyperparameters": json.dumps({"lr_bank": 2e-2, "lr_logits": 5e-2, "warmup_ratio": 0.0}),
    "target_modules": ",".join(ALL_LINEAR),
    "r": "4",
    "vector_length": "16",
    "num_vectors": "64",
    "max_steps": "120",
    "batch_size": "4",
    "max_seq_len": "32",
}
LONG = {**TASK_FORM, "max_steps": "1000000"}  # runs until cancelled
GREEDY = {"temperature": 0, "max_tokens": 8}


def settings(tmp_path: Path, **overrides):
    return api_settings(
        jobs_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        training_max_file_bytes=MAX_FILE_BYTES,
        training_max_jobs_per_tenant=2,
        training_max_num_vectors=256,
        **overrides,
    )


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client


@pytest.fixture
async def api(tmp_path):
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    app = create_app(settings(tmp_path), model=task_model(), tokenizer=chat_tokenizer(), store=store)
    async with served(app) as client:
        client.app = app
        yield client
    store.close()


def files(training: bytes = TASK_FILE, validation: bytes | None = None) -> dict:
    parts = {"training_file": ("train.jsonl", training, "application/jsonl")}
    if validation is not None:
        parts["validation_file"] = ("val.jsonl", validation, "application/jsonl")
    return parts


async def submit(api: httpx.AsyncClient, form: dict = TASK_FORM, **kw) -> dict:
    r = await api.post("/v1/fine_tuning/jobs", data=form, files=files(**kw))
    assert r.status_code == 201, r.text
    return r.json()


async def wait_for(api: httpx.AsyncClient, job_id: str, done, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = (await api.get(f"/v1/fine_tuning/jobs/{job_id}")).json()
        if done(job):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job}")


def ended(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


async def complete(api: httpx.AsyncClient, prompt: str, model: str | None = None) -> str:
    body = {"prompt": prompt, **GREEDY, **({"model": model} if model else {})}
    r = await api.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# -- a job end to end -------------------------------------------------------------------------


async def test_a_job_learns_the_task_publishes_and_serves_it(api):
    created = await submit(api, validation=jsonl([{"prompt": "key0:", "completion": "apple"}]))
    assert created["object"] == "fine_tuning.job" and created["status"] == "queued"
    assert created["adapter"] == "lookup" and created["fine_tuned_model"] is None
    assert created["hyperparameters"]["r"] == 4 and created["hyperparameters"]["lr_bank"] == 2e-2
    assert created["hyperparameters"]["target_modules"] == ALL_LINEAR

    r = await api.get(f"/v1/fine_tuning/jobs/{created['id']}/events", params={"stream": "true"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    stream = sse_events(r.text)
    assert stream[-1] == "[DONE]"
    statuses = [s["status"] for s in stream[:-1] if s["object"] == "fine_tuning.job"]
    assert statuses[0] in ("queued", "running") and statuses[-1] == "succeeded"
    events = [s for s in stream[:-1] if s["object"] == "fine_tuning.job.event"]
    assert events[0]["step"] == 1 and events[-1]["step"] == 120 and events[-1]["total_steps"] == 120
    assert [e["step"] for e in events] == sorted({e["step"] for e in events})  # each once, in order
    assert events[-1]["loss"] < 0.3 * events[0]["loss"], (events[0], events[-1])
    assert events[-1]["val_loss"] is not None and events[-1]["tokens_per_s"] > 0

    job = (await api.get(f"/v1/fine_tuning/jobs/{created['id']}")).json()
    assert job["status"] == "succeeded" and job["fine_tuned_model"] == "lookup" and job["adapter_version"] == 1
    assert job["finished_at"] >= job["created_at"] and job["error"] is None
    assert job["progress"]["step"] == 120 and job["progress"]["loss"] == events[-1]["loss"]
    listed = (await api.get("/v1/fine_tuning/jobs/" + created["id"] + "/events")).json()
    assert listed["object"] == "list" and listed["data"] == events
    assert (await api.get("/v1/adapters/lookup")).json()["version"] == 1

    for prompt, completion in TASK.items():
        assert (await complete(api, prompt, "lookup")).startswith(completion), prompt
        assert not (await complete(api, prompt)).startswith(completion)

    r = await api.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel")
    assert r.status_code == 409 and error_of(r)["type"] == "conflict"  # it has ended


async def test_a_job_with_chat_rows(api):
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in TASK.items()
    ]
    job = await submit(api, {**TASK_FORM, "adapter": "chat", "max_steps": "3"}, training=jsonl(rows))
    done = await wait_for(api, job["id"], ended)
    assert done["status"] == "succeeded", done
