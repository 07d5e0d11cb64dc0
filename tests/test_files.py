"""The uploaded-files store (server/vbserve/training/files): one contract, run against SQLite, one
Redis server and a Redis Cluster. Uploads are scoped by tenant, the per-tenant file and
byte quotas hold under concurrent uploads, and a refused upload stores nothing. Then the
routes' size limits and quota in process (the openai package drives the routes in
tests/test_openai_finetune.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.redis_cluster import redis_under_test
from tests.test_api import BASE, chat_tokenizer, error_of
from tests.test_jobs_api import MAX_FILE_BYTES, served
from tests.test_jobs_api import settings as jobs_settings
from tests.test_training import TASK_FILE, task_model
from vbserve.app import create_app
from vbserve.training import TrainingError
from vbserve.training.errors import DatasetTooLargeError, UnknownFileError
from vbserve.training.files import FileLimits, FileStore, RedisFileStore, SQLiteFileStore
from vbserve_store import QuotaExceededError
from vbserve_store.store import SQLiteAdapterStore

pytest_plugins = ["tests.redis_cluster"]  # the session fixture redis_cluster

ROWS = b'{"prompt": "key0:", "completion": "apple"}\n'


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def open_files(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., FileStore]]:
    """open_files(**FileLimits fields): a store on this test's storage location."""
    opened: list[FileStore] = []

    def track(store: FileStore) -> FileStore:
        opened.append(store)
        return store

    if request.param == "sqlite":
        yield lambda **kw: track(SQLiteFileStore(tmp_path / "jobs.db", limits=FileLimits(**kw)))
    else:
        url, context = redis_under_test(request, request.param)
        with context as (_, prefix):
            yield lambda **kw: track(RedisFileStore.from_url(url, prefix=prefix, limits=FileLimits(**kw)))
    for store in opened:
        store.close()


def test_put_get_content_list_delete(open_files) -> None:
    files = open_files()
    first = files.put("acme", "train.jsonl", "fine-tune", ROWS)
    second = files.put("acme", "ünïcode name.jsonl", "fine-tune", ROWS * 2)
    assert first.id.startswith("file-") and first.id != second.id
    assert (first.filename, first.purpose, first.bytes) == ("train.jsonl", "fine-tune", len(ROWS))
    assert files.get("acme", second.id) == second
    assert files.content("acme", second.id) == ROWS * 2
    assert files.list("acme") == [second, first]  # newest first
    assert files.list("acme", limit=1) == [second]
    assert files.list("acme", after=second.id) == [first]
    files.delete("acme", first.id)
    assert files.list("acme") == [second]
    for call in (files.get, files.content, files.delete):
        with pytest.raises(UnknownFileError) as caught:
            call("acme", first.id)
        assert caught.value.field == "file_id"
    assert open_files().get("acme", second.id) == second  # durable: another store on the same location


def test_another_tenants_file_is_unknown(open_files) -> None:
    files = open_files()
    mine = files.put("acme", "train.jsonl", "fine-tune", ROWS)
    for call in (files.get, files.content, files.delete):
        with pytest.raises(UnknownFileError):
            call("globex", mine.id)
    assert files.list("globex") == []
    with pytest.raises(TrainingError) as caught:
        files.list("globex", after=mine.id)
    assert caught.value.field == "after"
    assert files.content("acme", mine.id) == ROWS  # untouched
    assert files.remove("globex") == 0 and files.remove("acme") == 1
    assert files.list("acme") == []


@pytest.mark.parametrize(
    ("tenant", "filename", "purpose", "content", "field"),
    [
        ("acme", "a.jsonl", "assistants", ROWS, "purpose"),
        ("acme", "a.jsonl", "fine-tune", b"  \n", "file"),
        ("acme", "", "fine-tune", ROWS, "file"),
        ("acme", "a\r\nX-Evil: 1", "fine-tune", ROWS, "file"),
        ("acme", "x" * 256, "fine-tune", ROWS, "file"),
        ("ac/me", "a.jsonl", "fine-tune", ROWS, "tenant"),
    ],
)
def test_bad_uploads_are_refused_and_store_nothing(open_files, tenant, filename, purpose, content, field) -> None:
    files = open_files()
    with pytest.raises(TrainingError) as caught:
        files.put(tenant, filename, purpose, content)
    assert caught.value.field == field
    assert files.list("acme") == []


