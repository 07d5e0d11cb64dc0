"""Per-tenant request rates shared across API replicas: the Redis token bucket
(`RedisRateLimiter`) on one Redis server and on a Redis Cluster, its fallback to the
in-process bucket while Redis is unreachable, and two apps (two replicas) over one Redis
that together grant a tenant its rate once, not once each."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

import vbserve.tenancy.limits as limits_module
from tests.conftest import tiny_llama
from tests.redis_cluster import redis_under_test
from tests.test_api import api_settings, chat_tokenizer, error_of
from vbserve.app import create_app
from vbserve.settings import Settings
from vbserve.tenancy import RateLimiter, RedisRateLimiter, RedisTenantRegistry, TenantLimits, open_rate_limiter
from vbserve_store.store import SQLiteAdapterStore

pytest_plugins = ["tests.redis_cluster"]  # the session fixture redis_cluster

ADMIN_KEY = "admin-secret-for-tests-0123456789"
LOGGER = "vbserve.backends.breaker"  # the limiter falls back through the store's circuit breaker


@pytest.fixture(
    params=[pytest.param("redis", marks=pytest.mark.redis), pytest.param("redis-cluster", marks=pytest.mark.redis)]
)
def backend(request) -> Iterator[tuple[str, object, str]]:
    """(URL, a client of that Redis, a fresh key prefix deleted afterwards)."""
    url, context = redis_under_test(request, request.param)
    with context as (client, prefix):
        yield url, client, prefix


@pytest.fixture
def replicas(backend) -> Iterator[tuple[RedisRateLimiter, RedisRateLimiter]]:
    """Two limiters on the same Redis and prefix, as two API replicas have."""
    url, _, prefix = backend
    a, b = RedisRateLimiter.from_url(url, prefix=prefix), RedisRateLimiter.from_url(url, prefix=prefix)
    yield a, b
    a.close()
    b.close()


def grants(limiters: list[RateLimiter], tenant: str, rate: float, n: int) -> tuple[list[float | None], float]:
    """n acquisitions, spread round-robin over `limiters`; their answers and the seconds
    they took (tokens refill meanwhile)."""
    start = time.monotonic()
    answers = [limiters[i % len(limiters)].acquire(tenant, rate) for i in range(n)]
    return answers, time.monotonic() - start


def test_two_replicas_share_one_bucket(backend, replicas) -> None:
    _, client, prefix = backend
    a, b = replicas
    rate = 5.0  # capacity 10
    answers, took = grants([a, b], "acme", rate, 20)
    granted = sum(answer is None for answer in answers)
    # Together exactly the capacity (plus what refilled while asking; nothing in practice),
    # not the capacity on each replica (20).
    assert answers[:10] == [None] * 10, answers
    assert 10 <= granted <= 10 + int(took * rate), (answers, took)
    refusals = [answer for answer in answers if answer is not None]
    assert refusals and all(0 < wait <= 1 / rate for wait in refusals), refusals
    assert a.acquire("acme", rate) is not None and b.acquire("acme", rate) is not None
    # Retry-after means what it says: after it, either replica grants again.
    wait = b.acquire("acme", rate)
    assert wait is not None and wait > 0
    time.sleep(wait)
    assert a.acquire("acme", rate) is None
    # One hash per tenant, hash-tagged by tenant, under the deployment's prefix, expiring
    # once it would be full again (at most capacity / rate = 2 s from now).
    key = f"{prefix}:rl:{{acme}}"
    assert a.key("acme") == key and client.type(key) in (b"hash", "hash")
    assert set(client.hkeys(key)) in ({b"tokens", b"ts"}, {"tokens", "ts"})
    assert 1000 < client.pttl(key) <= 2000


def test_tenants_and_deployments_are_independent(backend, replicas) -> None:
    url, client, prefix = backend
    a, b = replicas
    assert grants([a, b], "acme", 1.0, 2)[0] == [None, None]  # capacity 2: drained
    assert a.acquire("acme", 1.0) is not None and b.acquire("acme", 1.0) is not None
    assert grants([b, a], "globex", 1.0, 2)[0] == [None, None]  # another tenant: its own bucket
    assert b.acquire("globex", 1.0) is not None
    # Another prefix (another deployment on the same Redis) has buckets of its own.
    other = RedisRateLimiter.from_url(url, prefix=f"{prefix}-other")
    try:
        assert other.acquire("acme", 1.0) is None
    finally:
        client.delete(other.key("acme"))
        other.close()


def test_an_idle_bucket_expires(backend, replicas) -> None:
    _, client, _ = backend
    a, _ = replicas
    assert a.acquire("acme", 4.0) is None  # one token short of full: full again in 250 ms
    assert 0 < client.pttl(a.key("acme")) <= 250
    time.sleep(0.5)
    assert client.exists(a.key("acme")) == 0  # idle tenants take no memory
    answers = grants([a], "acme", 4.0, 9)[0]  # and a missing bucket is a full one (capacity 8)
    assert answers[:8] == [None] * 8 and answers[8] is not None, answers


def test_rates_lowered_take_effect_at_once(replicas) -> None:
    a, b = replicas
    assert grants([a, b], "acme", 100.0, 3)[0] == [None] * 3  # capacity 200, 197 left
    # Now limited to 1/s (capacity 2): the bucket is capped at the new capacity.
    assert grants([a, b], "acme", 1.0, 2)[0] == [None, None]
    assert a.acquire("acme", 1.0) is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_redis_falls_back_to_local_limits(monkeypatch, caplog) -> None:
    monkeypatch.setattr(limits_module, "REDIS_RETRY_INTERVAL_S", 0.05)  # probe Redis often
    limiter = RedisRateLimiter.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="vbstest-down")
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        answers, _ = grants([limiter], "acme", 2.0, 8)  # local capacity 4
        assert answers[:4] == [None] * 4, answers
        assert all(wait is not None and 0 < wait <= 0.5 for wait in answers[4:]), answers
        assert grants([limiter], "globex", 2.0, 4)[0] == [None] * 4  # still per tenant
    finally:
        limiter.close()
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "rate-limit Redis failed" in warnings[0].getMessage(), (
        warnings
    )  # once, not per request


def test_redis_back_after_an_outage_shares_the_bucket_again(monkeypatch, caplog, tmp_path) -> None:
    """Redis down when the replicas start, then up: limiting moves from each replica's own
    bucket to the shared one, with one warning and one recovery message."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    monkeypatch.setattr(limits_module, "REDIS_RETRY_INTERVAL_S", 0.05)
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = free_port()
    a = RedisRateLimiter.from_url(f"redis://127.0.0.1:{port}/0", prefix="vbstest-back")
    b = RedisRateLimiter.from_url(f"redis://127.0.0.1:{port}/0", prefix="vbstest-back")
    assert grants([a, b], "acme", 1.0, 4)[0] == [None] * 4  # down: 2 on each replica's own bucket
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while a._breaker.is_open or b._breaker.is_open:  # until their probes reach Redis
            assert time.monotonic() < deadline, "the limiters never used Redis again"
            time.sleep(0.05)
        since = time.monotonic()
        assert a.acquire("acme", 1.0) is None  # a fresh bucket in Redis (capacity 2, 1 left)
        # The one token left, shared: b takes it, then neither replica grants (its own
        # bucket would have).
        answers = grants([b, a], "acme", 1.0, 4)[0]
        assert answers[0] is None and sum(x is None for x in answers) <= 1 + int(time.monotonic() - since), answers
        messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
        assert len(messages) == 4 and all(level == logging.WARNING for level, _ in messages), messages
        assert all("rate-limit Redis failed" in text for _, text in messages[:2]), messages
        assert all("rate-limit Redis answers again" in text for _, text in messages[2:]), messages
    finally:
        a.close()
        b.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_the_limiter_lives_beside_the_registry() -> None:
    assert type(open_rate_limiter(Settings(store_url="sqlite:///data/adapters.db"))) is RateLimiter
    for url in ("redis://10.0.0.1:6379/0", "rediss://cache:6380"):  # connects lazily: no I/O here
        limiter = open_rate_limiter(Settings(store_url=url, redis_prefix="acme-prod"))
        assert isinstance(limiter, RedisRateLimiter) and limiter.key("t") == "acme-prod:rl:{t}"
        limiter.close()


