"""Fine-tuning over HTTP, in process (httpx over ASGI, lifespan running) on the tiny model
with the embedded worker: a job learns a made-up task and its adapter serves it; every
bad upload is refused with its status and field and queues nothing; limits, cancel;
tenants see only their own jobs. Then the Python client (sync and async, with API keys
and the typed auth and limit errors) and `vbctl train|jobs` against a live server with
authentication."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import serve_in_thread
from tests.test_api import BASE, api_settings, assert_sse_framing, chat_tokenizer, error_of, random_adapter, sse_events
from tests.test_training import ALL_LINEAR, TASK, TASK_FILE, TASK_HP, jsonl, task_model
from tests.test_training import one_torch_thread as one_torch_thread  # autouse: tiny models run best on one thread
from vbserve.api import current_tenant
from vbserve.api.routers.jobs import HYPERPARAMETER_FIELDS
from vbserve.app import create_app
from vbserve.tenancy import SQLiteTenantRegistry, TenantLimits
from vbserve.vblora.lora_export import to_lora
from vbserve_client import (
    AsyncVBServeClient,
    AuthenticationError,
    ConflictError,
    FineTuningJob,
    InvalidRequestError,
    JobEvent,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitedError,
    TooLargeError,
    VBServeClient,
)
from vbserve_client.cli import main as vbctl
from vbserve_store import decode_adapter, decode_bank, encode_adapter
from vbserve_store.store import SQLiteAdapterStore

MAX_FILE_BYTES = 64 << 10
ADMIN_KEY = "admin-key-for-the-jobs-tests-0123456789"


def task_form() -> dict[str, str]:
    """TASK_HP of tests/test_training.py as form fields: the rates in the JSON field, the
    rest as fields of their own."""
    fields = TASK_HP.model_dump(exclude_defaults=True)
    rates = {name: getattr(TASK_HP, name) for name in ("lr_bank", "lr_logits", "warmup_ratio")}
    fields = {name: value for name, value in fields.items() if name not in rates}
    return {
        "adapter": "lookup",
        "hyperparameters": json.dumps(rates),
        **{k: ",".join(v) if isinstance(v, list) else str(v) for k, v in fields.items()},
    }


TASK_FORM = task_form()
LONG = {**TASK_FORM, "max_steps": "1000000"}  # runs until cancelled
GREEDY = {"temperature": 0, "max_tokens": 8}


def settings(tmp_path: Path, **overrides):
    defaults = dict(
        jobs_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        training_max_file_bytes=MAX_FILE_BYTES,
        training_max_jobs_per_tenant=2,
        training_max_num_vectors=256,
        training_max_batch_tokens=128,
    )
    return api_settings(**(defaults | overrides))


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


async def wait_for(
    api: httpx.AsyncClient, job_id: str, done, timeout: float = 60.0, headers: dict | None = None
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = (await api.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers)).json()
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
    assert_sse_framing(r)
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


async def test_a_shared_bank_family_and_evaluation_in_the_job(api):
    """A first job makes the tenant's bank; a second trains against it frozen (`bank_of`),
    validating every 40 steps with exact match on two rows: the events carry the metrics,
    the checkpoint is the best step, and the member is published on the same bank, so a
    client holding the bank pulls the member without it."""
    first = await submit(api)
    assert (await wait_for(api, first["id"], ended))["status"] == "succeeded"
    family_bank = (await api.get("/v1/adapters/lookup")).json()["bank_id"]

    form = {**TASK_FORM, "adapter": "member", "bank_of": "lookup", "eval_steps": "40"}
    form["eval_exact_match_rows"] = "2"
    created = await submit(api, form, validation=TASK_FILE)
    assert created["hyperparameters"]["bank_id"] == family_bank and created["hyperparameters"]["bank_of"] is None
    assert (await wait_for(api, created["id"], ended))["status"] == "succeeded"
    events = (await api.get(f"/v1/fine_tuning/jobs/{created['id']}/events")).json()["data"]
    validated = [e for e in events if e["val_loss"] is not None]
    assert [e["step"] for e in validated] == [40, 80, 120]
    assert all(
        0 <= e["val_exact_match"] <= 1 and e["data"]["valid_exact_match"] == e["val_exact_match"] for e in validated
    )
    assert validated[-1]["val_exact_match"] == 1.0  # as serving shows below
    best = min(validated, key=lambda e: e["val_loss"])
    assert validated[-1]["best_step"] == best["step"] and validated[-1]["best_val_loss"] == best["val_loss"]
    [checkpoint] = (await api.get(f"/v1/fine_tuning/jobs/{created['id']}/checkpoints")).json()["data"]
    assert checkpoint["step_number"] == best["step"] and checkpoint["metrics"]["valid_loss"] == best["val_loss"]
    assert checkpoint["metrics"]["valid_exact_match"] == best["val_exact_match"]

    member = (await api.get("/v1/adapters/member")).json()
    assert member["bank_id"] == family_bank
    pulled = await api.get("/v1/adapters/member/content", params={"omit_bank": "true"})
    bank = decode_bank((await api.get(f"/v1/banks/{family_bank}")).content)
    adapter = decode_adapter(pulled.content, bank_resolver={family_bank: bank}.get)
    assert adapter.bank_id == family_bank and len(pulled.content) < member["body_bytes"] + 64
    for prompt, completion in TASK.items():
        assert (await complete(api, prompt, "member")).startswith(completion), prompt


async def test_shared_bank_jobs_are_refused_with_the_field(api):
    """Another tenant's bank is as absent as a made-up one (404 naming the field); a plain
    LoRA adapter's (it has none), a shape that does not fit the bank, or evaluation without
    validation rows is a 400."""
    services = api.app.state.services
    theirs = random_adapter(task_model(), seed=1)
    await asyncio.to_thread(services.store.put, "other-tenant", "theirs", theirs)
    await asyncio.to_thread(services.store.put, "default", "mine", random_adapter(task_model(), seed=2))
    plain = to_lora(random_adapter(task_model(), seed=3))
    await asyncio.to_thread(services.store.put, "default", "plain", plain)
    cases = [
        ({"bank_of": "plain"}, 400, "hyperparameters.bank_of"),  # a plain LoRA adapter has no bank
        ({"bank_id": theirs.bank_id}, 404, "hyperparameters.bank_id"),
        ({"bank_id": "sha256-" + "0" * 40}, 404, "hyperparameters.bank_id"),
        ({"bank_of": "theirs"}, 404, "hyperparameters.bank_of"),
        ({"bank_of": "mine", "num_vectors": "64"}, 400, "hyperparameters.num_vectors"),
        ({"bank_of": "mine", "bank_id": theirs.bank_id}, 400, "hyperparameters.bank_of"),
        ({"eval_steps": "5"}, 400, "hyperparameters.eval_steps"),
    ]
    base = {k: v for k, v in TASK_FORM.items() if k not in ("num_vectors", "vector_length")}
    for fields, status, field in cases:
        r = await api.post("/v1/fine_tuning/jobs", data={**base, **fields}, files=files())
        assert r.status_code == status and error_of(r)["field"] == field, (fields, r.text)
    assert (await api.get("/v1/fine_tuning/jobs")).json()["data"] == []


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
    ({"max_seq_len": "129", "batch_size": "256"}, files(), 400, "invalid_request", "hyperparameters.max_seq_len",
        "limit of 128 tokens per training forward"),
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
    r = await api.post("/v1/fine_tuning/jobs", content=b"adapter=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and error_of(r)["field"] == "content-type"
    r = await api.post(
        "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": "file-x", "adapter": "x"}
    )  # OpenAI's request has no `adapter`
    assert r.status_code == 400 and error_of(r)["field"] == "adapter", r.text
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


def raw_part(name: bytes, content: bytes, filename: bytes | None = None) -> bytes:
    disposition = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename else b"")
    return b"--B\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + content + b"\r\n"


# A raw multipart body (boundary B, each part already framed), the field its 400 names, words of the message
MALFORMED_FORMS = [
    (b"--B\r\nbad header\r\n\r\nx\r\n--B--\r\n", "body", "malformed"),
    (b"garbage", "body", "malformed"),
    (b"--B\r\nContent-Disposition: form-data\r\n\r\nx\r\n--B--\r\n", "body", '"name"'),
    (raw_part(b"adapter", b"\xff\xfe") + b"--B--\r\n", "adapter", "UTF-8"),
    (raw_part(b"hyperparameters", b" " * (65 << 10)) + b"--B--\r\n", "body", "'hyperparameters' is over"),
    # one field more than the form has (every hyperparameter, adapter and the hyperparameters JSON)
    (b"".join(raw_part(b"r", b"4") for _ in range(len(HYPERPARAMETER_FIELDS) + 3)) + b"--B--\r\n", "body", "fields"),
    (b"".join(raw_part(b"training_file", TASK_FILE, b"t.jsonl") for _ in range(3)) + b"--B--\r\n", "body", "files"),
]


async def test_malformed_multipart_bodies_are_400_naming_the_part(api):
    for body, field, words in MALFORMED_FORMS:
        r = await api.post(
            "/v1/fine_tuning/jobs", content=body, headers={"content-type": "multipart/form-data; boundary=B"}
        )
        assert r.status_code == 400 and error_of(r)["field"] == field and words in error_of(r)["message"], r.text
    r = await api.post("/v1/fine_tuning/jobs", content=b"x", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and error_of(r)["field"] == "body", r.text  # no boundary
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
    page = (await api.get("/v1/fine_tuning/jobs", params={"limit": 1, "after": truncated["id"]})).json()
    assert [j["id"] for j in page["data"]] == [running["id"]] and not page["has_more"]
    for cursor in ("ftjob-" + "0" * 24, "nope", "x" * 65):
        r = await api.get("/v1/fine_tuning/jobs", params={"after": cursor})
        assert r.status_code in (400, 422) and error_of(r)["field"].endswith("after"), r.text

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


async def test_a_job_over_the_tenants_quota_is_refused_at_creation(tmp_path):
    """A job's adapter is a put like any other: it must fit the tenant's adapter and byte
    quotas, checked before the job is queued (and again when it publishes: tests/test_jobs.py)."""
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    store.put("default", "old", random_adapter(task_model(), seed=1))
    used = store.count("default")[1]
    limits = {"tenant_max_adapters": 1, "tenant_max_adapter_bytes": used + 1000}
    app = create_app(settings(tmp_path, **limits), model=task_model(), tokenizer=chat_tokenizer(), store=store)
    async with served(app) as api:
        r = await api.post("/v1/fine_tuning/jobs", data=TASK_FORM, files=files())  # a new name: one too many
        assert r.status_code == 429, r.text
        assert (error_of(r)["type"], error_of(r)["field"]) == ("quota_exceeded", "adapter")
        assert "limit of 1 adapters" in error_of(r)["message"]
        r = await api.post("/v1/fine_tuning/jobs", data={**TASK_FORM, "adapter": "old"}, files=files())
        assert r.status_code == 429 and error_of(r)["field"] == "adapter", r.text  # a new version, too large
        assert "limit of" in error_of(r)["message"] and "bytes" in error_of(r)["message"]
        assert (await api.get("/v1/fine_tuning/jobs")).json()["data"] == []
        small = {**TASK_FORM, "adapter": "old", "num_vectors": "16", "target_modules": "q_proj"}
        job = await submit(api, {**small, "max_steps": "1000000"})  # fits: replaces "old"
        await api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    store.close()


async def test_training_files_are_checked_one_at_a_time_at_low_priority(tmp_path, monkeypatch):
    """Checking an upload tokenizes every row (minutes of CPU for a 32 MB file): uploads are
    checked by one thread at nice 10, so serving keeps the other cores and the scheduler's
    preference, and a flood beyond a few waiting is a 429 before any work."""
    from vbserve.api.routers import jobs as jobs_routes

    checking, seen = 0, []
    prepare = jobs_routes.prepare_job

    def observed(*args, **kwargs):
        nonlocal checking
        checking += 1
        seen.append((checking, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        try:
            time.sleep(0.3)
            return prepare(*args, **kwargs)
        finally:
            checking -= 1

    monkeypatch.setattr(jobs_routes, "prepare_job", observed)
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    app = create_app(
        settings(tmp_path, training_max_jobs_per_tenant=100),
        model=task_model(),
        tokenizer=chat_tokenizer(),
        store=store,
    )
    async with served(app) as api:
        uploads = [api.post("/v1/fine_tuning/jobs", data={**LONG, "adapter": f"a{i}"}, files=files()) for i in range(8)]
        answers = await asyncio.gather(*uploads)
        statuses = sorted(r.status_code for r in answers)
        assert statuses.count(201) == 5 and statuses.count(429) == 3, statuses  # 1 checked + 4 waiting
        assert all(error_of(r)["type"] == "overloaded" for r in answers if r.status_code == 429)
        assert seen and all(at_once == 1 for at_once, _ in seen), seen
        assert all(nice == 10 for _, nice in seen), seen
        for r in answers:
            if r.status_code == 201:
                await api.post(f"/v1/fine_tuning/jobs/{r.json()['id']}/cancel")
    store.close()


async def test_uploaded_files_are_checked_in_the_same_low_priority_thread(tmp_path, monkeypatch):
    """`POST /v1/files` tokenizes every row too: it goes through the same checking thread."""
    from vbserve.api.routers import files as files_routes

    priorities = []
    parse = files_routes.parse_jsonl

    def observed(*args, **kwargs):
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return parse(*args, **kwargs)

    monkeypatch.setattr(files_routes, "parse_jsonl", observed)
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    app = create_app(settings(tmp_path), model=task_model(), tokenizer=chat_tokenizer(), store=store)
    async with served(app) as api:
        r = await api.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", TASK_FILE)})
        assert r.status_code == 200, r.text
    assert priorities == [10]
    store.close()


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


# -- the Python client and vbctl against a live server -------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A live server with authentication: (URL, {tenant: API key})."""
    path = tmp_path_factory.mktemp("deployment")
    store, registry = SQLiteAdapterStore(path / "adapters.db"), SQLiteTenantRegistry(path / "tenants.db")
    keys = {}
    for name, limits in [
        ("acme", {}),
        ("globex", {}),
        ("slow", {"requests_per_s": 0.01}),
        ("full", {"max_adapters": 0}),
    ]:
        registry.create_tenant(name, TenantLimits(**limits))
        keys[name] = registry.create_key(name)[1]
    app = create_app(
        settings(path, admin_key=ADMIN_KEY),
        model=task_model(),
        tokenizer=chat_tokenizer(),
        store=store,
        tenants=registry,
    )
    with serve_in_thread(app) as url:
        yield url, keys
    registry.close()
    store.close()


