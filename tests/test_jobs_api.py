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


# -- bad input ----------------------------------------------------------------------------------

GOOD = '{"prompt": "a", "completion": "b"}'
GOOD_FILE = f"{GOOD}\n{GOOD}\n".encode()


# (form fields over TASK_FORM, None: left out), file parts, status, error type, field, words of the message
BAD_UPLOADS = [
    ({}, files(f'{GOOD}\n{GOOD}\n{{"prompt": "a", "completion"'.encode()), 400, "invalid_request",
        "training_file line 3", "malformed JSON"),
    ({}, files(b""), 400, "invalid_request", "training_file", "contains no rows"),
    ({}, files(f'{GOOD}\n{{"prompt": "a"}}'.encode()), 400, "invalid_request", "training_file line 2",
        "missing field 'completion'"),
    ({"max_seq_len": "8"}, files(jsonl([{"prompt": "p" * 20, "completion": "c"}])), 400, "invalid_request",
        "training_file line 1", "exceed max_seq_len 8"),
    ({}, files(GOOD_FILE, b"not json"), 400, "invalid_request", "validation_file line 1", "malformed JSON"),
    ({"vector_length": "24"}, files(), 400, "invalid_request", "hyperparameters.vector_length",
        "24 does not divide"),
    ({"num_vectors": "512"}, files(), 400, "invalid_request", "hyperparameters.num_vectors",
        "exceeds the limit 256"),
    ({"r": "16"}, files(), 400, "invalid_request", "hyperparameters.r", "rank limit 8"),
    ({"max_seq_len": "1024"}, files(), 400, "invalid_request", "hyperparameters.max_seq_len", "context of 256"),
    ({"target_modules": "qkv_proj"}, files(), 400, "invalid_request", "hyperparameters.target_modules",
        "no linear layer 'qkv_proj'"),
    ({"learning_rate": "0.1"}, files(), 400, "invalid_request", "hyperparameters.learning_rate", "Extra inputs"),
    ({"batch_size": "four"}, files(), 400, "invalid_request", "hyperparameters.batch_size", "integer"),
    ({"hyperparameters": "{nope"}, files(), 400, "invalid_request", "hyperparameters", "malformed JSON"),
    ({"hyperparameters": '{"r": 2}', "r": "2"}, files(), 400, "invalid_request", "hyperparameters.r", "both"),
    ({"adapter": None}, files(), 400, "invalid_request", "adapter", "adapter name"),
    ({"adapter": "a/b"}, files(), 400, "invalid_request", "adapter", ""),
    ({"adapter": "base"}, files(), 409, "conflict", "adapter", "base model"),
    ({}, {"validation_file": ("v.jsonl", GOOD_FILE)}, 400, "invalid_request", "training_file", "required"),
    ({}, {**files(), "weights": ("w.bin", b"x")}, 400, "invalid_request", "weights", "unexpected file"),
    ({}, files(b"x" * (MAX_FILE_BYTES + 1)), 413, "too_large", "training_file", f"limit of {MAX_FILE_BYTES}"),
    ({}, files(GOOD_FILE, b"x" * (MAX_FILE_BYTES + 1)), 413, "too_large", "validation_file", "limit"),
]  # fmt: skip


async def test_bad_uploads_are_refused_and_queue_nothing(api):
    # One app for every case: each app start and stop costs about a second.
    for form, parts, status, kind, field, reason in BAD_UPLOADS:
        data = {k: v for k, v in {**TASK_FORM, **form}.items() if v is not None}
        r = await api.post("/v1/fine_tuning/jobs", data=data, files=parts)
        assert r.status_code == status, (field, r.text)
        error = error_of(r)
        assert (error["type"], error["field"]) == (kind, field) and reason in error["message"], error
    assert (await api.get("/v1/fine_tuning/jobs")).json()["data"] == []


