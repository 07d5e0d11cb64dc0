"""Adapters in the engine: a cache of composed adapters (`cache.py`: resolving refs on
request threads, loading and composing on its loader thread, an LRU bounded in bytes) and
the slot table (`slots.py`: which of them the batched layers hold, engine thread only).
See docs/engine.md."""

from .cache import MAX_CACHED_MIXTURES_PER_TENANT, AdapterCache
from .compose import composed_nbytes
from .keys import AdapterKey, CacheKey, MixtureKey
from .slots import SlotTable

__all__ = [
    "MAX_CACHED_MIXTURES_PER_TENANT",
    "AdapterCache",
    "AdapterKey",
    "CacheKey",
    "MixtureKey",
    "SlotTable",
    "composed_nbytes",
]