def cancelling(job: FineTuningJob) -> bool:
    """A cancelled queued job ends at once; a running one keeps running for a step."""
    return job.status == "cancelled" or (job.status == "running" and job.cancel_requested)


CLIENT_HP = {"target_modules": ["q_proj", "v_proj"], "vector_length": 16, "num_vectors": 64, "max_seq_len": 32}


def test_client_auth_errors(deployment, monkeypatch):
    url, keys = deployment
    monkeypatch.delenv("VBSERVE_API_KEY", raising=False)
    with VBServeClient(url) as vb, pytest.raises(AuthenticationError) as err:
        vb.jobs.list()
    assert err.value.status == 401
    with VBServeClient(url, api_key=ADMIN_KEY) as vb, pytest.raises(PermissionDeniedError):
        vb.jobs.list()
    with VBServeClient(url, api_key=keys["slow"]) as vb:
        vb.jobs.list()
        with pytest.raises(RateLimitedError) as limited:
            vb.jobs.list()
    assert limited.value.status == 429 and limited.value.retry_after == 1.0
    with VBServeClient(url, api_key=keys["full"]) as vb, pytest.raises(QuotaExceededError):
        vb.adapters.push("one-too-many", encode_adapter(random_adapter(task_model(), seed=1)))


def test_sync_client_jobs(deployment, monkeypatch, tmp_path):
    url, keys = deployment
    monkeypatch.setenv("VBSERVE_API_KEY", keys["acme"])  # the default key
    data = tmp_path / "train.jsonl"
    data.write_bytes(TASK_FILE)
    with VBServeClient(url) as vb:
        job = vb.jobs.create(data, "sync-job", validation_file=TASK_FILE, max_steps=10, batch_size=2, **CLIENT_HP)
        assert job.status == "queued" and job.hyperparameters["max_steps"] == 10 and not job.ended
        updates = list(vb.jobs.follow(job.id))
        assert isinstance(updates[0], FineTuningJob) and updates[-1].status == "succeeded" and updates[-1].ended
        events = [u for u in updates if isinstance(u, JobEvent)]
        assert events[-1].step == 10 and events[-1].val_loss is not None
        assert vb.jobs.events(job.id) == events
        done = vb.jobs.get(job.id)
        assert (done.fine_tuned_model, done.adapter_version, done.progress.step) == ("sync-job", 1, 10)
        assert vb.jobs.list().data[0] == done
        assert vb.generate("key1:", adapter="sync-job", **GREEDY).text
        with pytest.raises(ConflictError):
            vb.jobs.cancel(job.id)

        with pytest.raises(InvalidRequestError) as err:
            vb.jobs.create(b'{"prompt": "a"}', "bad", **CLIENT_HP)
        assert err.value.field == "training_file line 1" and "completion" in err.value.message
        with pytest.raises(TooLargeError):
            vb.jobs.create(b"x" * (MAX_FILE_BYTES + 1), "big")

        long = vb.jobs.create(TASK_FILE, "sync-long", max_steps=1_000_000, **CLIENT_HP)
        with VBServeClient(url, api_key=keys["globex"]) as other, pytest.raises(NotFoundError):
            other.jobs.get(long.id)
        assert cancelling(vb.jobs.cancel(long.id))
        assert list(vb.jobs.follow(long.id))[-1].status == "cancelled"


