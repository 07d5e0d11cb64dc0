"""Tenants, API keys and per-tenant limits: the registry contract on both backends, and
through the HTTP API with an admin key configured (isolation, 401/403, quotas, rate and
concurrency limits, body limits, request ids)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
from collections.abc import Iterator

import httpx
import pytest
import torch

from tests.conftest import tiny_llama
from tests.redis_cluster import redis_under_test
from tests.test_api import api_settings, chat_tokenizer, error_of, random_adapter
from tests.test_jobs_api import LONG, TASK_FORM, ended, files, served, wait_for
from tests.test_training import one_torch_thread as one_torch_thread  # autouse: tiny models run best on one thread
from tests.test_training import task_model
from vbserve.app import create_app
from vbserve.settings import Settings
from vbserve.tenancy import (
    RedisTenantRegistry,
    SQLiteTenantRegistry,
    TenantExistsError,
    TenantLimits,
    TenantNotFoundError,
    TenantRegistry,
)
from vbserve_store import AdapterStore, RedisAdapterStore, decode_adapter, encode_adapter
from vbserve_store.store import SQLiteAdapterStore

ADMIN_KEY = "admin-secret-for-tests-0123456789"
GREEDY = {"temperature": 0, "max_tokens": 8}
pytest_plugins = ["tests.redis_cluster"]  # the session fixture redis_cluster

# -- the registry, on both backends ----------------------------------------------------------


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def registry(request, tmp_path) -> Iterator[tuple[TenantRegistry, callable]]:
    """A registry and a function that returns every byte it stored (to look for secrets)."""
    if request.param == "sqlite":
        path = tmp_path / "tenants.db"
        opened = SQLiteTenantRegistry(path)

        def raw() -> str:
            with sqlite3.connect(path) as conn:
                return "\n".join(row[0] for row in conn.execute("SELECT doc FROM documents"))

        yield opened, raw
        opened.close()
        return
    url, context = redis_under_test(request, request.param)
    with context as (client, prefix):
        opened = RedisTenantRegistry.from_url(url, prefix=prefix)

        def raw() -> str:
            return "\n".join(v.decode() for key in client.scan_iter(match=f"{prefix}:*") for v in client.hvals(key))

        yield opened, raw
        opened.close()


def test_keys_authenticate_their_tenant_and_only_while_valid(registry) -> None:
    reg, raw = registry
    acme = reg.create_tenant("acme", TenantLimits(max_adapters=3))
    reg.create_tenant("globex")
    with pytest.raises(TenantExistsError):
        reg.create_tenant("acme")
    record, key = reg.create_key("acme", "ci")
    _, other_key = reg.create_key("globex")
    assert reg.authenticate(key) == acme and reg.authenticate(key).limits.max_adapters == 3
    assert reg.authenticate(other_key).name == "globex"
    # The key itself is never stored: only its HMAC.
    assert key not in raw() and key.rsplit(".", 1)[1] not in raw() and record.key_hash in raw()
    # Wrong secret with a real key id, malformed keys, an unknown id: all refused alike.
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    for bad in (forged, "", "vbs", "Bearer x", key + "x", "vbs.000000000000." + "A" * 43):
        assert reg.authenticate(bad) is None, bad
    assert reg.revoke_key("acme", record.key_id).revoked is not None
    assert reg.authenticate(key) is None
    with pytest.raises(TenantNotFoundError):
        reg.revoke_key("acme", "000000000000")
    with pytest.raises(TenantNotFoundError):  # a key of another tenant is not found, not revoked
        reg.revoke_key("acme", reg.list_keys("globex")[0].key_id)
    assert reg.authenticate(other_key) is not None


def test_deleting_a_tenant_disables_its_keys(registry) -> None:
    reg, _ = registry
    reg.create_tenant("acme")
    _, key = reg.create_key("acme")
    old = reg.get_tenant("acme").incarnation
    reg.delete_tenant("acme")
    assert reg.authenticate(key) is None and reg.list_keys("acme") == []
    with pytest.raises(TenantNotFoundError):
        reg.get_tenant("acme")
    assert not reg.is_current("acme", old)
    new = reg.create_tenant("acme").incarnation  # the name is free again, and the old key stays dead
    assert reg.authenticate(key) is None and reg.list_keys("acme") == []
    assert new != old and reg.is_current("acme", new) and not reg.is_current("acme", old)


def test_a_key_of_a_deleted_incarnation_never_acts_for_the_new_tenant(registry) -> None:
    """A delete that stopped after removing the tenant, before its keys (a crash, or the
    name created again meanwhile): the old key still exists, and must not authenticate as
    the tenant now holding the name."""
    reg, _ = registry
    reg.create_tenant("acme")
    _, key = reg.create_key("acme")
    assert reg.authenticate(key).name == "acme"
    assert reg._remove("tenant", "acme")  # the delete's first step only
    reg.create_tenant("acme")
    assert reg.authenticate(key) is None
    _, new_key = reg.create_key("acme")
    assert reg.authenticate(new_key).name == "acme"


def test_limits_update_and_listing(registry) -> None:
    reg, _ = registry
    for name in ("b", "a", "c"):
        reg.create_tenant(name)
    assert [t.name for t in reg.list_tenants()] == ["a", "b", "c"]
    assert reg.set_limits("b", TenantLimits(requests_per_s=2.5)).limits.requests_per_s == 2.5
    assert reg.get_tenant("b").limits == TenantLimits(requests_per_s=2.5)
    with pytest.raises(TenantNotFoundError):
        reg.set_limits("zzz", TenantLimits())


# -- through the API -------------------------------------------------------------------------


class Deployment:
    """An app with an admin key, and helpers to act as the admin or as a tenant."""

    def __init__(self, client: httpx.AsyncClient, registry: TenantRegistry) -> None:
        self.client = client
        self.registry = registry

    async def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        return await self.client.request(method, path, headers=bearer(ADMIN_KEY), **kwargs)

    async def tenant(self, name: str, **limits) -> str:
        """Create a tenant through the admin API; return a key for it."""
        r = await self.admin("POST", "/v1/admin/tenants", json={"name": name, "limits": limits})
        assert r.status_code == 201, r.text
        r = await self.admin("POST", f"/v1/admin/tenants/{name}/keys", json={"description": "test"})
        assert r.status_code == 201, r.text
        return r.json()["key"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def deployment(tmp_path):
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    registry = SQLiteTenantRegistry(tmp_path / "tenants.db")
    settings = api_settings(admin_key=ADMIN_KEY, max_request_bytes=64 << 10)
    app = create_app(settings, model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store, tenants=registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            deployment = Deployment(client, registry)
            deployment.model = tiny_llama(seed=7)  # unwrapped: what adapters are made for
            deployment.app = app
            yield deployment
    registry.close()
    store.close()


async def test_a_tenant_cannot_touch_another_tenants_adapter(deployment) -> None:
    api = deployment.client
    a, b = await deployment.tenant("acme"), await deployment.tenant("globex")
    blob = encode_adapter(random_adapter(deployment.model, seed=1))
    r = await api.put("/v1/adapters/bot", content=blob, headers=bearer(a))
    assert r.status_code == 201, r.text
    bank_id = r.json()["bank_id"]
    own = await api.post("/v1/completions", json={"model": "bot", "prompt": "hi", **GREEDY}, headers=bearer(a))
    assert own.status_code == 200, own.text
    a_content = decode_adapter((await api.get("/v1/adapters/bot/content", headers=bearer(a))).content)

    # B sees nothing of it: every route answers as if it did not exist (404, no name leak).
    assert (await api.get("/v1/adapters", headers=bearer(b))).json()["data"] == []
    models = (await api.get("/v1/models", headers=bearer(b))).json()["data"]
    assert "bot" not in [m["id"] for m in models]
    for method, path, kwargs in [
        ("GET", "/v1/adapters/bot", {}),
        ("GET", "/v1/adapters/bot/content", {}),
        ("GET", "/v1/adapters/bot/content?format=peft", {}),
        ("GET", f"/v1/banks/{bank_id}", {}),
        ("DELETE", "/v1/adapters/bot", {}),
        ("POST", "/v1/completions", {"json": {"model": "bot", "prompt": "hi", **GREEDY}}),
        ("POST", "/v1/chat/completions", {"json": {"model": "bot", "messages": [{"role": "user", "content": "x"}]}}),
        ("POST", "/generate", {"json": {"inputs": "hi", "parameters": {"adapter_id": "bot", "max_new_tokens": 4}}}),
        ("POST", "/", {"json": {"inputs": "hi", "parameters": {"adapter_id": "bot", "max_new_tokens": 4}}}),
        ("POST", "/", {"json": {"inputs": "hi", "stream": True, "parameters": {"adapter_id": "bot"}}}),
    ]:
        r = await api.request(method, path, headers=bearer(b), **kwargs)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert error_of(r)["type"] == "not_found"
    # B's put of the same name makes B's own adapter; A's is untouched.
    r = await api.put(
        "/v1/adapters/bot", content=encode_adapter(random_adapter(deployment.model, seed=2)), headers=bearer(b)
    )
    assert r.status_code == 201 and r.json()["version"] == 1
    after = decode_adapter((await api.get("/v1/adapters/bot/content", headers=bearer(a))).content)
    # (compared decoded: safetensors writes header metadata in no fixed order)
    assert all(torch.equal(getattr(after, t), getattr(a_content, t)) for t in ("bank", "indices", "weights"))
    assert (await api.get("/v1/adapters/bot", headers=bearer(a))).json()["version"] == 1
    again = await api.post("/v1/completions", json={"model": "bot", "prompt": "hi", **GREEDY}, headers=bearer(a))
    assert again.json()["choices"][0]["text"] == own.json()["choices"][0]["text"]


async def test_missing_wrong_or_revoked_keys_get_401(deployment) -> None:
    api = deployment.client
    key = await deployment.tenant("acme")
    assert (await api.get("/v1/adapters", headers=bearer(key))).status_code == 200
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    for headers in ({}, bearer(forged), bearer("nonsense"), {"Authorization": key}, {"Authorization": "Basic abc"}):
        r = await api.get("/v1/adapters", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert error_of(r) == {"type": "unauthorized", "message": error_of(r)["message"], "field": "Authorization"}
        assert r.headers["www-authenticate"] == "Bearer"
    key_id = (await deployment.admin("GET", "/v1/admin/tenants/acme/keys")).json()["data"][0]["key_id"]
    assert (await deployment.admin("DELETE", f"/v1/admin/tenants/acme/keys/{key_id}")).json()["revoked"] is not None
    assert (await api.get("/v1/adapters", headers=bearer(key))).status_code == 401
    assert (await api.post("/v1/completions", json={"prompt": "x"}, headers=bearer(key))).status_code == 401


async def test_admin_routes_need_the_admin_key_and_tenant_routes_a_tenant_key(deployment) -> None:
    api = deployment.client
    key = await deployment.tenant("acme")
    assert (await api.get("/v1/admin/tenants")).status_code == 401
    assert (await api.get("/v1/admin/tenants", headers=bearer("wrong"))).status_code == 401
    r = await api.get("/v1/admin/tenants", headers=bearer(key))
    assert r.status_code == 403 and error_of(r)["type"] == "forbidden"
    r = await api.get("/v1/adapters", headers=bearer(ADMIN_KEY))
    assert r.status_code == 403 and error_of(r)["type"] == "forbidden"
    listed = (await deployment.admin("GET", "/v1/admin/tenants")).json()["data"]
    assert [t["name"] for t in listed] == ["acme"]
    # Bad admin input: named field, nothing created.
    r = await deployment.admin("POST", "/v1/admin/tenants", json={"name": "a/b"})
    assert r.status_code == 400 and error_of(r)["field"] == "name"
    r = await deployment.admin("POST", "/v1/admin/tenants", json={"name": "x", "limits": {"max_adapters": -1}})
    assert r.status_code == 422 and error_of(r)["field"] == "limits.max_adapters"
    r = await deployment.admin("POST", "/v1/admin/tenants", json={"name": "acme"})
    assert r.status_code == 409
    assert (await deployment.admin("POST", "/v1/admin/tenants/nobody/keys")).status_code == 404
    assert [t["name"] for t in (await deployment.admin("GET", "/v1/admin/tenants")).json()["data"]] == ["acme"]


async def test_deleting_a_tenant_revokes_keys_and_deletes_adapters(deployment) -> None:
    api = deployment.client
    key = await deployment.tenant("acme")
    blob = encode_adapter(random_adapter(deployment.model, seed=1))
    assert (await api.put("/v1/adapters/bot", content=blob, headers=bearer(key))).status_code == 201
    info = (await deployment.admin("GET", "/v1/admin/tenants/acme")).json()
    assert info["adapters"] == 1 and info["stored_bytes"] > 0
    assert (await deployment.admin("DELETE", "/v1/admin/tenants/acme")).status_code == 204
    assert (await api.get("/v1/adapters", headers=bearer(key))).status_code == 401
    key = await deployment.tenant("acme")  # re-created: starts empty
    assert (await api.get("/v1/adapters", headers=bearer(key))).json()["data"] == []


async def test_adapter_quota(deployment) -> None:
    api = deployment.client
    key = await deployment.tenant("acme", max_adapters=1)
    blob = encode_adapter(random_adapter(deployment.model, seed=1))
    assert (await api.put("/v1/adapters/one", content=blob, headers=bearer(key))).status_code == 201
    r = await api.put("/v1/adapters/two", content=blob, headers=bearer(key))
    assert r.status_code == 429 and error_of(r)["type"] == "quota_exceeded" and error_of(r)["field"] == "name"
    assert [a["name"] for a in (await api.get("/v1/adapters", headers=bearer(key))).json()["data"]] == ["one"]
    assert (await api.put("/v1/adapters/one", content=blob, headers=bearer(key))).status_code == 200  # replace: fine
    r = await deployment.admin("PUT", "/v1/admin/tenants/acme/limits", json={"max_adapter_bytes": 10})
    assert r.json()["effective_limits"]["max_adapter_bytes"] == 10
    r = await api.put(
        "/v1/adapters/one", content=encode_adapter(random_adapter(deployment.model, seed=2, r=8)), headers=bearer(key)
    )
    assert r.status_code == 429 and error_of(r)["field"] == "adapter"


async def test_rate_limit_per_tenant(deployment) -> None:
    api = deployment.client
    noisy, quiet = await deployment.tenant("noisy", requests_per_s=2), await deployment.tenant("quiet")
    statuses = [(await api.get("/v1/adapters", headers=bearer(noisy))).status_code for _ in range(8)]
    assert statuses[:4] == [200] * 4 and 429 in statuses  # a burst of 2 s worth, then refused
    r = await api.get("/v1/adapters", headers=bearer(noisy))
    assert r.status_code == 429 and error_of(r)["type"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
    # Another tenant is not affected.
    assert [(await api.get("/v1/adapters", headers=bearer(quiet))).status_code for _ in range(8)] == [200] * 8


async def test_concurrent_generations_per_tenant(deployment) -> None:
    api = deployment.client
    key = await deployment.tenant("acme", max_concurrent_generations=2)
    other = await deployment.tenant("globex")
    generations = deployment.app.state.services.generations
    # httpx's ASGI transport returns a response only once it is complete, so the held
    # generations are taken directly from the limiter the routes use.
    assert generations.acquire("acme", 2) and generations.acquire("acme", 2)
    for path, body in [
        ("/v1/completions", {"prompt": "x", **GREEDY}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], **GREEDY}),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 4}}),
        ("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 4}}),
        ("/", {"inputs": "x", "parameters": {"max_new_tokens": 4}}),
    ]:
        r = await api.post(path, json=body, headers=bearer(key))
        assert r.status_code == 429 and error_of(r)["type"] == "rate_limited", (path, r.text)
    assert (await api.post("/v1/completions", json={"prompt": "x", **GREEDY}, headers=bearer(other))).status_code == 200
    generations.release("acme")
    # One free slot: generations, streamed or not, take it and give it back when done.
    stream = {"prompt": "x", "stream": True, **GREEDY}
    for body in ({"prompt": "x", **GREEDY}, stream, stream):
        assert (await api.post("/v1/completions", json=body, headers=bearer(key))).status_code == 200
    assert generations.active("acme") == 1
    generations.release("acme")
    assert generations.active("acme") == 0


async def test_every_tenant_route_requires_a_key(deployment) -> None:
    """Enumerates the app's routes, so a route added without the tenant check fails here."""
    public = {"/healthz", "/readyz", "/metrics"}
    checked = 0
    for template, operations in deployment.app.openapi()["paths"].items():
        if template in public:
            continue
        path = re.sub(r"\{[a-z_]+\}", "x", template)
        for method in operations:
            r = await deployment.client.request(method, path, headers=bearer("vbs.000000000000." + "A" * 43))
            assert r.status_code == 401, (method, template, r.status_code, r.text)
            checked += 1
    assert checked >= 15


