"""The slot table: which composed adapter each slot of the batched layers holds, and how
many running requests use it (vLLM keeps this, its `LoRAModelManager`'s active adapters,
apart from the worker's cache of loaded ones, as we keep it apart from `AdapterCache`).

The engine thread alone calls `acquire` and `release`, so the table needs no lock; `held`
is a snapshot any thread may take, at worst one engine step old."""

from __future__ import annotations

import time

from vbserve.vblora.layer import MultiAdapterLinear, write_adapter_slot

from .cache import AdapterCache
from .keys import CacheKey


class SlotTable:
    def __init__(self, layers: dict[str, MultiAdapterLinear], cache: AdapterCache) -> None:
        self.layers = layers
        self.cache = cache
        self.num_slots = next(iter(layers.values())).num_slots
        self._key: list[CacheKey | None] = [None] * self.num_slots
        self._users = [0] * self.num_slots
        self._last_used = [0.0] * self.num_slots

    def acquire(self, key: CacheKey) -> int | None:
        """A slot holding `key`'s matrices, copied there from the cache now if no slot holds
        them yet (into the least recently used free slot); None if every slot is in use or
        `key` is no longer cached. Engine thread."""
        if key in self._key:
            slot = self._key.index(key)
        else:
            free = [s for s in range(self.num_slots) if self._users[s] == 0]
            if not free:
                return None
            matrices = self.cache.composed(key)
            if matrices is None:
                return None
            slot = min(free, key=lambda s: self._last_used[s])
            write_adapter_slot(self.layers, slot, matrices)
            self._key[slot] = key
        self._users[slot] += 1
        self._last_used[slot] = time.monotonic()
        return slot

    def release(self, slot: int) -> None:
        """A request that held `slot` finished; its matrices stay for the next one. Engine thread."""
        self._users[slot] -= 1

    def held(self) -> set[CacheKey]:
        """The keys the slots hold now. Any thread: copying the list is one step under the
        GIL, so the snapshot is whole, if up to one engine step old."""
        return {key for key in list(self._key) if key is not None}
