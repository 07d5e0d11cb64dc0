"""Triton variants of the VB-LoRA kernels: same signatures and results as `torch_ops`.

They run on CUDA tensors, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`
set before this module is imported: `@triton.jit` decides at decoration time), which is how
CI checks them against the torch variants without a GPU.

- `compose_subvectors` / `compose_into_slots_`: one launch composes a part of the sub-vectors
  of every adapter of a batch (a program per adapter and block of sub-vectors: k gathers of
  bank rows, weighted, summed in float32) and stores them straight in the destination's
  dtype, in the slot of each adapter, as rows of a (slots, rows, cols) table: the slot tables'
  A (r, in) and B^T (r, out) layouts are such tables, so no composed copy is kept.
- `add_routed_lora_`: the multi-adapter LoRA apply as two launches, shrink (`xa = x A^T`,
  r columns) then expand (`out += xa B^T`), every program reading the slot of its own row,
  as Punica's BGMV/SGMV and vLLM's `lora_shrink`/`lora_expand` do. A row of the batch is one
  sequence: for decode a single token (L = 1), for a prefill chunk a segment of L tokens that
  share the row's slot (SGMV's segments). Base-only rows are skipped by their programs, so
  no masking arithmetic can turn another tenant's inf into a NaN.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

# Decided once, like the decorators below: interpreted kernels take CPU tensors. The
# interpreter's tl.dot is numpy's matmul, which has no bfloat16 (it multiplies the raw bits):
# there the dots take float32 copies, the same numbers, since a product of two bfloat16 is
# exact in float32 and the GPU's dot accumulates in float32 too.
INTERPRETED = bool(triton.knobs.runtime.interpret)
# The interpreter keeps the running program's grid position in a module global, so two
# threads launching at once (the engine's forward and the adapter loader's compose) corrupt
# each other's launches; compiled launches need no lock.
_launch_lock = threading.Lock() if INTERPRETED else contextlib.nullcontext()

# tl.dot needs every dimension >= 16. Decode rows are padded to 16 tokens by masked loads
# (free: no memory is read for them), and ranks 1..16 share one compiled kernel.
_MIN_DOT = 16
_BLOCK_K = 128  # shrink: input features per step of the reduction
_BLOCK_N = 128  # expand: output features per program
_BLOCK_S = 32  # compose: sub-vectors per program


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not (t.is_cuda or INTERPRETED):
            raise RuntimeError(
                "the Triton kernels take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set "
                "before they were imported; use the torch kernels (VBSERVE_KERNELS=torch) on this device"
            )


# -- composition -------------------------------------------------------------------------


@triton.jit
def _compose_kernel(
    bank_ptr,  # (n, h, b), last dim contiguous
    idx_ptr,  # (n, S, k), last dim contiguous, any integer dtype
    w_ptr,  # (n, S, k), last dim contiguous
    dst_ptr,  # (slots, rows, cols), last dim contiguous
    slot_ptr,  # (n,) destination slot of each adapter
    s_start,  # first sub-vector of this part
    s_count,  # sub-vectors in this part
    tiles_per_row,  # cols // b: a destination row is this many consecutive sub-vectors
    h,
    b,
    stride_bank_n,
    stride_bank_h,
    stride_idx_n,
    stride_idx_s,
    stride_w_n,
    stride_w_s,
    stride_dst_slot,
    stride_dst_row,
    K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    adapter = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_b = tl.arange(0, BLOCK_B)
    in_part = offs_s < s_count
    acc = tl.zeros((BLOCK_S, BLOCK_B), dtype=tl.float32)
    for j in tl.static_range(K):
        at = (s_start + offs_s) * stride_idx_s + j
        idx = tl.load(idx_ptr + adapter * stride_idx_n + at, mask=in_part, other=0).to(tl.int64)
        w = tl.load(w_ptr + adapter * stride_w_n + (s_start + offs_s) * stride_w_s + j, mask=in_part, other=0.0)
        # Indices were checked against h when the adapter was built; `idx < h` still keeps
        # a bad one from reading another adapter's bank.
        row_ok = in_part & (idx < h)
        rows = tl.load(
            bank_ptr + adapter * stride_bank_n + idx[:, None] * stride_bank_h + offs_b[None, :],
            mask=row_ok[:, None] & (offs_b[None, :] < b),
            other=0.0,
        )
        acc += w.to(tl.float32)[:, None] * rows.to(tl.float32)
    slot = tl.load(slot_ptr + adapter).to(tl.int64)
    row = offs_s // tiles_per_row
    col = (offs_s % tiles_per_row) * b
    dst = dst_ptr + slot * stride_dst_slot + row[:, None] * stride_dst_row + col[:, None] + offs_b[None, :]
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=in_part[:, None] & (offs_b[None, :] < b))


def _compose_part(
    bank: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
    start: int,
    stop: int,
    table: torch.Tensor,
) -> None:
    n, h, b = bank.shape
    cols = table.shape[2]
    grid = (n, triton.cdiv(stop - start, _BLOCK_S))
    with _launch_lock:
        _compose_kernel[grid](
            bank, indices, weights, table, slots,
            start, stop - start, cols // b, h, b,
            bank.stride(0), bank.stride(1), indices.stride(0), indices.stride(1),
            weights.stride(0), weights.stride(1), table.stride(0), table.stride(1),
            K=indices.shape[2], BLOCK_S=_BLOCK_S, BLOCK_B=triton.next_power_of_2(b),
        )  # fmt: skip


def compose_subvectors(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`torch_ops.compose_subvectors` for inference (no gradients): (n, S, b) in bank's dtype."""
    _check_device(bank, indices, weights)
    n, s, _ = indices.shape
    bank, indices, weights = bank.contiguous(), indices.contiguous(), weights.contiguous()
    out = bank.new_empty(n, s, bank.shape[2])
    # Each adapter is its own "slot" and each sub-vector a row of one tile.
    _compose_part(bank, indices, weights, torch.arange(n, device=bank.device), 0, s, out)
    return out


