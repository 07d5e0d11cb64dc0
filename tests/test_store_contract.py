"""One contract for every adapter store backend: each test runs against SQLite (in a tmp
folder), against a real Redis server (`VBSERVE_TEST_REDIS_URL`, default
redis://127.0.0.1:6379/15) and against a real local Redis Cluster of three nodes
(tests/redis_cluster.py), each under a random key prefix that is deleted afterwards.
Redis is never mocked; when no server answers (or redis-server is not installed for the
cluster), those cases are skipped, saying why."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.redis_cluster import redis_under_test
from vbserve.backends import BackendInputError
from vbserve.tenancy import SQLiteTenantRegistry, delete_tenant
from vbserve_store import (
    AdapterConfig,
    AdapterNotFoundError,
    AdapterStore,
    AdapterValidationError,
    BankNotFoundError,
    ModuleSpec,
    QuotaExceededError,
    RedisAdapterStore,
    SQLiteAdapterStore,
    StoreQuota,
    StoreUnavailableError,
    VBLoRAAdapter,
    VersionConflictError,
    decode_adapter,
    decode_bank,
    encode_adapter,
    encode_bank,
    open_store,
)
from vbserve_store.lora import LoRAAdapter, LoRAConfig, encode_lora

pytest_plugins = ["tests.redis_cluster"]  # the session fixture redis_cluster

CONFIG = AdapterConfig(
    modules=(ModuleSpec("layers.0.q_proj", 16, 16), ModuleSpec("layers.0.v_proj", 16, 32)),
    r=2,
    vector_length=8,
    num_vectors=16,
    topk=2,
    base_model="tiny-test",
)


def make_bank(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 + seed)
    return torch.empty(CONFIG.num_vectors, CONFIG.vector_length).uniform_(-0.02, 0.02, generator=gen)


def make_adapter(seed: int, shared_bank: torch.Tensor | None = None) -> VBLoRAAdapter:
    """A small valid adapter; distinct seeds give distinct logits and (unless shared) banks.

    Returned in the codec's canonical form: the format keeps k-1 weights and re-derives the
    last as 1 minus the others, which can differ from the softmax in the last bit. A stored
    adapter must then come back bit-equal."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(CONFIG.num_subvectors, CONFIG.num_vectors, generator=gen)
    bank = make_bank(seed) if shared_bank is None else shared_bank
    return decode_adapter(encode_adapter(VBLoRAAdapter.from_logits(CONFIG, bank, logits)))