def test_file_size_and_tenant_quotas(open_files) -> None:
    files = open_files(max_file_bytes=len(ROWS) * 2, max_files_per_tenant=3, max_bytes_per_tenant=len(ROWS) * 4)
    with pytest.raises(DatasetTooLargeError):
        files.put("acme", "big.jsonl", "fine-tune", ROWS * 3)
    files.put("acme", "a.jsonl", "fine-tune", ROWS * 2)
    files.put("acme", "b.jsonl", "fine-tune", ROWS)
    with pytest.raises(QuotaExceededError, match=f"limit of {len(ROWS) * 4} bytes") as caught:  # 3 + 2 rows > 4
        files.put("acme", "c.jsonl", "fine-tune", ROWS * 2)
    assert caught.value.field == "file"
    third = files.put("acme", "c.jsonl", "fine-tune", ROWS)
    with pytest.raises(QuotaExceededError, match="limit of 3 files"):
        files.put("acme", "d.jsonl", "fine-tune", ROWS)
    assert len(files.list("acme")) == 3
    files.put("globex", "a.jsonl", "fine-tune", ROWS)  # quotas are per tenant
    files.delete("acme", third.id)  # a delete gives its count and bytes back
    files.put("acme", "d.jsonl", "fine-tune", ROWS)


def test_concurrent_uploads_never_overshoot_the_quota(open_files) -> None:
    files = open_files(max_files_per_tenant=5)

    def upload(i: int) -> bool:
        try:
            files.put("acme", f"{i}.jsonl", "fine-tune", ROWS)
        except QuotaExceededError:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(upload, range(20))) == 5
    assert len(files.list("acme")) == 5


# -- the routes' limits, in process ------------------------------------------------------------


@pytest.fixture
async def api(tmp_path: Path):
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    limits = {"files_max_per_tenant": 2, "max_request_bytes": 4096}
    app = create_app(jobs_settings(tmp_path, **limits), model=task_model(), tokenizer=chat_tokenizer(), store=store)
    async with served(app) as client:
        yield client
    store.close()


async def test_uploads_past_the_size_limit_or_the_quota_are_refused(api) -> None:
    """The files route has its own body limit (a file plus multipart slack), a file is cut
    off as it streams past VBSERVE_TRAINING_MAX_FILE_BYTES, and a tenant's third file is
    over its quota of two: each refused naming the field, nothing stored."""
    boundary = "vbserve-test-boundary"
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    r = await api.post("/v1/files", content=b"x" * (4 * MAX_FILE_BYTES), headers=headers)
    assert r.status_code == 413 and error_of(r)["type"] == "too_large", r.text
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'.encode()

    async def endless_file():  # chunked, no Content-Length
        yield head
        while True:
            yield TASK_FILE * 100

    r = await api.post("/v1/files", content=endless_file(), headers=headers)
    assert r.status_code == 413 and error_of(r)["field"] == "file", r.text

    larger_than_a_json_body = b"\n".join([TASK_FILE] * 50)  # 8.5 kB: the JSON limit is 4096 bytes
    for _ in range(2):
        r = await api.post(
            "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", larger_than_a_json_body)}
        )
        assert r.status_code == 200 and r.json()["bytes"] == len(larger_than_a_json_body), r.text
    r = await api.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", TASK_FILE)})
    assert r.status_code == 429 and error_of(r)["field"] == "file" and "limit of 2 files" in error_of(r)["message"]
    assert len((await api.get("/v1/files")).json()["data"]) == 2


async def test_a_json_job_request_is_held_to_the_json_body_limit(api) -> None:
    """The jobs route takes multipart uploads of two files, so its body limit is theirs; a
    JSON request is held to VBSERVE_MAX_REQUEST_BYTES instead."""
    body = {"model": BASE, "training_file": "file-x", "metadata": {"note": "x" * 8192}}
    r = await api.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 413 and error_of(r)["field"] == "body", r.text
    assert (await api.get("/v1/fine_tuning/jobs")).json()["data"] == []