def compose_into_slots_(
    bank: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    slots: torch.Tensor,
    parts: Sequence[tuple[int, int, torch.Tensor]],
) -> None:
    """`torch_ops.compose_into_slots_`: one launch per part, every adapter in it."""
    _check_device(bank, indices, weights, *(t for _, _, t in parts))
    bank, indices, weights = bank.contiguous(), indices.contiguous(), weights.contiguous()
    slots = slots.to(bank.device)
    for start, stop, table in parts:
        if table.stride(2) != 1:
            raise ValueError("slot tables must be contiguous in their last dimension")
        _compose_part(bank, indices, weights, slots, start, stop, table)


# -- multi-adapter LoRA apply ------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # (N, L, in)
    a_ptr,  # (slots, r, in): A of every slot
    index_ptr,  # (N,) slot of each row
    skip_ptr,  # (N,) bool, True = base-only row (read only when HAS_SKIP)
    xa_ptr,  # (N, L, r) out, contiguous
    L,
    R,
    stride_x_n,
    stride_x_l,
    stride_x_k,
    stride_a_slot,
    stride_a_r,
    stride_a_k,
    K: tl.constexpr,  # input features: a model has a few sizes, so a few compilations
    HAS_SKIP: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_SKIP:  # noqa: SIM102 - a compile-time branch: without a mask there is nothing to load
        if tl.load(skip_ptr + row):
            return
    slot = tl.load(index_ptr + row).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(
            x_ptr + row * stride_x_n + offs_l[:, None] * stride_x_l + kk[None, :] * stride_x_k,
            mask=(offs_l[:, None] < L) & (kk[None, :] < K),
            other=0.0,
        )
        a_t = tl.load(  # (BLOCK_K, BLOCK_R): A^T of the row's slot
            a_ptr + slot * stride_a_slot + offs_r[None, :] * stride_a_r + kk[:, None] * stride_a_k,
            mask=(offs_r[None, :] < R) & (kk[:, None] < K),
            other=0.0,
        )
        if UPCAST:
            x, a_t = x.to(tl.float32), a_t.to(tl.float32)
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
    xa = xa_ptr + row * L * R + offs_l[:, None] * R + offs_r[None, :]
    # Stored in the model's dtype, as torch's bmm rounds it, so both variants expand the same xa.
    tl.store(xa, acc.to(xa_ptr.dtype.element_ty), mask=(offs_l[:, None] < L) & (offs_r[None, :] < R))