async def test_async_client_jobs(deployment):
    url, keys = deployment
    async with AsyncVBServeClient(url, api_key=keys["acme"]) as vb:
        job = await vb.jobs.create(TASK_FILE, "async-job", max_steps=4, **CLIENT_HP)
        updates = [u async for u in vb.jobs.follow(job.id)]
        assert updates[-1].status == "succeeded"
        assert [e.step for e in await vb.jobs.events(job.id)][-1] == 4
        assert (await vb.jobs.get(job.id)).adapter_version == 1
        assert job.id in [j.id for j in (await vb.jobs.list(limit=5)).data]
        longs = [await vb.jobs.create(TASK_FILE, f"async-{i}", max_steps=1_000_000, **CLIENT_HP) for i in (1, 2)]
        with pytest.raises(OverloadedError) as err:  # the tenant's limit of 2 queued + running jobs
            await vb.jobs.create(TASK_FILE, "async-3", **CLIENT_HP)
        assert err.value.retry_after == 1.0
        for long in longs:
            assert cancelling(await vb.jobs.cancel(long.id))
        for long in longs:
            assert [u async for u in vb.jobs.follow(long.id)][-1].status == "cancelled"


def test_vbctl_train_follow_and_jobs(deployment, tmp_path, capsys, monkeypatch):
    url, keys = deployment
    data = tmp_path / "train.jsonl"
    data.write_bytes(TASK_FILE)
    hp = ["--r", "4", "--b", "16", "--h", "64", "--k", "2", "--modules", "q_proj,v_proj", "--max-seq-len", "32"]
    hp += ["--batch-size", "2", "--lr-bank", "0.01", "--lr-logits", "0.05", "--seed", "1"]

    def run(*args: str, code: int = 0) -> pytest.CaptureResult:
        result = vbctl(["--url", url, "--api-key", keys["acme"], *args])
        captured = capsys.readouterr()
        assert result == code, captured
        return captured

    done = run("train", str(data), "--adapter", "cli-job", "--validation", str(data), "--steps", "6", *hp, "--follow")
    assert "succeeded: adapter cli-job version 1" in done.out
    assert "6/6" in done.err and "loss" in done.err  # the progress bar, on stderr
    job_id = done.out.split()[1].rstrip(":")  # "created ftjob-...: training adapter cli-job"
    assert job_id in run("jobs", "ls").out
    shown = json.loads(run("jobs", "show", job_id).out)
    assert shown["status"] == "succeeded" and shown["hyperparameters"]["seed"] == 1
    assert "step 6/6: loss" in run("jobs", "events", job_id).out

    # A followed job that is cancelled makes vbctl exit 1; the key comes from the environment.
    monkeypatch.setenv("VBSERVE_API_KEY", keys["acme"])
    exit_code = []
    follow = ["--url", url, "train", str(data), "--adapter", "cli-long", "--steps", "1000000", *hp, "--follow"]
    thread = threading.Thread(target=lambda: exit_code.append(vbctl(follow)))
    thread.start()
    with VBServeClient(url) as vb:
        deadline = time.monotonic() + 30
        while not (running := [j for j in vb.jobs.list().data if j.adapter == "cli-long" and j.progress.step]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert "cancel requested" in run("jobs", "cancel", running[0].id).out
    thread.join(30)
    assert exit_code == [1] and f"{running[0].id} cancelled" in capsys.readouterr().err
    assert "cancelled" in run("jobs", "events", running[0].id, "--follow", code=1).out
    assert vbctl(["--url", url, "--api-key", "wrong", "jobs", "ls"]) == 1
    assert "unauthorized" in capsys.readouterr().err


async def test_a_job_queue_outage_is_503_naming_the_queue(tmp_path, caplog):
    """The queue's own unavailable error (not the adapter store's) maps to 503 with
    Retry-After, like any backend outage; the log names what failed."""
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    # No embedded worker: none may be inside a claim when the queue closes under it.
    app = create_app(
        settings(tmp_path, embedded_worker=False), model=task_model(), tokenizer=chat_tokenizer(), store=store
    )
    async with served(app) as api:
        app.state.services.jobs.close()  # every later call: BackendUnavailableError("jobs")
        r = await api.get("/v1/fine_tuning/jobs")
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert error_of(r)["type"] == "unavailable" and error_of(r)["field"] == "jobs"
        assert "the job queue is closed" in caplog.text
    store.close()
