"""Which adapters are loaded: store lookups, batched composition, an LRU of composed
adapters bounded in bytes (with pinning), and the slots of the batched layers.

Threads: `resolve` runs in the caller's worker thread (it does store I/O); loading runs on
one loader thread, so a cold adapter never stalls the decode loop; slots, `want` and
`unwant` are called only by the engine thread (they follow its waiting requests).

An adapter a waiting request needs is never lost: the engine `want`s it while the request
waits, and a wanted adapter is not evicted; one that is gone anyway (evicted between the
request's resolve and its `want`) is loaded again. Wanted adapters are composed in turns,
so they never hold more than the cache's bytes (or one adapter larger than that): the
loader keeps the rest fetched, not composed, until admitted requests `unwant` theirs.

A mixture (`MixtureRef`: several adapters with weights, per request) is cached like an
adapter, under its recipe (`MixtureKey`: the components' versions, weights and combination),
so requests that repeat a recipe share one composition and one slot.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapter_store import (
    AdapterConfig,
    AdapterError,
    AdapterValidationError,
    LoRAAdapter,
    LoRAConfig,
    VBLoRAAdapter,
    config_from_json,
)
from adapter_store.store import AdapterStore
from server.model import BaseModelSpec
from server.vblora.compose import compose_adapters
from server.vblora.layer import MultiAdapterLinear, write_adapter_slot
from server.vblora.mixture import mix_lora, mixed_rank

from .types import AdapterRef, AdapterUnavailableError, MixtureRef

log = logging.getLogger(__name__)

AdapterKey = tuple[str, str, int]  # tenant, name, version
Matrices = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MixtureKey:
    """A mixture's recipe: each component's key (so a new version is a new recipe), its
    weight, and the combination type."""

    parts: tuple[AdapterKey, ...]
    weights: tuple[float, ...]
    combination: str


CacheKey = AdapterKey | MixtureKey
# Composed mixtures one tenant keeps in the cache (see `_evict_own_mixtures`): a few recipes
# in use at once are cached, a stream of new ones replaces the tenant's own.
MAX_CACHED_MIXTURES_PER_TENANT = 4
Adapter = VBLoRAAdapter | LoRAAdapter
Fetched = Adapter | tuple[Adapter, ...]  # an adapter, or a mixture's components


@dataclass
class _Composed:
    matrices: Matrices
    nbytes: int


class AdapterManager:
    def __init__(
        self,
        store: AdapterStore,
        layers: dict[str, MultiAdapterLinear],
        base_model: BaseModelSpec,
        *,
        cache_bytes: int,
        device: torch.device,
        dtype: torch.dtype,
        on_event: Callable[[str, float], None] | None = None,
    ) -> None:
        self.store = store
        self.layers = layers
        self.base_model = base_model  # what adapters are checked against: module shapes, rank
        self.num_slots = next(iter(layers.values())).num_slots
        self.cache_bytes = cache_bytes
        self.device, self.dtype = device, dtype
        self.on_event = on_event or (lambda kind, value: None)
        self._lock = threading.Lock()
        self._cache: OrderedDict[CacheKey, _Composed] = OrderedDict()
        self._cached_bytes = 0
        self._failed: dict[CacheKey, AdapterUnavailableError] = {}
        self._loading: set[CacheKey] = set()
        # A version that was replaced in the store before it could be loaded -> the version
        # loaded instead. One entry per such race, so it stays small.
        self._newer: dict[CacheKey, CacheKey] = {}
        self._pinned: set[tuple[str, str]] = set()
        self._wanted: Counter[CacheKey] = Counter()  # key -> waiting requests that need it
        # Fetched from the store, waiting for room in the cache to be composed (loader thread).
        self._fetched: dict[CacheKey, Fetched] = {}
        self._queue: queue.Queue[CacheKey | None] = queue.Queue()  # None: room may have freed
        # Engine-thread state: slot -> (key, users)
        self._slot_key: list[CacheKey | None] = [None] * self.num_slots
        self._slot_users = [0] * self.num_slots
        self._slot_last_used = [0.0] * self.num_slots
        self._loader = threading.Thread(target=self._load_loop, name="adapter-loader", daemon=True)
        self._loader.start()

    # -- called from request threads -------------------------------------------------

    def resolve(self, ref: AdapterRef | MixtureRef) -> CacheKey:
        """Current version of `ref` (of each of a mixture's adapters), checked against the
        base model; starts loading it. Raises AdapterUnavailableError (not_found /
        incompatible / unavailable / invalid_request)."""
        if isinstance(ref, MixtureRef):
            return self._resolve_mixture(ref)
        try:
            record = self.store.get_record(ref.tenant, ref.name)
        except AdapterError as exc:
            if exc.kind == "unavailable":
                # Stale-on-outage: the store cannot say which version is current, so serve
                # the newest version composed here (it passed every check when it was
                # resolved) rather than fail a request this process can answer. Uncached
                # adapters still fail with "unavailable" (503 + Retry-After).
                with self._lock:
                    cached = [k for k in self._cache if isinstance(k, tuple) and k[:2] == (ref.tenant, ref.name)]
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
        self._check_rank(self._servable_config(record.config, "model").r, "model")
        self._start_load(key)
        return key

    def _resolve_mixture(self, ref: MixtureRef) -> MixtureKey:
        ref.validate()
        records = []
        for c in ref.components:
            try:
                records.append(self.store.get_record(ref.tenant, c.name))
            except AdapterError as exc:
                raise AdapterUnavailableError(c.name_field, str(exc), _kind(exc)) from None
        key = MixtureKey(
            tuple((ref.tenant, r.name, r.version) for r in records),
            tuple(float(c.weight) for c in ref.components),
            ref.combination,
        )
        if self._hit(key):
            return key
        configs = [self._servable_config(r.config, c.name_field) for r, c in zip(records, ref.components, strict=True)]
        self._check_mixture_rank([c.r for c in configs], ref.combination, ref.field, ref.combination_field)
        self._start_load(key)
        return key

    def _servable_config(self, config_json: dict, field: str) -> AdapterConfig | LoRAConfig:
        try:
            config = config_from_json(config_json)
            config.check_compatible(self.base_model.module_shapes)
        except AdapterError as exc:
            raise AdapterUnavailableError(field, str(exc), _kind(exc)) from None
        return config

    def _start_load(self, key: CacheKey) -> None:
        with self._lock:
            self._failed.pop(key, None)
            self._request_load(key)

    def _hit(self, key: CacheKey) -> bool:
        with self._lock:
            if key not in self._cache:
                return False
            self._cache.move_to_end(key)
            self.on_event("hit", 1)
            return True

    def _check_rank(self, rank: int, field: str, subject: str | None = None) -> None:
        try:
            self.base_model.check_rank(rank, field, subject=subject)
        except AdapterValidationError as exc:
            raise AdapterUnavailableError(field, exc.reason, "invalid_request") from None

    def _check_mixture_rank(self, ranks: list[int], combination: str, field: str, combination_field: str) -> None:
        if combination == "linear" and len(set(ranks)) > 1:
            raise AdapterUnavailableError(
                combination_field,
                f"linear mixes adapters of one rank (PEFT's rule); these have ranks {ranks}",
                "invalid_request",
            )
        rank = mixed_rank(ranks, combination)
        self._check_rank(rank, field, f"the mixture's rank {rank} (ranks {ranks}, {combination})")

    def _request_load(self, key: CacheKey) -> None:
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

    def state(self, key: CacheKey) -> str | AdapterUnavailableError:
        """'ready', 'loading' (again, if it had been evicted), or the error that ended the load."""
        with self._lock:
            if key in self._cache:
                return "ready"
            if key in self._failed:
                return self._failed[key]
            self._request_load(key)
            return "loading"

    def current(self, key: CacheKey) -> CacheKey:
        """The version served to a request that resolved `key`: `key` itself, or the newer
        version that was published while `key` was loading (see `_fetch`)."""
        with self._lock:
            return self._current(key)

    def _current(self, key: CacheKey) -> CacheKey:
        while key in self._newer:
            key = self._newer[key]
        return key

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def resident(self, tenant: str) -> list[tuple[str, int, bool]]:
        """The tenant's adapters composed in this process's cache: (name, version, whether a
        batch slot holds it now). The slots are the engine thread's; a snapshot of them is
        at worst one step old, which is all a display needs."""
        in_slots = set(list(self._slot_key))
        with self._lock:
            keys = [key for key in self._cache if isinstance(key, tuple) and key[0] == tenant]  # not mixtures
        return sorted((name, version, (t, name, version) in in_slots) for t, name, version in keys)

    # -- loader thread ---------------------------------------------------------------

    def _load_loop(self) -> None:
        while True:
            keys = [self._queue.get()]
            while True:  # take everything queued: one batched compose for all of it
                try:
                    keys.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for key in keys:
                if key is not None:
                    self._fetch(key)
            self._compose_what_fits()

    def _fetch(self, key: CacheKey) -> None:
        """Read `key` from the store into `_fetched` (or fail it). An error nobody foresaw
        (a bug, a store error it did not map) fails this adapter's requests alone: were it
        to end the loader thread, every tenant's next load would wait forever."""
        try:
            if isinstance(key, MixtureKey):
                self._fetch_mixture(key)
            else:
                self._fetch_adapter(key)
        except Exception:
            self._fail_unexpectedly(key)

    def _fetch_adapter(self, key: AdapterKey) -> None:
        try:
            record, adapter = self.store.get(key[0], key[1])
            adapter.config.check_compatible(self.base_model.module_shapes)
            self._check_rank(adapter.config.r, "model")
        except AdapterError as exc:
            self._fail(key, AdapterUnavailableError("model", str(exc), _kind(exc)))
            return
        except AdapterUnavailableError as exc:
            self._fail(key, exc)
            return
        self._keep_fetched(key, (key[0], key[1], record.version), adapter)

    def _fetch_mixture(self, key: MixtureKey) -> None:
        """Read a mixture's adapters; a component republished since the resolve makes a
        new recipe (with its new version), served as `_keep_fetched` says."""
        parts, adapters = [], []
        for tenant, name, _ in key.parts:
            try:
                record, adapter = self.store.get(tenant, name)
                adapter.config.check_compatible(self.base_model.module_shapes)
            except AdapterError as exc:
                self._fail(key, AdapterUnavailableError("adapters", f"{name}: {exc}", _kind(exc)))
                return
            parts.append((tenant, name, record.version))
            adapters.append(adapter)
        try:
            self._check_mixture_rank([a.config.r for a in adapters], key.combination, "adapters", "adapters")
        except AdapterUnavailableError as exc:
            self._fail(key, exc)
            return
        self._keep_fetched(key, MixtureKey(tuple(parts), key.weights, key.combination), tuple(adapters))

    def _keep_fetched(self, key: CacheKey, latest: CacheKey, fetched: Fetched) -> None:
        if latest != key:
            # Republished since the request resolved `key`: the store keeps only the
            # newest version, and that is the one the request is served (only a deleted
            # adapter fails it); the requests waiting for `key` now want `latest`.
            with self._lock:
                self._loading.discard(key)
                self._newer[key] = latest
                if key in self._wanted:
                    self._wanted[latest] += self._wanted.pop(key)
                if latest in self._cache:
                    return
                self._loading.add(latest)
        self._fetched[latest] = fetched

    def _compose_what_fits(self) -> None:
        """Compose fetched adapters, wanted ones first and in turns: while the wanted ones
        cached and these fit in the cache's bytes, and always one when no wanted adapter is
        cached (so one larger than the cache is still served). The rest stay fetched until
        an `unwant` makes room; one nobody waits for yet is dropped (a resolve's early
        start), and loaded again by the `want` of its request."""
        with self._lock:
            used = sum(self._cache[k].nbytes for k in self._wanted if k in self._cache)
            chosen: list[tuple[CacheKey, Fetched]] = []
            for key in sorted(self._fetched, key=lambda k: k not in self._wanted):
                nbytes = self._nbytes(key, self._fetched[key])
                if used and used + nbytes > self.cache_bytes:
                    break
                chosen.append((key, self._fetched.pop(key)))
                used += nbytes
            for key in [k for k in self._fetched if k not in self._wanted]:
                del self._fetched[key]
                self._loading.discard(key)
        try:
            self._compose(chosen)
        except Exception:
            # Composed in one batch, one bad adapter would fail the others beside it: compose
            # them one at a time, so the error ends only the requests of the one that raises.
            for item in chosen:
                try:
                    self._compose([item])
                except Exception:
                    self._fail_unexpectedly(item[0])

    def _compose(self, chosen: list[tuple[CacheKey, Fetched]]) -> None:
        """Compose fetched adapters into the cache: VB-LoRA adapters of one shape in one batch."""
        groups: dict[tuple, list[tuple[AdapterKey, VBLoRAAdapter]]] = {}
        for key, fetched in chosen:
            if isinstance(key, MixtureKey):
                self._compose_mixture(key, fetched)
            elif isinstance(fetched, LoRAAdapter):
                mats, scaling = self._lora_matrices(fetched)
                own = {name: (a.to(self.dtype), (b * scaling).to(self.dtype)) for name, (a, b) in mats.items()}
                self._insert(key, _Composed(own, composed_nbytes(fetched.config, self.dtype)))
            else:
                groups.setdefault(fetched.config.composition_key, []).append((key, fetched))
        for group in groups.values():
            start = time.perf_counter()
            mats = compose_adapters([a for _, a in group], device=self.device, dtype=self.dtype)
            self.on_event("compose_seconds", time.perf_counter() - start)
            for i, (key, adapter) in enumerate(group):
                own = {name: (a[i].clone(), b[i].clone()) for name, (a, b) in mats.items()}
                self._insert(key, _Composed(own, composed_nbytes(adapter.config, self.dtype)))

    def _lora_matrices(self, adapter: Adapter) -> tuple[Matrices, float]:
        """An adapter's unscaled LoRA matrices (float32, on the device) and PEFT's scaling:
        alpha/r for a LoRA; 1 for a VB-LoRA adapter, which adds B A x unscaled."""
        if isinstance(adapter, LoRAAdapter):
            mats = adapter.matrices(torch.float32)
            return {n: (a.to(self.device), b.to(self.device)) for n, (a, b) in mats.items()}, adapter.config.scaling
        mats = compose_adapters([adapter], device=self.device)
        return {name: (a[0], b[0]) for name, (a, b) in mats.items()}, 1.0

    def _compose_mixture(self, key: MixtureKey, adapters: tuple[Adapter, ...]) -> None:
        """Compose each component in float32, mix them (PEFT's recipe), then cast."""
        start = time.perf_counter()
        parts, scalings = zip(*(self._lora_matrices(adapter) for adapter in adapters), strict=True)
        mixed = mix_lora(list(parts), list(key.weights), list(scalings), key.combination)
        self.on_event("compose_seconds", time.perf_counter() - start)
        own = {name: (a.to(self.dtype), b.to(self.dtype)) for name, (a, b) in mixed.items()}
        self._insert(key, _Composed(own, self._nbytes(key, adapters)))

    def _nbytes(self, key: CacheKey, fetched: Fetched) -> int:
        if not isinstance(key, MixtureKey):
            return composed_nbytes(fetched.config, self.dtype)
        sizes = [composed_nbytes(adapter.config, self.dtype) for adapter in fetched]
        return sum(sizes) if key.combination == "cat" else max(sizes)

    def _insert(self, key: CacheKey, item: _Composed) -> None:
        with self._lock:
            self._loading.discard(key)
            if key in self._cache:  # loaded twice: queued again while a redirect loaded it
                return
            self._cache[key] = item
            self._cached_bytes += item.nbytes
            if isinstance(key, MixtureKey):
                self._evict_own_mixtures(key)
            # Evict least recently used, skipping pinned and wanted adapters and the one just loaded.
            for old in list(self._cache):
                if self._cached_bytes <= self.cache_bytes:
                    break
                pinned = isinstance(old, tuple) and old[:2] in self._pinned
                if old == key or pinned or old in self._wanted:
                    continue
                self._cached_bytes -= self._cache.pop(old).nbytes
                self.on_event("eviction", 1)

    def _evict_own_mixtures(self, key: MixtureKey) -> None:
        """A recipe's weights are part of it, so a tenant could make a new one per request
        and, through the shared LRU, push every other tenant's adapters out. Past
        MAX_CACHED_MIXTURES_PER_TENANT its own least recently used recipes go first (not
        one a request waits for). Caller holds the lock."""
        tenant = key.parts[0][0]
        own = [k for k in self._cache if isinstance(k, MixtureKey) and k.parts[0][0] == tenant]
        for old in own[: max(0, len(own) - MAX_CACHED_MIXTURES_PER_TENANT)]:
            if old != key and old not in self._wanted:
                self._cached_bytes -= self._cache.pop(old).nbytes
                self.on_event("eviction", 1)

    def _fail(self, key: CacheKey, error: AdapterUnavailableError) -> None:
        with self._lock:
            self._loading.discard(key)
            self._failed[key] = error

    def _fail_unexpectedly(self, key: CacheKey) -> None:
        log.exception("loading adapter %s failed", key)
        # 503 (Retry-After): the next request for it loads it again (`_start_load`).
        field = "adapters" if isinstance(key, MixtureKey) else "model"
        self._fail(key, AdapterUnavailableError(field, "this server could not load the adapter", "unavailable"))

    # -- engine thread ---------------------------------------------------------------

    def want(self, key: CacheKey) -> None:
        """A request waiting for `key` joined the queue: keep `key` cached until `unwant`,
        and load it again if it was evicted since the request's resolve."""
        with self._lock:
            key = self._current(key)
            self._wanted[key] += 1
            if key not in self._cache and key not in self._failed:
                self._request_load(key)

    def unwant(self, key: CacheKey) -> None:
        """The request that wanted `key` left the queue (admitted with a slot, or finished)."""
        with self._lock:
            key = self._current(key)
            self._wanted[key] -= 1
            if self._wanted[key] <= 0:
                del self._wanted[key]
        self._queue.put(None)  # the loader may now have room for a fetched adapter

    def acquire_slot(self, key: CacheKey) -> int | None:
        """A slot holding `key`'s matrices, written now if needed; None if every slot is in use."""
        if key in self._slot_key:
            slot = self._slot_key.index(key)
        else:
            free = [s for s in range(self.num_slots) if self._slot_users[s] == 0]
            if not free:
                return None
            with self._lock:
                item = self._cache.get(key)
            if item is None:  # not cached: `state` loads it again on the next admission
                return None
            slot = min(free, key=lambda s: self._slot_last_used[s])
            write_adapter_slot(self.layers, slot, item.matrices)
            self._slot_key[slot] = key
        self._slot_users[slot] += 1
        self._slot_last_used[slot] = time.monotonic()
        return slot

    def release_slot(self, slot: int) -> None:
        self._slot_users[slot] -= 1


def composed_nbytes(config: AdapterConfig | LoRAConfig, dtype: torch.dtype) -> int:
    """Bytes of an adapter's composed matrices: A (r, in) and B (out, r) per module."""
    return sum(config.r * (m.in_features + m.out_features) for m in config.modules) * dtype.itemsize


def _kind(exc: AdapterError) -> str:
    return {"not_found": "not_found", "unavailable": "unavailable", "incompatible_base_model": "incompatible"}.get(
        exc.kind, "invalid_request"
    )