async def test_oversized_bodies_are_refused_before_being_read(deployment) -> None:
    api = deployment.client
    key = await deployment.tenant("acme")
    big = json.dumps({"prompt": "x" * (80 << 10)}).encode()
    r = await api.post("/v1/completions", content=big, headers={**bearer(key), "content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["type"] == "too_large" and error_of(r)["field"] == "body"

    async def chunked():  # no Content-Length: refused while reading
        for _ in range(20):
            yield b" " * (8 << 10)

    r = await api.post(
        "/v1/completions", content=chunked(), headers={**bearer(key), "content-type": "application/json"}
    )
    assert r.status_code == 413
    assert (await api.post("/v1/completions", json={"prompt": "x", **GREEDY}, headers=bearer(key))).status_code == 200


async def test_request_ids_and_structured_access_log(deployment, caplog) -> None:
    key = await deployment.tenant("acme")
    with caplog.at_level(logging.INFO, logger="vbserve.access"):
        r = await deployment.client.get("/v1/adapters", headers={**bearer(key), "X-Request-ID": "req-123"})
        generated = await deployment.client.get("/healthz")
    assert r.headers["x-request-id"] == "req-123"
    assert len(generated.headers["x-request-id"]) == 32
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "vbserve.access"]
    mine = next(line for line in lines if line["request_id"] == "req-123")
    assert mine | {"duration_ms": 0} == {
        "event": "request",
        "request_id": "req-123",
        "method": "GET",
        "path": "/v1/adapters",
        "status": 200,
        "duration_ms": 0,
        "tenant": "acme",
    }
    assert key not in caplog.text and ADMIN_KEY not in caplog.text


async def test_single_tenant_mode_has_no_admin_api(tmp_path) -> None:
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    app = create_app(api_settings(), model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://test") as api:
        assert (await api.get("/v1/adapters")).status_code == 200  # no key needed
        r = await api.get("/v1/admin/tenants", headers=bearer(ADMIN_KEY))
        assert r.status_code == 403 and "single-tenant" in error_of(r)["message"]
    store.close()


async def test_concurrent_quota_through_the_api(deployment) -> None:
    api = deployment.client
    key = await deployment.tenant("acme", max_adapters=3)
    blob = encode_adapter(random_adapter(deployment.model, seed=1))
    results = await asyncio.gather(
        *(api.put(f"/v1/adapters/n{i}", content=blob, headers=bearer(key)) for i in range(10))
    )
    assert sorted(r.status_code for r in results) == [201] * 3 + [429] * 7


def test_tenants_and_jobs_live_beside_the_store() -> None:
    for url in ("redis://r:6379/0", "rediss+cluster://r:7000"):
        assert Settings(store_url=url).url_beside_store("tenants.db") == url
    assert (
        Settings(store_url="sqlite:///data/adapters.db").url_beside_store("tenants.db") == "sqlite:///data/tenants.db"
    )


# -- deleting a tenant leaves nothing behind, on both backends ---------------------------------


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def full_deployment(request, tmp_path):
    """Deployment with store, registry and job queue on one backend, and the embedded
    worker (a thread: the model is injected) running jobs."""
    if request.param == "sqlite":
        store: AdapterStore = SQLiteAdapterStore(tmp_path / "adapters.db")
        registry: TenantRegistry = SQLiteTenantRegistry(tmp_path / "tenants.db")
        backend = {"jobs_url": f"sqlite:///{tmp_path / 'jobs.db'}"}
        async for deployment in _full_deployment(store, registry, backend):
            yield deployment
        return
    url, context = redis_under_test(request, "redis")
    with context as (_, prefix):
        store = RedisAdapterStore.from_url(url, prefix=prefix)
        registry = RedisTenantRegistry.from_url(url, prefix=prefix)
        async for deployment in _full_deployment(store, registry, {"jobs_url": url, "redis_prefix": prefix}):
            yield deployment


async def _full_deployment(store: AdapterStore, registry: TenantRegistry, backend: dict):
    settings = api_settings(admin_key=ADMIN_KEY, embedded_worker=True, training_max_num_vectors=256, **backend)
    app = create_app(settings, model=task_model(), tokenizer=chat_tokenizer(), store=store, tenants=registry)
    async with served(app) as client:
        deployment = Deployment(client, registry)
        deployment.model, deployment.store = task_model(), store
        yield deployment
    registry.close()
    store.close()


async def test_an_upload_that_authenticated_before_the_delete_does_not_land(full_deployment) -> None:
    """The body arrives in two parts, the tenant is deleted between them: the request had
    authenticated, its put (an adapter, a job) comes after the delete's sweep, and must
    not stay."""
    api, store = full_deployment.client, full_deployment.store
    blob = encode_adapter(random_adapter(full_deployment.model, seed=1))
    # A job submission racing the delete in the same way: its form, encoded by httpx.
    form = httpx.Request("POST", "http://test", data=LONG, files=files())
    job_body, job_type = form.read(), form.headers["content-type"]
    upload = httpx.Request(
        "POST", "http://test", data={"purpose": "fine-tune"}, files={"file": files()["training_file"]}
    )
    requests = [
        ("PUT", "/v1/adapters/bot", blob, {}),
        ("POST", "/v1/fine_tuning/jobs", job_body, {"content-type": job_type}),
        ("POST", "/v1/files", upload.read(), {"content-type": upload.headers["content-type"]}),
    ]
    half_sent, deleted = asyncio.Event(), asyncio.Event()

    async def two_parts(body: bytes):
        yield body[: len(body) // 2]
        half_sent.set()  # the app asks for more: it authenticated and is reading the body
        await deleted.wait()
        yield body[len(body) // 2 :]

    for method, path, body, headers in requests:
        half_sent.clear(), deleted.clear()
        key = await full_deployment.tenant("acme")
        sent = api.request(method, path, content=two_parts(body), headers={**bearer(key), **headers})
        request = asyncio.create_task(sent)
        await asyncio.wait_for(half_sent.wait(), 30)
        assert (await full_deployment.admin("DELETE", "/v1/admin/tenants/acme")).status_code == 204
        deleted.set()
        r = await request
        assert r.status_code == 401 and error_of(r)["field"] == "Authorization", (path, r.text)
        assert "deleted" in error_of(r)["message"]
        assert store.count("acme") == (0, 0) and store.list("acme") == []
    key = await full_deployment.tenant("acme")
    assert (await api.get("/v1/adapters", headers=bearer(key))).json()["data"] == []
    assert (await api.get("/v1/fine_tuning/jobs", headers=bearer(key))).json()["data"] == []
    assert (await api.get("/v1/files", headers=bearer(key))).json()["data"] == []


async def test_deleting_a_tenant_stops_its_jobs_and_a_new_tenant_of_the_name_sees_nothing(full_deployment) -> None:
    api, store = full_deployment.client, full_deployment.store
    key = await full_deployment.tenant("acme")
    blob = encode_adapter(random_adapter(full_deployment.model, seed=1))
    assert (await api.put("/v1/adapters/kept", content=blob, headers=bearer(key))).status_code == 201
    r = await api.post(
        "/v1/files", data={"purpose": "fine-tune"}, files={"file": files()["training_file"]}, headers=bearer(key)
    )
    uploaded = r.json()
    r = await api.post("/v1/fine_tuning/jobs", data=LONG, files=files(), headers=bearer(key))
    running = r.json()
    r = await api.post("/v1/fine_tuning/jobs", data={**LONG, "adapter": "next"}, files=files(), headers=bearer(key))
    queued = r.json()
    job = await wait_for(api, running["id"], lambda j: j["progress"]["step"] >= 1, headers=bearer(key))
    assert job["status"] == "running"

    assert (await full_deployment.admin("DELETE", "/v1/admin/tenants/acme")).status_code == 204
    assert (await api.get("/v1/fine_tuning/jobs", headers=bearer(key))).status_code == 401

    key = await full_deployment.tenant("acme")  # the same name, a new tenant: it sees nothing of the old one
    assert (await api.get("/v1/adapters", headers=bearer(key))).json()["data"] == []
    assert (await api.get("/v1/fine_tuning/jobs", headers=bearer(key))).json()["data"] == []
    assert (await api.get("/v1/files", headers=bearer(key))).json()["data"] == []
    for path in (
        f"/v1/files/{uploaded['id']}",
        f"/v1/files/{uploaded['id']}/content",
        *(
            f"/v1/fine_tuning/jobs/{job_id}{part}"
            for job_id in (running["id"], queued["id"])
            for part in ("", "/events")
        ),
    ):
        assert (await api.get(path, headers=bearer(key))).status_code == 404, path
    assert len((await full_deployment.admin("GET", "/v1/admin/tenants/acme/keys")).json()["data"]) == 1
    # The worker let the old running job go (it had a million steps to run) and runs the
    # new tenant's job; neither old job ever published.
    fresh = await api.post(
        "/v1/fine_tuning/jobs",
        data={**TASK_FORM, "adapter": "fresh", "max_steps": "2"},
        files=files(),
        headers=bearer(key),
    )
    done = await wait_for(api, fresh.json()["id"], ended, headers=bearer(key))
    assert done["status"] == "succeeded", done
    assert [a["name"] for a in (await api.get("/v1/adapters", headers=bearer(key))).json()["data"]] == ["fresh"]
    assert store.get_version("acme", "lookup") is None and store.get_version("acme", "next") is None
