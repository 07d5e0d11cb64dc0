"""VB-LoRA kernels behind one call each, in two variants with the same signatures:

- `torch_ops`: device-agnostic torch (CPU and CUDA), and the only one with gradients;
- `triton_ops`: fused Triton kernels, for CUDA tensors (CPU tensors under Triton's
  interpreter, which is how CI tests them).

Each call picks the variant by the device of its tensors, as `use_kernels` says (the engine
sets it from `Settings.kernels`, `VBSERVE_KERNELS`): "auto" = Triton on CUDA when triton
imports, torch otherwise; "torch" or "triton" forces one. `route_rows` is the routing both
variants take: it runs once per forward, on the CPU, where the engine builds slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from types import ModuleType
from typing import Literal

import torch

from . import torch_ops
from .torch_ops import route_rows

Kernels = Literal["auto", "torch", "triton"]
_kernels: Kernels = "auto"


def use_kernels(kernels: Kernels) -> None:
    """Choose the variant for every later call in this process."""
    if kernels not in ("auto", "torch", "triton"):
        raise ValueError(f"kernels must be auto, torch or triton, got {kernels!r}")
    global _kernels
    _kernels = kernels
    if kernels == "triton" and _triton_ops() is None:
        raise RuntimeError("kernels=triton, but triton does not import here")


@cache
def _triton_ops() -> ModuleType | None:
    # Imported on first need, not with this package: the interpreter is chosen when the
    # kernels are decorated, and a CPU-only process never needs triton at all.
    try:
        from . import triton_ops
    except ImportError:
        return None
    return triton_ops


def variant(t: torch.Tensor) -> ModuleType:
    """The kernel module a call on tensors like `t` runs."""
    if _kernels == "torch" or (_kernels == "auto" and not t.is_cuda):
        return torch_ops
    return _triton_ops() or torch_ops


def compose_subvectors(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """See `torch_ops.compose_subvectors`. Training (gradients wanted) always takes torch."""
    if torch.is_grad_enabled() and (bank.requires_grad or weights.requires_grad):
        return torch_ops.compose_subvectors(bank, indices, weights)
    return variant(bank).compose_subvectors(bank, indices, weights)


def compose_into_slots_(
    bank: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
    parts: Sequence[tuple[int, int, torch.Tensor]],
) -> None:
    """See `torch_ops.compose_into_slots_`."""
    variant(bank).compose_into_slots_(bank, indices, weights, slots, parts)


def add_routed_lora_(
    base_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b_t: torch.Tensor,
    index: torch.Tensor,
    row_mask: torch.Tensor | None,
) -> torch.Tensor:
    """See `torch_ops.add_routed_lora_`."""
    return variant(x).add_routed_lora_(base_out, x, lora_a, lora_b_t, index, row_mask)


def add_multi_adapter_lora_(
    base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b_t: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """See `torch_ops.add_multi_adapter_lora_`."""
    return add_routed_lora_(base_out, x, lora_a, lora_b_t, *route_rows(slots))


__all__ = [
    "Kernels",
    "add_multi_adapter_lora_",
    "add_routed_lora_",
    "compose_into_slots_",
    "compose_subvectors",
    "route_rows",
    "use_kernels",
    "variant",
]
