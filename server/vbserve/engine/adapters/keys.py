"""What the adapter cache and the slot table key their entries by: one version of one
tenant's adapter, or a mixture's recipe. Both are immutable and hashable, so a new version
(or new weights) is a new key, never a changed entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class AdapterKey(NamedTuple):
    """One version of one tenant's adapter: what a request's `AdapterRef` resolves to."""

    tenant: str
    name: str
    version: int


@dataclass(frozen=True)
class MixtureKey:
    """A mixture's recipe: each component's key (so a new version is a new recipe), its
    weight, and the combination type."""

    parts: tuple[AdapterKey, ...]
    weights: tuple[float, ...]
    combination: str

    @property
    def tenant(self) -> str:
        """The tenant whose adapters it mixes (a mixture never spans tenants)."""
        return self.parts[0].tenant


CacheKey = AdapterKey | MixtureKey
