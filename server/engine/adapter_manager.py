"""Which adapters are loaded: store lookups, batched composition, an LRU of composed
adapters bounded in bytes (with pinning), and the slots of the batched layers.

Threads: `resolve` runs in the caller's worker thread (it does store I/O); loading runs on
one loader thread, so a cold adapter never stalls the decode loop; slots are touched only
by the engine thread (they feed the forward).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapter_store import AdapterConfig, AdapterError, VBLoRAAdapter
from adapter_store.store import AdapterStore
from server.vblora.compose import compose_adapters
from server.vblora.layer import MultiAdapterLinear, write_adapter_slot

from .types import AdapterRef, AdapterUnavailableError

log = logging.getLogger(__name__)

AdapterKey = tuple[str, str, int]  # tenant, name, version
Matrices = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Composed:
    matrices: Matrices
    nbytes: int


class AdapterManager:
    def __init__(
        self,
        store: AdapterStore,
        layers: dict[str, MultiAdapterLinear],
        *,
        max_rank: int,
        cache_bytes: int,
        device: torch.device,
        dtype: torch.dtype,
        on_event: Callable[[str, float], None] | None = None,
    ) -> None:
        self.store = store
        self.layers = layers
        self.base_shapes = {n: (m.base.in_features, m.base.out_features) for n, m in layers.items()}
        self.num_slots = next(iter(layers.values())).num_slots
        self.max_rank = max_rank
        self.cache_bytes = cache_bytes
        self.device, self.dtype = device, dtype
        self.on_event = on_event or (lambda kind, value: None)
        self._lock = threading.Lock()
        self._cache: OrderedDict[AdapterKey, _Composed] = OrderedDict()
        self._cached_bytes = 0
        self._failed: dict[AdapterKey, AdapterUnavailableError] = {}
        self._loading: set[AdapterKey] = set()
        # A version that was replaced in the store before it could be loaded -> the version
        # loaded instead. One entry per such race, so it stays small.
        self._newer: dict[AdapterKey, AdapterKey] = {}
        self._pinned: set[tuple[str, str]] = set()
        self._queue: queue.Queue[AdapterKey] = queue.Queue()
        # Engine-thread state: slot -> (key, users)
        self._slot_key: list[AdapterKey | None] = [None] * self.num_slots
        self._slot_users = [0] * self.num_slots
        self._slot_last_used = [0.0] * self.num_slots
        self._loader = threading.Thread(target=self._load_loop, name="adapter-loader", daemon=True)
        self._loader.start()

    # -- called from request threads -------------------------------------------------

    def resolve(self, ref: AdapterRef) -> AdapterKey:
        """Current version of `ref`, checked against the base model; starts loading it.
        Raises AdapterUnavailableError (not_found / incompatible / unavailable)."""
        try:
            record = self.store.get_record(ref.tenant, ref.name)
        except AdapterError as exc:
            if exc.kind == "unavailable":
                # Stale-on-outage: the store cannot say which version is current, so serve
                # the newest version composed here (it passed every check when it was
                # resolved) rather than fail a request this process can answer. Uncached
                # adapters still fail with "unavailable" (503 + Retry-After).
                with self._lock:
                    cached = [k for k in self._cache if k[0] == ref.tenant and k[1] == ref.name]
                    if cached:
                        key = max(cached, key=lambda k: k[2])
                        self._cache.move_to_end(key)
                        self.on_event("hit", 1)
                        return key
            raise AdapterUnavailableError("model", str(exc), _kind(exc)) from None
        key = (ref.tenant, ref.name, record.version)
        # A cached version passed every check when it was loaded, and versions are
        # immutable: skip parsing its config again (most of a resolve's CPU time).
        if self._hit(key):
            return key
        try:
            config = AdapterConfig.from_json(record.config)
            config.check_compatible(self.base_shapes)
        except AdapterError as exc:
            raise AdapterUnavailableError("model", str(exc), _kind(exc)) from None
        self._check_rank(config)
        with self._lock:
            self._failed.pop(key, None)
            self._request_load(key)
        return key

    def _hit(self, key: AdapterKey) -> bool:
        with self._lock:
            if key not in self._cache:
                return False
            self._cache.move_to_end(key)
            self.on_event("hit", 1)
            return True

    def _check_rank(self, config: AdapterConfig) -> None:
        if config.r > self.max_rank:
            raise AdapterUnavailableError(
                "model", f"rank {config.r} exceeds this server's max {self.max_rank}", "invalid_request"
            )

    def _request_load(self, key: AdapterKey) -> None:
        """Queue `key` for the loader unless it is already on its way. Caller holds the lock."""
        if key not in self._loading:
            self._loading.add(key)
            self.on_event("miss", 1)
            self._queue.put(key)

    def pin(self, ref: AdapterRef) -> None:
        """Keep every version of this adapter in the composed cache (never evicted)."""
        with self._lock:
            self._pinned.add((ref.tenant, ref.name))

    def unpin(self, ref: AdapterRef) -> None:
        with self._lock:
            self._pinned.discard((ref.tenant, ref.name))

    def state(self, key: AdapterKey) -> str | AdapterUnavailableError:
        """'ready', 'loading', or the error that ended the load."""
        with self._lock:
            if key in self._cache:
                return "ready"
            return self._failed.get(key, "loading")

    def current(self, key: AdapterKey) -> AdapterKey:
        """The version served to a request that resolved `key`: `key` itself, or the newer
        version that was published while `key` was loading (see `_load`)."""
        with self._lock:
            while key in self._newer:
                key = self._newer[key]
            return key

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    # -- loader thread ---------------------------------------------------------------

    def _load_loop(self) -> None:
        while True:
            keys = [self._queue.get()]
            while True:  # take everything queued: one batched compose for all of it
                try:
                    keys.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._load(keys)

    def _load(self, keys: list[AdapterKey]) -> None:
        fetched: dict[AdapterKey, VBLoRAAdapter] = {}
        for key in keys:
            try:
                record, adapter = self.store.get(key[0], key[1])
                adapter.config.check_compatible(self.base_shapes)
                self._check_rank(adapter.config)
            except AdapterError as exc:
                self._fail(key, AdapterUnavailableError("model", str(exc), _kind(exc)))
                continue
            except AdapterUnavailableError as exc:
                self._fail(key, exc)
                continue
            latest = (key[0], key[1], record.version)
            if latest != key:
                # Republished since the request resolved `key`: the store keeps only the
                # newest version, and that is the one the request is served (only a deleted
                # adapter fails it, above).
                with self._lock:
                    self._loading.discard(key)
                    self._newer[key] = latest
                    if latest in self._cache:
                        continue
                    self._loading.add(latest)
            fetched[latest] = adapter
        groups: dict[tuple, list[tuple[AdapterKey, VBLoRAAdapter]]] = {}
        for key, adapter in fetched.items():
            groups.setdefault(adapter.config.composition_key, []).append((key, adapter))
        for group in groups.values():
            start = time.perf_counter()
            mats = compose_adapters([a for _, a in group], device=self.device, dtype=self.dtype)
            self.on_event("compose_seconds", time.perf_counter() - start)
            for i, (key, _) in enumerate(group):
                own = {name: (a[i].clone(), b[i].clone()) for name, (a, b) in mats.items()}
                nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in own.values())
                self._insert(key, _Composed(own, nbytes))

    def _insert(self, key: AdapterKey, item: _Composed) -> None:
        with self._lock:
            self._loading.discard(key)
            if key in self._cache:  # loaded twice: queued again while a redirect loaded it
                return
            self._cache[key] = item
            self._cached_bytes += item.nbytes
            # Evict least recently used, skipping pinned adapters and the one just loaded.
            for old in list(self._cache):
                if self._cached_bytes <= self.cache_bytes:
                    break
                if old == key or old[:2] in self._pinned:
                    continue
                self._cached_bytes -= self._cache.pop(old).nbytes
                self.on_event("eviction", 1)

    def _fail(self, key: AdapterKey, error: AdapterUnavailableError) -> None:
        with self._lock:
            self._loading.discard(key)
            self._failed[key] = error

    # -- engine thread ---------------------------------------------------------------

    def acquire_slot(self, key: AdapterKey) -> int | None:
        """A slot holding `key`'s matrices, written now if needed; None if every slot is in use."""
        if key in self._slot_key:
            slot = self._slot_key.index(key)
        else:
            free = [s for s in range(self.num_slots) if self._slot_users[s] == 0]
            if not free:
                return None
            with self._lock:
                item = self._cache.get(key)
                if item is None:  # evicted between ready and admission: load it again
                    self._request_load(key)
                    return None
            slot = min(free, key=lambda s: self._slot_last_used[s])
            write_adapter_slot(self.layers, slot, item.matrices)
            self._slot_key[slot] = key
        self._slot_users[slot] += 1
        self._slot_last_used[slot] = time.monotonic()
        return slot

    def release_slot(self, slot: int) -> None:
        self._slot_users[slot] -= 1


def _kind(exc: AdapterError) -> str:
    return {"not_found": "not_found", "unavailable": "unavailable", "incompatible_base_model": "incompatible"}.get(
        exc.kind, "invalid_request"
    )