# -- through the API: two replicas over one Redis ----------------------------------------------


async def test_two_apps_on_one_redis_share_a_tenants_rate(backend, tmp_path) -> None:
    url, _, prefix = backend
    registry = RedisTenantRegistry.from_url(url, prefix=prefix)
    registry.create_tenant("acme", TenantLimits(requests_per_s=1.0))  # bursts of 2
    registry.create_tenant("globex", TenantLimits(requests_per_s=1.0))
    acme = {"Authorization": f"Bearer {registry.create_key('acme')[1]}"}
    globex = {"Authorization": f"Bearer {registry.create_key('globex')[1]}"}
    stores = [SQLiteAdapterStore(tmp_path / "adapters.db") for _ in range(2)]
    # The tenant registry and the rate limits are on Redis (store_url, redis_prefix); the
    # store is injected, so the apps open no job queue.
    settings = api_settings(admin_key=ADMIN_KEY, store_url=url, redis_prefix=prefix)
    apps = [
        create_app(settings, model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store, tenants=registry)
        for store in stores
    ]
    try:
        async with apps[0].router.lifespan_context(apps[0]), apps[1].router.lifespan_context(apps[1]):
            assert all(isinstance(app.state.services.rates, RedisRateLimiter) for app in apps)
            clients = [
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") for app in apps
            ]
            try:
                start = time.monotonic()
                responses = [await clients[i % 2].get("/v1/adapters", headers=acme) for i in range(6)]
                took = time.monotonic() - start
                statuses = [r.status_code for r in responses]
                # 2 in all, not 2 on each app (refills 1 per second while asking).
                assert statuses[:2] == [200, 200] and statuses.count(200) <= 2 + int(took), (statuses, took)
                assert statuses[2:4] == [429, 429], statuses  # refused by both apps
                for r in responses[2:4]:
                    assert error_of(r)["type"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
                # Another tenant has its own budget.
                assert [(await c.get("/v1/adapters", headers=globex)).status_code for c in clients] == [200, 200]
            finally:
                for client in clients:
                    await client.aclose()
    finally:
        for store in stores:
            store.close()
        registry.close()