@triton.jit
def _lora_expand_kernel(
    xa_ptr,  # (N, L, r), contiguous
    bt_ptr,  # (slots, r, out): B^T of every slot
    index_ptr,
    skip_ptr,
    out_ptr,  # (N, L, out): the base output, added into
    L,
    N_OUT,
    R,
    stride_bt_slot,
    stride_bt_r,
    stride_bt_n,
    stride_out_n,
    stride_out_l,
    stride_out_o,
    HAS_SKIP: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_SKIP:  # noqa: SIM102 - a compile-time branch: without a mask there is nothing to load
        if tl.load(skip_ptr + row):
            return
    slot = tl.load(index_ptr + row).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_o = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    xa = tl.load(
        xa_ptr + row * L * R + offs_l[:, None] * R + offs_r[None, :],
        mask=(offs_l[:, None] < L) & (offs_r[None, :] < R),
        other=0.0,
    )
    bt = tl.load(
        bt_ptr + slot * stride_bt_slot + offs_r[:, None] * stride_bt_r + offs_o[None, :] * stride_bt_n,
        mask=(offs_r[:, None] < R) & (offs_o[None, :] < N_OUT),
        other=0.0,
    )
    if UPCAST:
        xa, bt = xa.to(tl.float32), bt.to(tl.float32)
    delta = tl.dot(xa, bt, input_precision=PRECISION)
    out = out_ptr + row * stride_out_n + offs_l[:, None] * stride_out_l + offs_o[None, :] * stride_out_o
    keep = (offs_l[:, None] < L) & (offs_o[None, :] < N_OUT)
    base = tl.load(out, mask=keep, other=0.0)
    tl.store(out, (base.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=keep)


def add_routed_lora_(
    base_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b_t: torch.Tensor,
    index: torch.Tensor,
    row_mask: torch.Tensor | None,
) -> torch.Tensor:
    """`torch_ops.add_routed_lora_`: the same routing (`route_rows`' index and base-row
    mask), the tables as strided views (the layer passes `table[:, :r]`)."""
    _check_device(base_out, x, lora_a, lora_b_t)
    n, length, k = x.shape
    r, n_out = lora_a.shape[1], base_out.shape[2]
    # fp32 products in IEEE precision, as torch computes them by default (TF32 would not
    # agree "to float rounding"); half types ignore the setting.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    block_l = _MIN_DOT if length <= _MIN_DOT else 64
    block_r = max(_MIN_DOT, triton.next_power_of_2(r))
    skip = index if row_mask is None else row_mask.view(-1)  # any pointer when HAS_SKIP is off
    xa = x.new_empty(n, length, r)
    l_blocks = triton.cdiv(length, block_l)
    with _launch_lock:
        _lora_shrink_kernel[(n, l_blocks)](
            x, lora_a, index, skip, xa,
            length, r,
            x.stride(0), x.stride(1), x.stride(2),
            lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
            K=k, HAS_SKIP=row_mask is not None, PRECISION=precision, UPCAST=INTERPRETED,
            BLOCK_L=block_l, BLOCK_R=block_r, BLOCK_K=_BLOCK_K,
        )  # fmt: skip
        _lora_expand_kernel[(n, l_blocks, triton.cdiv(n_out, _BLOCK_N))](
            xa, lora_b_t, index, skip, base_out,
            length, n_out, r,
            lora_b_t.stride(0), lora_b_t.stride(1), lora_b_t.stride(2),
            base_out.stride(0), base_out.stride(1), base_out.stride(2),
            HAS_SKIP=row_mask is not None, PRECISION=precision, UPCAST=INTERPRETED,
            BLOCK_L=block_l, BLOCK_R=block_r, BLOCK_N=_BLOCK_N,
        )  # fmt: skip
    return base_out