def assert_same_adapter(got: VBLoRAAdapter, want: VBLoRAAdapter) -> None:
    assert got.bank_id == want.bank_id
    assert got.config == want.config
    for field in ("bank", "indices", "weights"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field


def stored_size(adapter: VBLoRAAdapter) -> int:
    return len(encode_adapter(adapter, include_bank=False)) + len(encode_bank(adapter.bank))


# -- backends ----------------------------------------------------------------------------


@dataclass
class Backend:
    """Opens stores on one storage location and looks inside it where the contract needs to."""

    kind: str
    open: Callable[[], AdapterStore]
    # How many banks are stored. On Redis: with a reference; one whose last reference is
    # dropped lingers for a grace period (for readers in flight), then expires.
    bank_count: Callable[[], int]


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "store" / "adapters.db"

        def sqlite_bank_count() -> int:
            with sqlite3.connect(path) as conn:
                return conn.execute("SELECT count(*) FROM banks").fetchone()[0]

        yield Backend("sqlite", lambda: SQLiteAdapterStore(path), sqlite_bank_count)
        return
    url, context = redis_under_test(request, request.param)
    with context as (client, prefix):
        yield Backend(
            request.param,
            lambda: RedisAdapterStore.from_url(url, prefix=prefix),
            lambda: sum(1 for key in client.scan_iter(match=f"{prefix}:b:*") if client.hlen(key) > 1),
        )


@pytest.fixture
def store(backend: Backend) -> Iterator[AdapterStore]:
    opened = backend.open()
    yield opened
    opened.close()


def snapshot(store: AdapterStore, tenant: str) -> tuple:
    """Everything a tenant can observe, to show that a rejected call changed nothing."""
    records = store.list(tenant, limit=1000)
    return records, store.count(tenant), [store.get_version(tenant, r.name) for r in records]


# -- round trip, versions, conditional writes ---------------------------------------------


def test_put_get_round_trip(store: AdapterStore) -> None:
    adapter = make_adapter(1)
    record = store.put("acme", "support-bot", adapter)
    assert (record.tenant, record.name, record.version, record.bank_id) == ("acme", "support-bot", 1, adapter.bank_id)
    assert record.config == CONFIG.to_json()
    assert record.body_bytes == len(encode_adapter(adapter, include_bank=False))
    assert record.bank_bytes == len(encode_bank(adapter.bank))
    assert record.created == record.updated > 0

    got_record, got = store.get("acme", "support-bot")
    assert got_record == record
    assert_same_adapter(got, adapter)
    assert store.get_record("acme", "support-bot") == record
    assert store.get_version("acme", "support-bot") == 1
    assert store.get_version("acme", "other") is None
    assert torch.equal(decode_bank(store.get_bank(adapter.bank_id)), adapter.bank)
    assert store.has_bank(adapter.bank_id)


def test_compact_dtypes_round_trip(store: AdapterStore) -> None:
    adapter = make_adapter(2).to(torch.float16)
    store.put("acme", "half", adapter)
    assert_same_adapter(store.get("acme", "half")[1], adapter)


def test_versions_increase_and_latest_wins(store: AdapterStore) -> None:
    adapters = [make_adapter(seed) for seed in range(3)]
    records = [store.put("acme", "bot", a) for a in adapters]
    assert [r.version for r in records] == [1, 2, 3]
    assert len({r.created for r in records}) == 1
    assert records[0].updated <= records[1].updated <= records[2].updated
    record, got = store.get("acme", "bot")
    assert record.version == 3
    assert_same_adapter(got, adapters[2])
    assert store.count("acme") == (1, stored_size(adapters[2]))
    # Only the latest version's bytes are kept: the replaced versions' banks are gone.
    assert not store.has_bank(adapters[0].bank_id) and not store.has_bank(adapters[1].bank_id)


def test_expected_version_conflict_leaves_adapter_unchanged(store: AdapterStore) -> None:
    first, intruder = make_adapter(1), make_adapter(2)
    store.put("acme", "bot", first, expected_version=0)
    before = snapshot(store, "acme")
    for expected in (0, 2, 7):
        with pytest.raises(VersionConflictError):
            store.put("acme", "bot", intruder, expected_version=expected)
    assert snapshot(store, "acme") == before
    assert_same_adapter(store.get("acme", "bot")[1], first)
    assert not store.has_bank(intruder.bank_id)

    assert store.put("acme", "bot", intruder, expected_version=1).version == 2
    assert_same_adapter(store.get("acme", "bot")[1], intruder)


def test_expected_version_on_absent_name(store: AdapterStore) -> None:
    with pytest.raises(VersionConflictError):
        store.put("acme", "new", make_adapter(1), expected_version=1)
    assert store.get_version("acme", "new") is None
    assert store.count("acme") == (0, 0)
    assert store.put("acme", "new", make_adapter(1), expected_version=0).version == 1


def test_delete_then_put_continues_with_a_higher_version(store: AdapterStore) -> None:
    store.put("acme", "bot", make_adapter(1))
    store.put("acme", "bot", make_adapter(2))
    store.delete("acme", "bot")
    with pytest.raises(AdapterNotFoundError):
        store.get("acme", "bot")
    with pytest.raises(AdapterNotFoundError):
        store.get_record("acme", "bot")
    with pytest.raises(AdapterNotFoundError):
        store.delete("acme", "bot")
    assert store.get_version("acme", "bot") is None
    assert store.count("acme") == (0, 0)
    assert store.list("acme") == []

    assert store.put("acme", "bot", make_adapter(3), expected_version=0).version == 3


# -- listing, counting, tenants --------------------------------------------------------------


def test_list_pages_in_name_order(store: AdapterStore) -> None:
    names = ["m-7", "a.1", "Zeta", "b_2", "a-0", "c", "a"]
    for seed, name in enumerate(names):
        store.put("acme", name, make_adapter(seed))
    pages, after = [], None
    while page := store.list("acme", after=after, limit=3):
        pages.append([r.name for r in page])
        assert page == [store.get_record("acme", r.name) for r in page]
        after = page[-1].name
    assert pages == [["Zeta", "a", "a-0"], ["a.1", "b_2", "c"], ["m-7"]]  # byte order
    assert store.list("acme", after="a-0", limit=2)[0].name == "a.1"
    assert store.list("acme", after="zzz") == []


def test_count_tracks_numbers_and_bytes(store: AdapterStore) -> None:
    assert store.count("acme") == (0, 0)
    a, b, c = make_adapter(1), make_adapter(2), make_adapter(3, shared_bank=make_bank(1))
    store.put("acme", "a", a)
    store.put("acme", "b", b)
    assert store.count("acme") == (2, stored_size(a) + stored_size(b))
    store.put("acme", "b", c)  # replaced by an adapter that shares a's bank: still charged in full
    assert store.count("acme") == (2, stored_size(a) + stored_size(c))
    assert store.count("acme")[1] == sum(r.stored_bytes for r in store.list("acme"))
    store.delete("acme", "a")
    assert store.count("acme") == (1, stored_size(c))
    store.delete("acme", "b")
    assert store.count("acme") == (0, 0)


def test_tenants_are_isolated(store: AdapterStore) -> None:
    mine = make_adapter(1)
    store.put("tenant-a", "bot", mine)
    with pytest.raises(AdapterNotFoundError):
        store.get("tenant-b", "bot")
    with pytest.raises(AdapterNotFoundError):
        store.get_record("tenant-b", "bot")
    with pytest.raises(AdapterNotFoundError):
        store.delete("tenant-b", "bot")
    assert store.get_version("tenant-b", "bot") is None
    assert store.list("tenant-b") == []
    assert store.count("tenant-b") == (0, 0)
    # A name of B's own is independent of A's: own versions, own content.
    theirs = make_adapter(2)
    assert store.put("tenant-b", "bot", theirs, expected_version=0).version == 1
    store.put("tenant-b", "bot", theirs)
    assert store.get_version("tenant-a", "bot") == 1
    assert_same_adapter(store.get("tenant-a", "bot")[1], mine)
    assert_same_adapter(store.get("tenant-b", "bot")[1], theirs)


# -- banks -------------------------------------------------------------------------------


def test_shared_bank_is_stored_once_and_refcounted(store: AdapterStore, backend: Backend) -> None:
    bank = make_bank(42)
    first, second = make_adapter(1, shared_bank=bank), make_adapter(2, shared_bank=bank)
    other_tenant = make_adapter(3, shared_bank=bank)
    assert first.bank_id == second.bank_id == other_tenant.bank_id
    assert not torch.equal(first.indices, second.indices)
    store.put("acme", "first", first)
    store.put("acme", "second", second)
    store.put("globex", "third", other_tenant)
    assert backend.bank_count() == 1

    store.delete("acme", "first")
    assert_same_adapter(store.get("acme", "second")[1], second)
    store.delete("acme", "second")
    assert_same_adapter(store.get("globex", "third")[1], other_tenant)  # banks are global
    bank_id = first.bank_id
    assert store.has_bank(bank_id)
    store.delete("globex", "third")
    assert not store.has_bank(bank_id)
    assert backend.bank_count() == 0
    with pytest.raises(BankNotFoundError):
        store.get_bank(bank_id)


def test_replacing_with_the_same_bank_keeps_it(store: AdapterStore, backend: Backend) -> None:
    bank = make_bank(5)
    store.put("acme", "bot", make_adapter(1, shared_bank=bank))
    latest = make_adapter(2, shared_bank=bank)
    store.put("acme", "bot", latest)
    assert backend.bank_count() == 1
    assert_same_adapter(store.get("acme", "bot")[1], latest)
    store.delete("acme", "bot")
    assert backend.bank_count() == 0


def test_the_bank_index_follows_put_overwrite_and_delete(store: AdapterStore) -> None:
    shared = make_bank(7)
    first, second = make_adapter(1, shared_bank=shared), make_adapter(2, shared_bank=shared)
    replacement = make_adapter(3)
    assert not store.tenant_uses_bank("acme", first.bank_id)
    store.put("acme", "first", first)
    store.put("acme", "second", second)
    store.put("globex", "own", replacement)
    assert store.tenant_uses_bank("acme", first.bank_id)
    assert not store.tenant_uses_bank("globex", first.bank_id)  # a bank another tenant uses
    assert not store.tenant_uses_bank("acme", replacement.bank_id)
    # Overwrite with another bank: the old one is still used by "second", the new one is in.
    store.put("acme", "first", replacement)
    assert store.tenant_uses_bank("acme", first.bank_id) and store.tenant_uses_bank("acme", replacement.bank_id)
    store.delete("acme", "second")
    assert not store.tenant_uses_bank("acme", first.bank_id)  # its last user is gone
    # Overwrite with the same bank keeps it; a LoRA adapter (no bank) drops it.
    store.put("acme", "first", make_adapter(4, shared_bank=replacement.bank))
    assert store.tenant_uses_bank("acme", replacement.bank_id)
    store.put("acme", "first", make_lora(1))
    assert not store.tenant_uses_bank("acme", replacement.bank_id)
    assert store.tenant_uses_bank("globex", replacement.bank_id)  # another tenant's use is its own
    for not_a_bank_id in ("", "sha256-*", "../x", None):
        assert not store.tenant_uses_bank("acme", not_a_bank_id)


def test_deleting_a_tenant_empties_its_bank_index(store: AdapterStore, tmp_path: Path) -> None:
    registry = SQLiteTenantRegistry(tmp_path / "tenants.db")
    registry.create_tenant("acme")
    adapters = {f"a{i}": make_adapter(i, shared_bank=make_bank(i % 2)) for i in range(4)}
    for name, adapter in adapters.items():
        store.put("acme", name, adapter)
    store.put("globex", "kept", adapters["a0"])
    delete_tenant(registry, store, None, None, "acme")
    registry.close()
    assert not any(store.tenant_uses_bank("acme", a.bank_id) for a in adapters.values())
    assert store.tenant_uses_bank("globex", adapters["a0"].bank_id)
    # A new tenant of the same name starts with no banks: it cannot read the old ones.
    store.put("acme", "fresh", make_adapter(9))
    assert not store.tenant_uses_bank("acme", adapters["a1"].bank_id)


def test_get_blob_is_the_encoded_adapter_byte_for_byte(store: AdapterStore) -> None:
    """A native download hands out the stored bytes (no decode and re-encode): they must
    be exactly what encoding the adapter gives, so `Repr-Digest` stays the same."""
    adapter, lora = make_adapter(1), make_lora(2)
    store.put("acme", "bot", adapter)
    store.put("acme", "plain", lora)
    for include_bank in (True, False):
        record, blob = store.get_blob("acme", "bot", include_bank=include_bank)
        assert record == store.get_record("acme", "bot")
        assert blob == encode_adapter(adapter, include_bank=include_bank)
        assert store.get_blob("acme", "plain", include_bank=include_bank)[1] == encode_lora(lora)
    assert_same_adapter(decode_adapter(store.get_blob("acme", "bot")[1]), adapter)
    with pytest.raises(AdapterNotFoundError):
        store.get_blob("globex", "bot")


def test_unknown_bank(store: AdapterStore) -> None:
    unknown = "sha256-" + "0" * 40
    assert not store.has_bank(unknown)
    with pytest.raises(BankNotFoundError):
        store.get_bank(unknown)


# -- plain LoRA adapters: no bank ------------------------------------------------------------


def make_lora(seed: int, r: int = 3) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(20_000 + seed)
    config = LoRAConfig(CONFIG.modules, r=r, lora_alpha=2.0 * r, use_rslora=seed % 2 == 1, base_model="tiny-test")
    a = {m.name: torch.randn(r, m.in_features, generator=gen) for m in config.modules}
    b = {m.name: torch.randn(m.out_features, r, generator=gen).to(torch.bfloat16) for m in config.modules}
    return LoRAAdapter(config, a, b)


def assert_same_lora(got: object, want: LoRAAdapter) -> None:
    assert isinstance(got, LoRAAdapter) and got.config == want.config
    for mats in ("a", "b"):
        for name, t in getattr(want, mats).items():
            stored = getattr(got, mats)[name]
            assert stored.dtype == t.dtype and torch.equal(stored, t), (mats, name)


def test_a_lora_adapter_round_trips_without_a_bank(store: AdapterStore, backend: Backend) -> None:
    lora = make_lora(1)
    record = store.put("acme", "plain", lora)
    assert (record.version, record.bank_id, record.bank_bytes) == (1, "", 0)
    assert record.config == lora.config.to_json() and record.config["kind"] == "lora"
    assert record.body_bytes == len(encode_lora(lora))
    got_record, got = store.get("acme", "plain")
    assert got_record == record == store.get_record("acme", "plain")
    assert_same_lora(got, lora)
    assert backend.bank_count() == 0
    assert store.count("acme") == (1, len(encode_lora(lora)))
    assert [r.name for r in store.list("acme")] == ["plain"]
    with pytest.raises(AdapterNotFoundError):
        store.get("globex", "plain")  # tenant-scoped like any adapter
    store.delete("acme", "plain")
    assert store.count("acme") == (0, 0) and store.get_version("acme", "plain") is None


def test_a_name_can_change_kind_and_banks_stay_counted(store: AdapterStore, backend: Backend) -> None:
    vblora, lora = make_adapter(1), make_lora(2)
    store.put("acme", "bot", vblora)
    assert store.put("acme", "bot", lora).version == 2
    assert backend.bank_count() == 0  # the replaced VB-LoRA version's bank is released
    assert_same_lora(store.get("acme", "bot")[1], lora)
    assert store.count("acme") == (1, len(encode_lora(lora)))
    assert store.put("acme", "bot", vblora, expected_version=2).version == 3
    assert backend.bank_count() == 1
    assert_same_adapter(store.get("acme", "bot")[1], vblora)
    assert store.count("acme") == (1, stored_size(vblora))
    store.put("acme", "bot", lora)
    store.delete("acme", "bot")
    assert backend.bank_count() == 0 and store.count("acme") == (0, 0)


def test_a_lora_adapter_counts_against_the_byte_quota(store: AdapterStore) -> None:
    lora = make_lora(3)
    size = len(encode_lora(lora))
    with pytest.raises(QuotaExceededError):
        store.put("acme", "plain", lora, quota=StoreQuota(max_bytes=size - 1))
    assert store.count("acme") == (0, 0)
    store.put("acme", "plain", lora, quota=StoreQuota(max_bytes=size))
    with pytest.raises(VersionConflictError):
        store.put("acme", "plain", make_lora(4), expected_version=0)
    assert_same_lora(store.get("acme", "plain")[1], lora)


# -- bad input ----------------------------------------------------------------------------

BAD_KEYS = [
    "",
    "a/b",
    "../etc",
    "a\\b",
    "a\nb",
    "a\x00b",
    "tab\t",
    ".hidden",
    "x" * 129,
    "a b",
    "caf\u00e9",
    "a:b",
    "{t}",
    "*",
    7,
    None,
]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
def test_invalid_tenant_or_name_is_rejected_and_stores_nothing(store: AdapterStore, bad: object) -> None:
    store.put("acme", "keep", make_adapter(1))
    before = snapshot(store, "acme")
    intruder = make_adapter(2)
    for field, call in (
        ("name", lambda: store.put("acme", bad, intruder)),
        ("tenant", lambda: store.put(bad, "bot", intruder)),
        ("name", lambda: store.get("acme", bad)),
        ("name", lambda: store.get_blob("acme", bad)),
        ("tenant", lambda: store.tenant_uses_bank(bad, intruder.bank_id)),
        ("name", lambda: store.get_version("acme", bad)),
        ("name", lambda: store.delete("acme", bad)),
        ("tenant", lambda: store.list(bad)),
        ("tenant", lambda: store.count(bad)),
        ("after", lambda: store.list("acme", after=bad)),
    ):
        if field == "after" and bad is None:
            continue  # after=None means "from the start"
        with pytest.raises(AdapterValidationError) as info:
            call()
        assert info.value.field == field
    assert snapshot(store, "acme") == before
    assert not store.has_bank(intruder.bank_id)


def test_longest_and_odd_but_valid_names_are_accepted(store: AdapterStore) -> None:
    for name in ("x" * 128, "a.b-c_D9", "-", "_", "v1.0"):
        store.put("t" * 128, name, make_adapter(1))
    assert store.count("t" * 128)[0] == 5


@pytest.mark.parametrize(
    ("field", "call"),
    [
        ("adapter", lambda s: s.put("acme", "bot", b"not an adapter")),
        ("adapter", lambda s: s.put("acme", "bot", None)),
        ("expected_version", lambda s: s.put("acme", "bot", make_adapter(9), expected_version=-1)),
        ("expected_version", lambda s: s.put("acme", "bot", make_adapter(9), expected_version="1")),
        ("expected_version", lambda s: s.put("acme", "bot", make_adapter(9), expected_version=True)),
        ("limit", lambda s: s.list("acme", limit=0)),
        ("limit", lambda s: s.list("acme", limit=10_001)),
        ("bank_id", lambda s: s.get_bank("../../etc/passwd")),
        ("bank_id", lambda s: s.has_bank("sha256-*")),
    ],
)
def test_bad_input_leaves_the_store_unchanged(
    store: AdapterStore, field: str, call: Callable[[AdapterStore], object]
) -> None:
    store.put("acme", "bot", make_adapter(1))
    before = snapshot(store, "acme")
    with pytest.raises(AdapterValidationError) as info:
        call(store)
    assert info.value.field == field
    assert snapshot(store, "acme") == before
    assert not store.has_bank(make_adapter(9).bank_id)


# -- concurrency --------------------------------------------------------------------------


def test_concurrent_writers_and_a_reader_never_see_a_torn_adapter(store: AdapterStore) -> None:
    writers, puts_each = 8, 12
    # Every adapter has its own bank, so each put releases the previous bank to refcount 0:
    # the race "reader got the record, writer dropped its bank" happens as often as it can.
    adapters = {w: [make_adapter(1000 * w + i) for i in range(puts_each)] for w in range(writers)}
    by_bank = {a.bank_id: a for batch in adapters.values() for a in batch}
    assert len(by_bank) == writers * puts_each
    store.put("acme", "hot", adapters[0][0])
    done = threading.Event()
    errors: list[BaseException] = []
    reads = 0

    def write(w: int) -> None:
        try:
            for adapter in adapters[w]:
                store.put("acme", "hot", adapter)
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        nonlocal reads
        try:
            last_version = 0
            while not done.is_set() or reads == 0:
                record, got = store.get("acme", "hot")
                assert record.bank_id == got.bank_id
                assert_same_adapter(got, by_bank[got.bank_id])
                assert record.version >= last_version  # never goes back in time
                last_version = record.version
                reads += 1
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert not errors, errors[0]
    assert reads > 0
    record, got = store.get("acme", "hot")
    assert record.version == 1 + writers * puts_each
    assert_same_adapter(got, by_bank[record.bank_id])
    assert store.count("acme") == (1, stored_size(got))
    # Every replaced version released its bank; only the current one is left.
    assert [store.has_bank(b) for b in by_bank].count(True) == 1


# -- quotas ----------------------------------------------------------------------------------


def test_quota_on_adapter_count_refuses_new_names_only(store: AdapterStore) -> None:
    quota = StoreQuota(max_adapters=2)
    store.put("acme", "a", make_adapter(1), quota=quota)
    store.put("acme", "b", make_adapter(2), quota=quota)
    before = snapshot(store, "acme")
    with pytest.raises(QuotaExceededError) as caught:
        store.put("acme", "c", make_adapter(3), quota=quota)
    assert caught.value.kind == "quota_exceeded" and "2 adapters" in caught.value.reason
    assert snapshot(store, "acme") == before
    assert store.put("acme", "b", make_adapter(4), quota=quota).version == 2  # replacing is not a new adapter
    store.put("other", "c", make_adapter(3), quota=quota)  # quotas are per tenant


def test_quota_on_bytes_counts_the_size_difference_of_a_replacement(store: AdapterStore) -> None:
    a, b = make_adapter(1), make_adapter(2)
    quota = StoreQuota(max_bytes=stored_size(a) + stored_size(b) - 1)
    store.put("acme", "a", a, quota=quota)
    before = snapshot(store, "acme")
    with pytest.raises(QuotaExceededError):
        store.put("acme", "b", b, quota=quota)
    assert snapshot(store, "acme") == before
    assert store.put("acme", "a", b, quota=quota).version == 2  # same size, in place
    exact = StoreQuota(max_bytes=stored_size(a) + stored_size(b))
    store.put("acme", "b", a, quota=exact)
    assert store.count("acme") == (2, stored_size(a) + stored_size(b))


def test_concurrent_puts_cannot_overshoot_a_quota(store: AdapterStore) -> None:
    quota = StoreQuota(max_adapters=5)
    outcomes: list[str] = []
    lock = threading.Lock()

    def push(i: int) -> None:
        try:
            store.put("acme", f"n{i}", make_adapter(i), quota=quota)
            result = "ok"
        except QuotaExceededError:
            result = "quota"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] * 5 + ["quota"] * 11
    assert store.count("acme")[0] == 5


