"""Turning adapters fetched from the store into the matrices a slot holds: VB-LoRA adapters
composed from their bank (all of one shape in one batched call), plain LoRA adapters
scaled as they are, mixtures composed in float32, mixed (PEFT's recipe), then cast.

Pure functions of what was fetched; the cache's loader thread calls them (see `cache.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vbserve.vblora.compose import compose_adapters
from vbserve.vblora.mixture import mix_lora
from vbserve_store import AdapterConfig, LoRAAdapter, LoRAConfig, VBLoRAAdapter

from .keys import CacheKey, MixtureKey

Matrices = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r))
Adapter = VBLoRAAdapter | LoRAAdapter
Fetched = Adapter | tuple[Adapter, ...]  # an adapter, or a mixture's components


@dataclass
class Composed:
    """A cache entry: an adapter's (or a mixture's) matrices and the bytes they hold."""

    matrices: Matrices
    nbytes: int


def compose_fetched(
    fetched: list[tuple[CacheKey, Fetched]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    on_event: Callable[[str, float], None],
) -> list[tuple[CacheKey, Composed]]:
    """Compose fetched adapters (and mixtures) for the cache: VB-LoRA adapters of one shape
    in one batch, each timed as a `compose_seconds` event."""
    composed: list[tuple[CacheKey, Composed]] = []
    groups: dict[tuple, list[tuple[CacheKey, VBLoRAAdapter]]] = {}
    for key, item in fetched:
        if isinstance(key, MixtureKey):
            composed.append((key, _compose_mixture(key, item, device=device, dtype=dtype, on_event=on_event)))
        elif isinstance(item, LoRAAdapter):
            mats, scaling = _lora_matrices(item, device)
            own = {name: (a.to(dtype), (b * scaling).to(dtype)) for name, (a, b) in mats.items()}
            composed.append((key, Composed(own, composed_nbytes(item.config, dtype))))
        else:
            groups.setdefault(item.config.composition_key, []).append((key, item))
    for group in groups.values():
        start = time.perf_counter()
        mats = compose_adapters([a for _, a in group], device=device, dtype=dtype)
        on_event("compose_seconds", time.perf_counter() - start)
        for i, (key, adapter) in enumerate(group):
            own = {name: (a[i].clone(), b[i].clone()) for name, (a, b) in mats.items()}
            composed.append((key, Composed(own, composed_nbytes(adapter.config, dtype))))
    return composed


def _lora_matrices(adapter: Adapter, device: torch.device) -> tuple[Matrices, float]:
    """An adapter's unscaled LoRA matrices (float32, on the device) and PEFT's scaling:
    alpha/r for a LoRA; 1 for a VB-LoRA adapter, which adds B A x unscaled."""
    if isinstance(adapter, LoRAAdapter):
        mats = adapter.matrices(torch.float32)
        return {n: (a.to(device), b.to(device)) for n, (a, b) in mats.items()}, adapter.config.scaling
    mats = compose_adapters([adapter], device=device)
    return {name: (a[0], b[0]) for name, (a, b) in mats.items()}, 1.0


def _compose_mixture(
    key: MixtureKey,
    adapters: tuple[Adapter, ...],
    *,
    device: torch.device,
    dtype: torch.dtype,
    on_event: Callable[[str, float], None],
) -> Composed:
    """Compose each component in float32, mix them (PEFT's recipe), then cast."""
    start = time.perf_counter()
    parts, scalings = zip(*(_lora_matrices(adapter, device) for adapter in adapters), strict=True)
    mixed = mix_lora(list(parts), list(key.weights), list(scalings), key.combination)
    on_event("compose_seconds", time.perf_counter() - start)
    own = {name: (a.to(dtype), b.to(dtype)) for name, (a, b) in mixed.items()}
    return Composed(own, fetched_nbytes(key, adapters, dtype))


def fetched_nbytes(key: CacheKey, fetched: Fetched, dtype: torch.dtype) -> int:
    """Bytes `fetched` will hold in the cache once composed (known before composing it)."""
    if not isinstance(key, MixtureKey):
        return composed_nbytes(fetched.config, dtype)
    sizes = [composed_nbytes(adapter.config, dtype) for adapter in fetched]
    return sum(sizes) if key.combination == "cat" else max(sizes)


def composed_nbytes(config: AdapterConfig | LoRAConfig, dtype: torch.dtype) -> int:
    """Bytes of an adapter's composed matrices: A (r, in) and B (out, r) per module."""
    return sum(config.r * (m.in_features + m.out_features) for m in config.modules) * dtype.itemsize
