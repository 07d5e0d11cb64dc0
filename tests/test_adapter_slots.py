"""The slot table on its own: which composed adapter each slot of the batched layers
holds, reused while users hold it, refilled least recently used first."""

from __future__ import annotations

import time

import torch

from tests.conftest import described, tiny_llama
from tests.test_engine import TENANT, random_adapter
from vbserve.engine.adapters import AdapterCache, AdapterKey, SlotTable
from vbserve.engine.contract import AdapterRef
from vbserve.settings import Settings
from vbserve.vblora.layer import AdapterRouting, wrap_linear_layers
from vbserve_store.store import SQLiteAdapterStore


def cached(cache: AdapterCache, name: str) -> AdapterKey:
    """Resolve `name` and wait until the loader has composed it."""
    key = cache.resolve(AdapterRef(TENANT, name))
    cache.want(key)  # a wanted adapter stays cached (the cache holds all three anyway)
    deadline = time.monotonic() + 30
    while (state := cache.state(key)) == "loading" and time.monotonic() < deadline:
        time.sleep(0.005)
    assert state == "ready"
    return key


def test_slots_are_shared_by_key_and_refilled_least_recently_used_first(tmp_path):
    model = tiny_llama(seed=7)
    store = SQLiteAdapterStore(tmp_path / "a.db")
    for i in range(3):
        store.put(TENANT, f"ad{i}", random_adapter(model, seed=300 + i))
    spec = described(model, settings=Settings(max_lora_rank=8))
    layers = wrap_linear_layers(model, AdapterRouting(), num_slots=2, max_rank=8)
    cache = AdapterCache(
        store, spec, cache_bytes=1 << 30, device=torch.device("cpu"), dtype=torch.float32
    )
    slots = SlotTable(layers, cache)
    try:
        k0, k1, k2 = (cached(cache, f"ad{i}") for i in range(3))
        assert isinstance(k0, AdapterKey) and k0 == (TENANT, "ad0", 1)
        first = slots.acquire(k0)
        assert slots.acquire(k0) == first  # a second user of ad0 shares its slot
        other = slots.acquire(k1)
        assert {first, other} == {0, 1}
        assert slots.acquire(k2) is None  # every slot has users
        slots.release(other)
        assert slots.acquire(k2) == other  # ad1's slot had no users left: ad2 takes it
        assert slots.held() == {k0, k2}
        q_proj = next(name for name in layers if name.endswith("q_proj"))
        a, b = cache.composed(k2)[q_proj]
        assert torch.equal(layers[q_proj].lora_a[other, : a.shape[0]], a)
        assert torch.equal(layers[q_proj].lora_b[other, : a.shape[0]], b.T)
        for slot in (first, first, other):
            slots.release(slot)
        assert slots.acquire(k2) == other  # ad2 is still there: reused, though ad0's slot is older
        slots.release(other)
        assert slots.acquire(AdapterKey(TENANT, "never-cached", 1)) is None  # the cache loads it first
        assert slots.acquire(k1) == first  # a new adapter takes the least recently used free slot
        assert slots.held() == {k1, k2}
    finally:
        store.close()
