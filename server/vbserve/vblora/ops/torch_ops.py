"""Device-agnostic torch implementations of the VB-LoRA kernels (CPU and CUDA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def compose_subvectors(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Every sub-vector of every adapter in one fused gather + weighted sum.

    bank:    (n, h, b)  one vector bank per adapter
    indices: (n, S, k)  integer, rows of that adapter's bank
    weights: (n, S, k)  top-k mixing weights
    returns: (n, S, b)  sub-vector s of adapter a = sum_j weights[a,s,j] * bank[a, indices[a,s,j]]

    `embedding_bag(mode="sum")` with per-sample weights is exactly that weighted gather and
    never materializes the (n, S, k, b) intermediate; offsetting each adapter's indices by
    a*h lets one call serve all adapters. Gradients flow into `bank` and `weights`.
    """
    n, h, b = bank.shape
    _, s, k = indices.shape
    offsets = (torch.arange(n, device=indices.device) * h).view(n, 1, 1)
    flat_idx = (indices.long() + offsets).view(n * s, k)
    flat_w = weights.to(bank.dtype).reshape(n * s, k)
    out = F.embedding_bag(flat_idx, bank.reshape(n * h, b), per_sample_weights=flat_w, mode="sum")
    return out.view(n, s, b)


def compose_into_slots_(
    bank: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
    parts: Sequence[tuple[int, int, torch.Tensor]],
) -> None:
    """Compose n adapters straight into slot tables, in the tables' dtype.

    bank, indices, weights: as `compose_subvectors` (composition in bank's dtype)
    slots: (n,) long, the slot of each adapter, all distinct (writes to one slot would race)
    parts: (start, stop, table): sub-vectors [start, stop) of adapter i, laid end to end,
           fill the first rows of `table[slots[i]]`, a (num_slots, rows, cols) table. A
           module's A (r, in) and, in `rank_major_order`, its B^T (r, out) are such parts.
    Rows past the part's are left as they are (a slot is cleared before it is written).
    """
    composed = compose_subvectors(bank, indices, weights)
    n, b = composed.shape[0], composed.shape[2]
    for start, stop, table in parts:
        cols = table.shape[2]
        rows = (stop - start) * b // cols
        table[slots.to(table.device), :rows] = composed[:, start:stop].reshape(n, rows, cols).to(table.dtype)


def route_rows(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-forward preparation shared by every layer: slots (N,) with -1 = base only ->
    (gather index (N,), base-row mask (N, 1, 1), True where a row has no adapter, or None
    when every row has one)."""
    base_only = slots < 0
    return slots.clamp(min=0), base_only.view(-1, 1, 1) if bool(base_only.any()) else None


def add_multi_adapter_lora_(
    base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b_t: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """`base_out += B_a (A_a x)` row by row, each row with its own adapter, in fixed ops.

    base_out: (N, L, out)   the base layer's output, updated in place and returned
    x:        (N, L, in)    its input (a per-token batch is N = T, L = 1)
    lora_a:   (n, r, in)    A of every adapter slot
    lora_b_t: (n, r, out)   B transposed, of every adapter slot
    slots:    (N,)          long, the slot of each row; -1 = base only (adds nothing)
    returns:  base_out
    """
    return add_routed_lora_(base_out, x, lora_a, lora_b_t, *route_rows(slots))


def add_routed_lora_(
    base_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b_t: torch.Tensor,
    index: torch.Tensor,
    row_mask: torch.Tensor | None,
) -> torch.Tensor:
    """`add_multi_adapter_lora_` with the routing from `route_rows` computed once per forward
    (`row_mask`: True for base-only rows).

    B is kept transposed so the gathered (N, r, out) block is contiguous for `baddbmm`, and
    rows are gathered with `index_select`: on CPU both are several times faster than
    advanced indexing into (n, out, r). In place because the base output is a fresh tensor
    nobody else holds: an out-of-place `baddbmm` would copy it. `base_out` may be a strided
    slice (one projection's part of a fused qkv or gate/up output): `baddbmm_` into one
    runs a matmul per row (28 us at 32 rows, r=4, out=576 on the CPU), so the delta is
    computed contiguous and added (7 us). So is a bfloat16/float16 delta on the CPU, in
    float32: the CPU has no fast half-precision `bmm` (97 vs 44 us per decode call, 32 rows,
    r=4, 576 wide, one thread, the float32 casts included).
    """
    a, b_t = lora_a.index_select(0, index), lora_b_t.index_select(0, index)
    half_on_cpu = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
    if half_on_cpu:
        x, a, b_t = x.float(), a.float(), b_t.float()
    xa = torch.bmm(x, a.transpose(1, 2))  # (N, L, r)
    if row_mask is not None:
        # Base-only rows went through slot 0's A: set, not multiplied, to 0, since A x of
        # whatever adapter sits there may be inf (a tenant's bank of 3e38 is finite), and
        # inf * 0 is NaN in another tenant's row.
        xa.masked_fill_(row_mask, 0)
    if base_out.is_contiguous() and not half_on_cpu:
        return base_out.baddbmm_(xa, b_t)
    return base_out.add_(torch.bmm(xa, b_t))
