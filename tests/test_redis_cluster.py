"""The Redis store on a real local Redis Cluster (tests/redis_cluster.py), and the parts
of its two-phase design that the contract suite cannot see: unreferenced banks expire
after their grace period, references left by a put that died between its steps are
collected, a put stalled between its steps is refused. The contract suite itself runs on
the cluster from tests/test_store_contract.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster

from tests.conftest import tiny_llama
from tests.redis_cluster import LocalCluster, redis_under_test
from tests.test_api import api_settings, chat_tokenizer
from tests.test_store_contract import assert_same_adapter, make_adapter, make_bank, stored_size
from vbserve.app import create_app
from vbserve_store import RedisAdapterStore, StoreUnavailableError, open_store

pytestmark = pytest.mark.redis
pytest_plugins = ["tests.redis_cluster"]  # the session fixture redis_cluster

GRACE_S = 0.3
REF_TIMEOUT_S = 0.2


@pytest.fixture(params=["redis", "redis-cluster"])
def short_timers(request: pytest.FixtureRequest) -> Iterator[tuple[RedisAdapterStore, redis.Redis | RedisCluster]]:
    """A store with a short bank grace period and reference timeout, and a raw client to
    look inside it."""
    url, context = redis_under_test(request, request.param)
    with context as (client, prefix):
        store = RedisAdapterStore.from_url(url, prefix=prefix, bank_grace_s=GRACE_S, ref_timeout_s=REF_TIMEOUT_S)
        yield store, client
        store.close()


def test_store_spreads_over_the_cluster_nodes(redis_cluster: LocalCluster) -> None:
    """Tenants and banks land on every node, so the contract run on the cluster really
    crosses slots and nodes in one put."""
    with redis_cluster.test_prefix() as (client, prefix):
        store = open_store(redis_cluster.url, redis_prefix=prefix)
        assert isinstance(store, RedisAdapterStore)
        for i in range(12):
            store.put(f"tenant-{i}", "bot", make_adapter(i))
        nodes = {client.get_node_from_key(key).name for key in client.scan_iter(match=f"{prefix}:*")}
        assert len(nodes) == len(redis_cluster.ports)
        store.close()


def test_unreachable_cluster_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailableError):
        RedisAdapterStore.from_url("redis+cluster://127.0.0.1:1", timeout=0.5)


def test_unreferenced_bank_stays_readable_for_its_grace_period_then_expires(short_timers) -> None:
    store, client = short_timers
    first, second = make_adapter(1), make_adapter(2)
    store.put("acme", "bot", first)
    store.put("acme", "bot", second)
    # Replaced: absent to callers at once, but a reader that read the old record just
    # before the replacement can still fetch its bank.
    assert not store.has_bank(first.bank_id)
    old_bank_key = f"{store.prefix}:b:{first.bank_id}"
    assert client.hget(old_bank_key, "data") is not None
    time.sleep(GRACE_S + 0.2)
    assert not client.exists(old_bank_key)
    # A put of a bank waiting out its grace period revives it instead.
    store.delete("acme", "bot")
    store.put("acme", "again", second)
    time.sleep(GRACE_S + 0.2)
    assert store.has_bank(second.bank_id)
    assert store.get("acme", "again")[0].bank_id == second.bank_id


def test_collect_garbage_drops_references_that_no_adapter_names(short_timers, monkeypatch) -> None:
    store, _ = short_timers
    kept = make_adapter(1, shared_bank=make_bank(3))
    store.put("acme", "kept", kept)

    # The process loses Redis after taking a reference on the bank, before publishing.
    leaked = make_adapter(2, shared_bank=make_bank(4))
    with monkeypatch.context() as patch:
        patch.setattr(store, "_put_script", _lost_connection)
        with pytest.raises(StoreUnavailableError):
            store.put("acme", "leaky", leaked)
        with pytest.raises(StoreUnavailableError):
            store.put("acme", "kept", make_adapter(3, shared_bank=make_bank(3)))
    assert store.has_bank(leaked.bank_id)  # held by a reference nobody will drop
    assert store.collect_garbage() == 0  # too young: its put might still publish
    time.sleep(2 * REF_TIMEOUT_S + 0.1)
    assert store.collect_garbage() == 2
    assert not store.has_bank(leaked.bank_id)
    assert store.has_bank(kept.bank_id)  # the published adapter's reference stays
    assert store.get("acme", "kept")[0].version == 1
    assert store.collect_garbage() == 0


def test_put_stalled_between_its_steps_is_refused(short_timers, monkeypatch) -> None:
    """Past the reference timeout garbage collection may drop the reference, so a put
    that stalled that long must not publish an adapter naming it."""
    store, _ = short_timers
    publish = store._put_script

    def stall(*args, **kwargs):
        time.sleep(REF_TIMEOUT_S + 0.1)
        return publish(*args, **kwargs)

    adapter = make_adapter(1)
    monkeypatch.setattr(store, "_put_script", stall)
    with pytest.raises(StoreUnavailableError):
        store.put("acme", "slow", adapter)
    assert store.get_version("acme", "slow") is None
    assert store.count("acme") == (0, 0)
    assert not store.has_bank(adapter.bank_id)


def test_put_many_publishes_each_adapter_as_put_does(short_timers) -> None:
    store, _ = short_timers
    shared = make_bank(9)
    replaced = make_adapter(1)
    store.put("acme", "old", replaced)
    batch = {
        "old": make_adapter(2),
        "a": make_adapter(3, shared_bank=shared),
        "b": make_adapter(4, shared_bank=shared),
        "c": make_adapter(5),
    }
    records = store.put_many("acme", batch)
    assert [(r.name, r.version) for r in records] == [("old", 2), ("a", 1), ("b", 1), ("c", 1)]
    for record in records:
        got_record, got = store.get("acme", record.name)
        assert got_record == record
        assert_same_adapter(got, batch[record.name])
    assert store.count("acme") == (4, sum(stored_size(a) for a in batch.values()))
    assert not store.has_bank(replaced.bank_id)
    store.delete("acme", "a")
    assert store.has_bank(batch["b"].bank_id)  # still held by b
    store.delete("acme", "b")
    assert not store.has_bank(batch["b"].bank_id)


async def test_the_app_collects_leaked_references_periodically(short_timers, monkeypatch) -> None:
    store, _ = short_timers
    leaked = make_adapter(2, shared_bank=make_bank(4))
    with monkeypatch.context() as patch:
        patch.setattr(store, "_put_script", _lost_connection)
        with pytest.raises(StoreUnavailableError):
            store.put("acme", "leaky", leaked)
    assert store.has_bank(leaked.bank_id)
    settings = api_settings(store_gc_interval_s=0.1)
    app = create_app(settings, model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store)
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + 10
        while store.has_bank(leaked.bank_id):
            assert time.monotonic() < deadline, "the leaked reference was never collected"
            await asyncio.sleep(0.1)


def _lost_connection(*args: object, **kwargs: object) -> None:
    raise redis.ConnectionError("connection lost between step 1 and step 2")
