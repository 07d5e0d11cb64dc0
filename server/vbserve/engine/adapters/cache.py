"""The composed-adapter cache: store lookups, a loader thread that fetches and composes in
batches, an LRU of composed adapters bounded in bytes, and the failures of loads.

Threads (each method's docstring says which calls it):
- request threads call `resolve` (it does store I/O, so never on the engine thread);
- one loader thread (`_load_loop` and what it calls) fetches and composes, so a cold
  adapter never stalls the decode loop;
- the engine thread calls `want`, `unwant`, `state`, `current` and, through the slot
  table, `composed`;
- any thread may read `cached_bytes` and `composed_adapters`.
`_lock` guards everything the threads share: the LRU, failures, what is loading, the
redirects to newer versions and the want counts. `_fetched` is the loader thread's alone.

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
from collections import Counter, OrderedDict
from collections.abc import Callable

import torch

from vbserve.model import BaseModelSpec
from vbserve.vblora.mixture import mixed_rank
from vbserve_store import AdapterConfig, AdapterError, AdapterValidationError, LoRAConfig, config_from_json
from vbserve_store.store import AdapterStore

from ..contract import AdapterRef, AdapterUnavailableError, MixtureRef
from .compose import Composed, Fetched, Matrices, compose_fetched, fetched_nbytes
from .keys import AdapterKey, CacheKey, MixtureKey

log = logging.getLogger(__name__)

# Composed mixtures one tenant keeps in the cache (see `_evict_own_mixtures`): a few recipes
# in use at once are cached, a stream of new ones replaces the tenant's own.
MAX_CACHED_MIXTURES_PER_TENANT = 4


class AdapterCache:
    """Composed adapters by key, loaded on demand, bounded in bytes; see the module's
    docstring for which thread calls what."""

    def __init__(
        self,
        store: AdapterStore,
        base_model: BaseModelSpec,
        *,
        cache_bytes: int,
        device: torch.device,
        dtype: torch.dtype,
        on_event: Callable[[str, float], None] | None = None,
    ) -> None:
        self.store = store
        self.base_model = base_model  # what adapters are checked against: module shapes, rank
        self.cache_bytes = cache_bytes
        self.device, self.dtype = device, dtype
        self.on_event = on_event or (lambda kind, value: None)
        self._lock = threading.Lock()
        self._cache: OrderedDict[CacheKey, Composed] = OrderedDict()
        self._cached_bytes = 0
        self._failed: dict[CacheKey, AdapterUnavailableError] = {}
        self._loading: set[CacheKey] = set()
        # A version that was replaced in the store before it could be loaded -> the version
        # loaded instead. One entry per such race, so it stays small.
        self._newer: dict[CacheKey, CacheKey] = {}
        self._wanted: Counter[CacheKey] = Counter()  # key -> waiting requests that need it
        # Fetched from the store, waiting for room in the cache to be composed (loader thread).
        self._fetched: dict[CacheKey, Fetched] = {}
        self._queue: queue.Queue[CacheKey | None] = queue.Queue()  # None: room may have freed
        self._loader = threading.Thread(target=self._load_loop, name="adapter-loader", daemon=True)
        self._loader.start()

    # -- request threads ---------------------------------------------------------------

    def resolve(self, ref: AdapterRef | MixtureRef) -> CacheKey:
        """Current version of `ref` (of each of a mixture's adapters), checked against the
        base model; starts loading it. Raises AdapterUnavailableError (not_found /
        incompatible / unavailable / invalid_request). Request threads: it does store I/O."""
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
                    cached = [
                        k
                        for k in self._cache
                        if isinstance(k, AdapterKey) and (k.tenant, k.name) == (ref.tenant, ref.name)
                    ]
                    if cached:
                        key = max(cached, key=lambda k: k.version)
                        self._cache.move_to_end(key)
                        self.on_event("hit", 1)
                        return key
            raise AdapterUnavailableError("model", str(exc), _kind(exc)) from None
        key = AdapterKey(ref.tenant, ref.name, record.version)
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
            tuple(AdapterKey(ref.tenant, r.name, r.version) for r in records),
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

    # -- any thread ----------------------------------------------------------------------

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def composed_adapters(self, tenant: str) -> list[AdapterKey]:
        """The tenant's adapters composed in this cache now (not its mixtures)."""
        with self._lock:
            return [key for key in self._cache if isinstance(key, AdapterKey) and key.tenant == tenant]

    # -- engine thread -------------------------------------------------------------------

    def want(self, key: CacheKey) -> None:
        """A request waiting for `key` joined the engine's queue: keep `key` cached until
        `unwant`, and load it again if it was evicted since the request's resolve."""
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
        version that was published while `key` was loading (see `_keep_fetched`)."""
        with self._lock:
            return self._current(key)

    def _current(self, key: CacheKey) -> CacheKey:
        while key in self._newer:
            key = self._newer[key]
        return key

    def composed(self, key: CacheKey) -> Matrices | None:
        """`key`'s composed matrices, for the slot table to copy into a slot; None if it is
        not cached (`state` loads it again on the next admission)."""
        with self._lock:
            item = self._cache.get(key)
        return None if item is None else item.matrices

    # -- loader thread -------------------------------------------------------------------

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
            record, adapter = self.store.get(key.tenant, key.name)
            adapter.config.check_compatible(self.base_model.module_shapes)
            self._check_rank(adapter.config.r, "model")
        except AdapterError as exc:
            self._fail(key, AdapterUnavailableError("model", str(exc), _kind(exc)))
            return
        except AdapterUnavailableError as exc:
            self._fail(key, exc)
            return
        self._keep_fetched(key, key._replace(version=record.version), adapter)

    def _fetch_mixture(self, key: MixtureKey) -> None:
        """Read a mixture's adapters; a component republished since the resolve makes a
        new recipe (with its new version), served as `_keep_fetched` says."""
        parts, adapters = [], []
        for part in key.parts:
            try:
                record, adapter = self.store.get(part.tenant, part.name)
                adapter.config.check_compatible(self.base_model.module_shapes)
            except AdapterError as exc:
                self._fail(key, AdapterUnavailableError("adapters", f"{part.name}: {exc}", _kind(exc)))
                return
            parts.append(part._replace(version=record.version))
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
                nbytes = fetched_nbytes(key, self._fetched[key], self.dtype)
                if used and used + nbytes > self.cache_bytes:
                    break
                chosen.append((key, self._fetched.pop(key)))
                used += nbytes
            for key in [k for k in self._fetched if k not in self._wanted]:
                del self._fetched[key]
                self._loading.discard(key)
        try:
            self._compose_into_cache(chosen)
        except Exception:
            # Composed in one batch, one bad adapter would fail the others beside it: compose
            # them one at a time, so the error ends only the requests of the one that raises.
            for item in chosen:
                try:
                    self._compose_into_cache([item])
                except Exception:
                    self._fail_unexpectedly(item[0])

    def _compose_into_cache(self, fetched: list[tuple[CacheKey, Fetched]]) -> None:
        for key, item in compose_fetched(fetched, device=self.device, dtype=self.dtype, on_event=self.on_event):
            self._insert(key, item)

    def _insert(self, key: CacheKey, item: Composed) -> None:
        with self._lock:
            self._loading.discard(key)
            if key in self._cache:  # loaded twice: queued again while a redirect loaded it
                return
            self._cache[key] = item
            self._cached_bytes += item.nbytes
            if isinstance(key, MixtureKey):
                self._evict_own_mixtures(key)
            # Evict least recently used, skipping wanted adapters and the one just loaded.
            for old in list(self._cache):
                if self._cached_bytes <= self.cache_bytes:
                    break
                if old == key or old in self._wanted:
                    continue
                self._cached_bytes -= self._cache.pop(old).nbytes
                self.on_event("eviction", 1)

    def _evict_own_mixtures(self, key: MixtureKey) -> None:
        """A recipe's weights are part of it, so a tenant could make a new one per request
        and, through the shared LRU, push every other tenant's adapters out. Past
        MAX_CACHED_MIXTURES_PER_TENANT its own least recently used recipes go first (not
        one a request waits for). Caller holds the lock."""
        own = [k for k in self._cache if isinstance(k, MixtureKey) and k.tenant == key.tenant]
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


def _kind(exc: AdapterError) -> str:
    return {"not_found": "not_found", "unavailable": "unavailable", "incompatible_base_model": "incompatible"}.get(
        exc.kind, "invalid_request"
    )