async def test_oversized_and_non_multipart_bodies(api):
    r = await api.post("/v1/fine_tuning/jobs", json={"adapter": "x"})
    assert r.status_code == 415 and error_of(r)["field"] == "content-type"
    boundary = "vbserve-test-boundary"
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    # More than both files may hold, refused from its Content-Length before it is read.
    r = await api.post("/v1/fine_tuning/jobs", content=b"x" * (4 * MAX_FILE_BYTES), headers=headers)
    assert r.status_code == 413 and error_of(r)["type"] == "too_large"

    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="training_file"; filename="t.jsonl"\r\n\r\n'
    ).encode()
    sent = 0

    async def endless_file():  # chunked, no Content-Length: the file must be cut off at its limit
        nonlocal sent
        yield head
        for _ in range(1000):
            sent += 16 << 10
            yield (GOOD + "\n").encode() * 400

    r = await api.post("/v1/fine_tuning/jobs", content=endless_file(), headers=headers)
    assert r.status_code == 413 and error_of(r)["field"] == "training_file", r.text
    assert sent <= MAX_FILE_BYTES + (64 << 10)  # stopped right after the limit
    assert (await api.get("/v1/fine_tuning/jobs")).json()["data"] == []


# -- limits, cancel, tenants ------------------------------------------------------------------


async def test_job_limit_cancel_and_truncation(api):
    running = await submit(api, LONG)
    long_row = jsonl([{"prompt": "p" * 60, "completion": "c"}])
    truncated = await submit(api, {**LONG, "adapter": "t", "truncation": "truncate"}, training=long_row)
    await wait_for(api, running["id"], lambda j: j["progress"]["step"] >= 1)
    assert (await api.get(f"/v1/fine_tuning/jobs/{truncated['id']}")).json()["status"] == "queued"

    r = await api.post("/v1/fine_tuning/jobs", data=TASK_FORM, files=files())
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert error_of(r)["type"] == "overloaded" and "limit is 2" in error_of(r)["message"]
    listed = (await api.get("/v1/fine_tuning/jobs")).json()
    assert [j["id"] for j in listed["data"]] == [truncated["id"], running["id"]] and not listed["has_more"]
    page = (await api.get("/v1/fine_tuning/jobs", params={"limit": 1})).json()
    assert [j["id"] for j in page["data"]] == [truncated["id"]] and page["has_more"]

    r = await api.post(f"/v1/fine_tuning/jobs/{truncated['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"  # queued: at once
    r = await api.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel")
    assert r.json()["cancel_requested"] and r.json()["status"] in ("running", "cancelled")
    r = await api.get(f"/v1/fine_tuning/jobs/{running['id']}/events", headers={"accept": "text/event-stream"})
    stream = sse_events(r.text)
    assert stream[-1] == "[DONE]" and stream[-2]["status"] == "cancelled"
    assert (await api.get("/v1/adapters/lookup")).status_code == 404  # nothing published
    await submit(api)  # the cancelled jobs no longer count against the limit


async def test_other_tenants_jobs_are_not_found(api):
    job = await submit(api, LONG)
    api.app.dependency_overrides[current_tenant] = lambda: "globex"
    try:
        for method, path in [
            ("GET", f"/v1/fine_tuning/jobs/{job['id']}"),
            ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events"),
            ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true"),
            ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel"),
        ]:
            r = await api.request(method, path)
            assert r.status_code == 404 and error_of(r)["type"] == "not_found", (path, r.text)
        assert (await api.get("/v1/fine_tuning/jobs")).json()["data"] == []
        await submit(api, LONG)  # globex has its own job limit
    finally:
        del api.app.dependency_overrides[current_tenant]
    assert [j["id"] for j in (await api.get("/v1/fine_tuning/jobs")).json()["data"]] == [job["id"]]
    r = await api.get("/v1/fine_tuning/jobs/ftjob-nope")
    assert r.status_code == 404 and error_of(r)["field"] == "job_id"


async def test_fine_tuning_disabled_is_503(tmp_path):
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    app = create_app(api_settings(), model=task_model(), tokenizer=chat_tokenizer(), store=store)  # no jobs_url
    async with served(app) as client:
        for method, path in [("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel")]:
            r = await client.request(method, path)
            assert r.status_code == 503 and "disabled" in error_of(r)["message"], r.text
        r = await client.post("/v1/fine_tuning/jobs", data=TASK_FORM, files=files())
        assert r.status_code == 503
    store.close()
