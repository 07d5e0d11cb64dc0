"""Plain LoRA adapters: what they are and their stored blob (PEFT LoRA checkpoints: `peft_io`).

A LoRA adapter holds each targeted module's `A (r, in)` and `B (out, r)` and adds
`scaling * B A x`, with PEFT's scaling: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with
`use_rslora`. It has no bank: the store keeps it as one blob (bank id "").

Blob: safetensors (never pickle), tensors `<module>.lora_A` and `<module>.lora_B`, metadata
`format` `vbserve-lora`, `format_version` and `config` (packed as the VB-LoRA blob's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .adapter import FLOAT_DTYPES
from .codec import _load, _pack_config, _unpack_config, save_safetensors
from .config import (
    MAX_RANK,
    AdapterConfig,
    ModuleSpec,
    build_config,
    canonical_modules,
    check_modules_compatible,
    is_int,
    module_fingerprint,
)
from .errors import AdapterFormatError, AdapterValidationError
from .untrusted_json import load_untrusted_json

LORA_FORMAT = "vbserve-lora"
LORA_FORMAT_VERSION = "1"
KIND = "lora"  # `config["kind"]` of a LoRA adapter's record; VB-LoRA configs carry no kind
# PEFT does not bound lora_alpha; 2^16 is far past any published recipe (16 to 2r) and
# keeps alpha/r times float16 matrices finite.
MAX_LORA_ALPHA = 65536.0


@dataclass(frozen=True)
class LoRAConfig:
    """Shape of a LoRA adapter. `modules` is kept in canonical (natural-sorted) order."""

    modules: tuple[ModuleSpec, ...]
    r: int
    lora_alpha: float
    use_rslora: bool = False
    base_model: str = ""

    def __post_init__(self) -> None:
        check_lora_sizes(self.r, self.lora_alpha, self.use_rslora)
        object.__setattr__(self, "modules", canonical_modules(self.modules))
        object.__setattr__(self, "lora_alpha", float(self.lora_alpha))

    @property
    def scaling(self) -> float:
        """PEFT's `LoraLayer.scaling`: what B A x is multiplied by."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def base_fingerprint(self) -> str:
        return module_fingerprint(self.modules)

    def check_compatible(self, base_modules: Mapping[str, tuple[int, int]]) -> None:
        check_modules_compatible(self.modules, base_modules)

    def to_json(self) -> dict:
        return {
            "kind": KIND,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "modules": [[m.name, m.in_features, m.out_features] for m in self.modules],
        }

    @classmethod
    def from_json(cls, data: object) -> LoRAConfig:
        if isinstance(data, dict) and data.get("kind") != KIND:
            raise AdapterValidationError("config", f'must say "kind": "{KIND}"')
        return build_config(
            data,
            _CONFIG_FIELDS,
            lambda modules: cls(
                modules=modules,
                r=data["r"],
                lora_alpha=data["lora_alpha"],
                use_rslora=data.get("use_rslora", False),
                base_model=str(data.get("base_model", "")),
            ),
        )


_CONFIG_FIELDS = {"kind", "r", "lora_alpha", "use_rslora", "base_model", "base_fingerprint", "modules"}


def config_from_json(data: object) -> AdapterConfig | LoRAConfig:
    """A stored record's config, of either kind (a LoRA config says `"kind": "lora"`)."""
    if isinstance(data, dict) and data.get("kind") == KIND:
        return LoRAConfig.from_json(data)
    return AdapterConfig.from_json(data)


def check_lora_sizes(r: object, lora_alpha: object, use_rslora: object, prefix: str = "") -> None:
    if not is_int(r) or not 1 <= r <= MAX_RANK:
        raise AdapterValidationError(f"{prefix}r", f"must be an integer in [1, {MAX_RANK}], got {r!r:.40}")
    alpha_ok = isinstance(lora_alpha, int | float) and not isinstance(lora_alpha, bool)
    if not alpha_ok or not math.isfinite(lora_alpha) or not 0 < lora_alpha <= MAX_LORA_ALPHA:
        raise AdapterValidationError(f"{prefix}lora_alpha", f"must be a number in (0, {MAX_LORA_ALPHA:g}]")
    if not isinstance(use_rslora, bool):
        raise AdapterValidationError(f"{prefix}use_rslora", "must be true or false")


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """An immutable LoRA adapter: `a[module] (r, in)`, `b[module] (out, r)`, float, finite."""

    config: LoRAConfig
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    bank_id: str = field(init=False, default="")  # no bank

    def __post_init__(self) -> None:
        names = {m.name for m in self.config.modules}
        for label, tensors in (("lora_A", self.a), ("lora_B", self.b)):
            if set(tensors) != names:
                extra, missing = sorted(set(tensors) - names), sorted(names - set(tensors))
                raise AdapterValidationError(
                    label, f"modules differ from the config: extra {extra[:4]}, missing {missing[:4]}"
                )
        r = self.config.r
        for m in self.config.modules:
            for label, t, shape in (
                ("lora_A", self.a[m.name], (r, m.in_features)),
                ("lora_B", self.b[m.name], (m.out_features, r)),
            ):
                where = f"{m.name}.{label}"
                if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
                    raise AdapterValidationError(where, "must be a float32, float16 or bfloat16 tensor")
                if tuple(t.shape) != shape:
                    raise AdapterValidationError(where, f"shape {tuple(t.shape)} != expected {shape}")
                if not torch.isfinite(t).all():
                    raise AdapterValidationError(where, "contains NaN or Inf")
        object.__setattr__(self, "a", {n: t.detach().cpu().contiguous() for n, t in self.a.items()})
        object.__setattr__(self, "b", {n: t.detach().cpu().contiguous() for n, t in self.b.items()})

    def matrices(self, dtype: torch.dtype = torch.float32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`{module: (A, B)}` in `dtype`, unscaled (PEFT's `lora_A`/`lora_B` weights)."""
        return {m.name: (self.a[m.name].to(dtype), self.b[m.name].to(dtype)) for m in self.config.modules}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


# -- our blob -------------------------------------------------------------------------------


def encode_lora(adapter: LoRAAdapter) -> bytes:
    tensors = {f"{n}.lora_A": t for n, t in adapter.a.items()} | {f"{n}.lora_B": t for n, t in adapter.b.items()}
    metadata = {"format": LORA_FORMAT, "format_version": LORA_FORMAT_VERSION, "config": _pack_config(adapter.config)}
    return save_safetensors(tensors, metadata)


def decode_lora(blob: bytes, *, max_bytes: int) -> LoRAAdapter:
    metadata, tensors = _load(blob, max_bytes, LORA_FORMAT)
    if metadata.get("format_version") != LORA_FORMAT_VERSION:
        raise AdapterFormatError("format_version", f"unsupported {metadata.get('format_version')!r}")
    config = LoRAConfig.from_json(load_untrusted_json(_unpack_config(metadata.get("config", "")), "config"))
    a, b = {}, {}
    for key, t in tensors.items():
        name, _, part = key.rpartition(".")
        if part not in ("lora_A", "lora_B") or not name:
            raise AdapterFormatError("tensors", f"unexpected tensor {key[:120]!r}")
        (a if part == "lora_A" else b)[name] = t
    return LoRAAdapter(config, a, b)
