"""From stored adapters to LoRA matrices: batched composition and the per-module views.

Pure functions; shapes in docstrings. `n` counts adapters, `S` sub-vectors (see
`vbserve_store.config` for the canonical sub-vector layout).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from vbserve_store import AdapterConfig, VBLoRAAdapter

from .ops import compose_into_slots_, compose_subvectors


def split_lora_matrices(
    config: AdapterConfig, subvectors: torch.Tensor, *, b_rank_major: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """View composed sub-vectors as each module's LoRA matrices.

    subvectors: (n, S, b)
    returns:    {module name: (A (n, r, in), B (n, out, r))}

    A's sub-vectors are laid out (r, in/b) so A is a plain reshape; B's are (out/b, r), so
    B = reshape(out/b, r, b).transpose -> (out/b, b, r) -> (out, r), as PEFT builds it: a
    copy. With `b_rank_major`, B's sub-vectors come in (r, out/b) order (see
    `rank_major_order`), B^T (r, out) is a plain reshape and B is returned as its
    transposed view, with no copy.
    """
    n, r, b = subvectors.shape[0], config.r, config.vector_length
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for sl in config.layout:
        m = sl.module
        a = subvectors[:, sl.a_start : sl.b_start].reshape(n, r, m.in_features)
        if b_rank_major:
            bmat = subvectors[:, sl.b_start : sl.end].reshape(n, r, m.out_features).transpose(1, 2)
        else:
            bmat = subvectors[:, sl.b_start : sl.end].reshape(n, m.out_features // b, r, b)
            bmat = bmat.transpose(2, 3).reshape(n, m.out_features, r)
        out[m.name] = (a, bmat)
    return out


@lru_cache(maxsize=64)
def rank_major_order(config: AdapterConfig) -> torch.Tensor:
    """Permutation of the S stored sub-vectors that lists each module's B sub-vectors in
    (r, out/b) order instead of the stored (out/b, r); A's stay as they are.

    Permuting the (S, k) indices and weights costs k integers and k floats per sub-vector;
    the transpose it saves would copy b floats per sub-vector of every composed B."""
    order = torch.arange(config.num_subvectors)
    for sl in config.layout:
        tiles = sl.module.out_features // config.vector_length
        order[sl.b_start : sl.end] = sl.b_start + torch.arange(tiles * config.r).view(tiles, config.r).T.reshape(-1)
    return order


def compose_adapters(
    adapters: list[VBLoRAAdapter], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Compose n adapters of one config in one kernel call.

    returns: {module name: (A (n, r, in), B (n, out, r))} in `dtype` on `device`; B is a
    transposed view of a contiguous B^T (the layout the serving layers keep).
    Composition runs in float32 at least, whatever the stored dtype, then casts.
    """
    config = adapters[0].config
    bank, indices, weights = _stacked_rank_major(adapters, device, torch.promote_types(dtype, torch.float32))
    mats = split_lora_matrices(config, compose_subvectors(bank, indices, weights), b_rank_major=True)
    return {name: (a.to(dtype), b.to(dtype)) for name, (a, b) in mats.items()}


def compose_into_slots(
    adapters: list[VBLoRAAdapter], tables: dict[str, tuple[torch.Tensor, torch.Tensor]], slots: torch.Tensor
) -> None:
    """Compose n adapters of one config straight into slot tables, in one kernel call per
    table (the Triton variant writes the tables' dtype directly; no composed copy is kept).

    tables: {module name: (A table (slots, r_max, in), B^T table (slots, r_max, out))}, as
            `MultiAdapterLinear.lora_a` / `lora_b`; every module of the config must have one
    slots:  (n,) long, the slot of each adapter, all distinct (their writes run in parallel)
    Rows r..r_max of those slots, and modules an adapter does not target, are left as they
    are: clear the slots first (`MultiAdapterLinear.clear_slot`).
    """
    config = adapters[0].config
    device = next(iter(tables.values()))[0].device
    bank, indices, weights = _stacked_rank_major(adapters, device, torch.float32)
    parts = []
    for sl in config.layout:
        a_table, b_t_table = tables[sl.module.name]
        parts += [(sl.a_start, sl.b_start, a_table), (sl.b_start, sl.end, b_t_table)]
    compose_into_slots_(bank, indices, weights, slots.to(device), parts)


def _stacked_rank_major(
    adapters: list[VBLoRAAdapter], device: torch.device | str, work: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bank, indices, weights) of n adapters of one config, on `device`, the sub-vectors in
    `rank_major_order` (so each module's B^T is a plain reshape), floats in `work`."""
    config = adapters[0].config
    if any(a.config.composition_key != config.composition_key for a in adapters):
        raise ValueError("composition needs adapters of one config; group them by composition_key")
    order = rank_major_order(config)
    bank = torch.stack([a.bank for a in adapters]).to(device=device, dtype=work)
    indices = torch.stack([a.indices for a in adapters])[:, order].to(device)
    weights = torch.stack([a.weights for a in adapters])[:, order].to(device=device, dtype=work)
    return bank, indices, weights
