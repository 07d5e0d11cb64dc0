"""What an adapter's shape is: which modules it targets and the VB-LoRA sizes r, b, h, k.

Sub-vector layout (the canonical order every tensor of an adapter follows): modules in
`AdapterConfig.modules` order; per module first the A sub-vectors in PEFT's `logits_A`
layout `(r, in/b)`, then the B sub-vectors in `logits_B` layout `(out/b, r)`, each
flattened row-major. S = sum over modules of r * (in + out) / b.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import AdapterValidationError, IncompatibleBaseModelError

# Banks of more than 65536 vectors would need 32-bit indices and no one trains them.
MAX_NUM_VECTORS = 65536
MAX_TOPK = 64
MAX_RANK = 256
MAX_VECTOR_LENGTH = 8192
MAX_MODULES = 4096
MAX_SUBVECTORS = 1 << 24

Config = TypeVar("Config")  # a config of either adapter kind (this one, or `lora.LoRAConfig`)


def natural_key(name: str) -> list[object]:
    """Sort key that orders `layers.10` after `layers.9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class ModuleSpec:
    """One targeted linear layer: its dotted name in the base model and its shape."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class SubvectorSlice:
    """Where one module's A and B sub-vectors sit in the adapter's `(S, ...)` tensors."""

    module: ModuleSpec
    a_start: int
    b_start: int
    end: int


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of a VB-LoRA adapter. `modules` is kept in canonical (natural-sorted) order."""

    modules: tuple[ModuleSpec, ...]
    r: int
    vector_length: int  # b
    num_vectors: int  # h
    topk: int  # k
    base_model: str = ""  # informational name; compatibility is checked by fingerprint
    layout: tuple[SubvectorSlice, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_sizes(r=self.r, vector_length=self.vector_length, num_vectors=self.num_vectors, topk=self.topk)
        ordered = canonical_modules(self.modules)
        b = self.vector_length
        layout, offset = [], 0
        for m in ordered:
            for dim_name, dim in (("in_features", m.in_features), ("out_features", m.out_features)):
                if dim % b:
                    raise AdapterValidationError("vector_length", f"b={b} does not divide {m.name}.{dim_name}={dim}")
            a_start = offset
            b_start = a_start + self.r * m.in_features // b
            offset = b_start + self.r * m.out_features // b
            layout.append(SubvectorSlice(m, a_start, b_start, offset))
        if offset > MAX_SUBVECTORS:
            raise AdapterValidationError("modules", f"{offset} sub-vectors exceed the limit {MAX_SUBVECTORS}")
        object.__setattr__(self, "modules", ordered)
        object.__setattr__(self, "layout", tuple(layout))

    @property
    def num_subvectors(self) -> int:
        return self.layout[-1].end

    @property
    def target_modules(self) -> list[str]:
        """Short names (`q_proj`, ...) of the targeted modules, as PEFT spells them."""
        return sorted({m.name.rsplit(".", 1)[-1] for m in self.modules})

    @property
    def base_fingerprint(self) -> str:
        """Hash of the targeted modules' names and shapes: two models that give the same
        fingerprint for these names can run this adapter."""
        return module_fingerprint(self.modules)

    @property
    def composition_key(self) -> tuple:
        """Adapters with equal keys compose together in one batched kernel call."""
        return (self.modules, self.r, self.vector_length, self.num_vectors, self.topk)

    def check_compatible(self, base_modules: Mapping[str, tuple[int, int]]) -> None:
        check_modules_compatible(self.modules, base_modules)

    def to_json(self) -> dict:
        return {
            "r": self.r,
            "vector_length": self.vector_length,
            "num_vectors": self.num_vectors,
            "topk": self.topk,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "modules": [[m.name, m.in_features, m.out_features] for m in self.modules],
        }

    @classmethod
    def from_json(cls, data: object) -> AdapterConfig:
        return build_config(
            data,
            _CONFIG_FIELDS,
            lambda modules: cls(
                modules=modules,
                r=data["r"],
                vector_length=data["vector_length"],
                num_vectors=data["num_vectors"],
                topk=data["topk"],
                base_model=str(data.get("base_model", "")),
            ),
        )


def build_config(data: object, known: set[str], build: Callable[[tuple[ModuleSpec, ...]], Config]) -> Config:
    """`build(modules of data)`, for a config of any adapter kind read from JSON: not an
    object, a field not in `known`, a missing key, a module list that is not
    `[name, in, out]` triples, or a `base_fingerprint` that does not match the modules is an
    AdapterValidationError naming it."""
    if not isinstance(data, dict):
        raise AdapterValidationError("config", "must be a JSON object")
    # Refused, not ignored (as in PEFT import): a field this version does not know may
    # change what the adapter means.
    unknown = set(data) - known
    if unknown:
        raise AdapterValidationError("config", f"unknown fields {sorted(map(str, unknown))[:8]}")
    try:
        config = build(tuple(ModuleSpec(n, i, o) for n, i, o in data["modules"]))
    except KeyError as exc:
        raise AdapterValidationError("config", f"missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, AdapterValidationError):
            raise
        raise AdapterValidationError("config.modules", "must be a list of [name, in, out]") from None
    claimed = data.get("base_fingerprint")
    if claimed is not None and claimed != module_fingerprint(config.modules):
        raise AdapterValidationError("config.base_fingerprint", "does not match the listed modules")
    return config


def canonical_modules(modules: tuple[ModuleSpec, ...]) -> tuple[ModuleSpec, ...]:
    """`modules` checked (at least one, bounded, named, positive integer shapes, unique
    names) and in canonical (natural-sorted) order."""
    if not modules:
        raise AdapterValidationError("modules", "an adapter must target at least one module")
    if len(modules) > MAX_MODULES:
        raise AdapterValidationError("modules", f"{len(modules)} modules exceed the limit {MAX_MODULES}")
    for m in modules:
        if not isinstance(m.name, str) or not m.name or len(m.name) > 512:
            raise AdapterValidationError("modules", f"bad module name {str(m.name)[:80]!r}")
        for dim_name, dim in (("in_features", m.in_features), ("out_features", m.out_features)):
            # Exactly int: a float (64.5, or 64.0 that means the same) or a string is a
            # config written by something else than us, refused rather than coerced.
            if not is_int(dim) or dim <= 0:
                raise AdapterValidationError("modules", f"{m.name}.{dim_name} must be a positive integer")
    ordered = tuple(sorted(modules, key=lambda m: natural_key(m.name)))
    if len({m.name for m in ordered}) != len(ordered):
        raise AdapterValidationError("modules", "module names must be unique")
    return ordered


def check_modules_compatible(modules: tuple[ModuleSpec, ...], base_modules: Mapping[str, tuple[int, int]]) -> None:
    """Raise unless every targeted module exists in the base model with the same
    (in_features, out_features)."""
    for m in modules:
        shape = base_modules.get(m.name)
        if shape is None:
            raise IncompatibleBaseModelError("modules", f"base model has no linear layer {m.name!r}")
        if shape != (m.in_features, m.out_features):
            raise IncompatibleBaseModelError(
                "modules",
                f"{m.name} is {shape[0]}->{shape[1]} in the base model, "
                f"{m.in_features}->{m.out_features} in the adapter",
            )


def check_sizes(*, r: object, vector_length: object, num_vectors: object, topk: object, prefix: str = "") -> None:
    """The bounds on an adapter's sizes, wherever they come from (our config, a PEFT config:
    `prefix` names the file). Checked before any tensor work: `topk` past `num_vectors` would
    make `torch.topk` raise on full logits."""
    for name, value, high in (
        ("r", r, MAX_RANK),
        ("vector_length", vector_length, MAX_VECTOR_LENGTH),
        ("num_vectors", num_vectors, MAX_NUM_VECTORS),
        ("topk", topk, MAX_TOPK),
    ):
        if not is_int(value) or not 1 <= value <= high:
            raise AdapterValidationError(f"{prefix}{name}", f"must be an integer in [1, {high}], got {value!r:.40}")
    if topk > num_vectors:
        raise AdapterValidationError(f"{prefix}topk", f"{topk} exceeds num_vectors {num_vectors}")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CONFIG_FIELDS = {"r", "vector_length", "num_vectors", "topk", "base_model", "base_fingerprint", "modules"}


def module_fingerprint(modules: tuple[ModuleSpec, ...] | list[ModuleSpec]) -> str:
    canon = sorted(([m.name, m.in_features, m.out_features] for m in modules), key=lambda x: natural_key(x[0]))
    return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()[:32]