def test_concurrent_conditional_writers_each_version_is_won_once(store: AdapterStore) -> None:
    writers, wins_each = 6, 8
    won: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def write(w: int) -> None:
        try:
            wins = 0
            while wins < wins_each:
                version = store.get_version("acme", "cas") or 0
                try:
                    record = store.put("acme", "cas", make_adapter(100 * w + wins), expected_version=version)
                except VersionConflictError:
                    continue
                assert record.version == version + 1
                with lock:
                    won.append(record.version)
                wins += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert sorted(won) == list(range(1, writers * wins_each + 1))
    assert store.get_version("acme", "cas") == writers * wins_each


def test_reader_during_put_and_delete_churn(store: AdapterStore) -> None:
    adapters = [make_adapter(seed) for seed in range(20)]
    by_bank = {a.bank_id: a for a in adapters}
    done = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for adapter in adapters:
                store.put("acme", "flaky", adapter)
                store.delete("acme", "flaky")
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def read() -> None:
        try:
            while not done.is_set():
                try:
                    _, got = store.get("acme", "flaky")
                except AdapterNotFoundError:
                    continue
                assert_same_adapter(got, by_bank[got.bank_id])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn), *(threading.Thread(target=read) for _ in range(2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert store.count("acme") == (0, 0)
    assert not any(store.has_bank(b) for b in by_bank)


# -- persistence, availability, factory ------------------------------------------------------


def test_store_survives_reopen(backend: Backend) -> None:
    bank = make_bank(7)
    kept, dropped = make_adapter(1, shared_bank=bank), make_adapter(2, shared_bank=bank)
    with backend.open() as first:
        first.put("acme", "kept", kept)
        first.put("acme", "kept", kept)
        first.put("acme", "dropped", dropped)
        first.delete("acme", "dropped")
    with backend.open() as second:
        record, got = second.get("acme", "kept")
        assert record.version == 2
        assert_same_adapter(got, kept)
        assert second.count("acme") == (1, stored_size(kept))
        assert second.put("acme", "dropped", dropped).version == 2  # the version counter persisted too
        second.delete("acme", "kept")
        second.delete("acme", "dropped")
        assert not second.has_bank(kept.bank_id)
    assert backend.bank_count() == 0


def test_closed_store_is_unavailable(backend: Backend) -> None:
    store = backend.open()
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreUnavailableError):
        store.ping()
    with pytest.raises(StoreUnavailableError):
        store.get_version("acme", "bot")


def test_ping(store: AdapterStore) -> None:
    store.ping()


def test_unreachable_redis_is_store_unavailable() -> None:
    store = RedisAdapterStore.from_url("redis://127.0.0.1:1/0", timeout=1)
    for call in (store.ping, lambda: store.get("acme", "bot"), lambda: store.put("acme", "bot", make_adapter(1))):
        with pytest.raises(StoreUnavailableError):
            call()


def test_unwritable_sqlite_path_is_store_unavailable(tmp_path) -> None:
    (tmp_path / "a-folder.db").mkdir()
    with pytest.raises(StoreUnavailableError):
        SQLiteAdapterStore(tmp_path / "a-folder.db")


def test_open_store_picks_the_backend_from_the_url(tmp_path) -> None:
    assert isinstance(open_store(str(tmp_path / "plain.db")), SQLiteAdapterStore)
    by_url = open_store(f"sqlite:///{tmp_path}/by-url.db")
    assert isinstance(by_url, SQLiteAdapterStore)
    assert by_url.path == tmp_path / "by-url.db"
    for url in ("redis://127.0.0.1:6379/15", "rediss://cache.example:6380/0"):
        redis_store = open_store(url, redis_prefix="custom")
        assert isinstance(redis_store, RedisAdapterStore) and redis_store.prefix == "custom"
        redis_store.close()
    for url in ("http://example.com/store", "sqlite:///:memory:", "", "sqlite:///"):
        with pytest.raises(BackendInputError) as bad_url:
            open_store(url)
        assert bad_url.value.field == "store_url"
