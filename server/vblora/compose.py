"""From stored adapters to LoRA matrices: batched composition and the per-module views.

Pure functions; shapes in docstrings. `n` counts adapters, `S` sub-vectors (see
`adapter_store.config` for the canonical sub-vector layout).
"""

from __future__ import annotations

import torch

from adapter_store import AdapterConfig, VBLoRAAdapter

from .ops import compose_subvectors


def split_lora_matrices(
    config: AdapterConfig, subvectors: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """View composed sub-vectors as each module's LoRA matrices.

    subvectors: (n, S, b)
    returns:    {module name: (A (n, r, in), B (n, out, r))}

    A's sub-vectors are laid out (r, in/b) so A is a plain reshape; B's are (out/b, r), so
    B = reshape(out/b, r, b).transpose -> (out/b, b, r) -> (out, r), as PEFT builds it.
    """
    n, r, b = subvectors.shape[0], config.r, config.vector_length
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for sl in config.layout:
        m = sl.module
        a = subvectors[:, sl.a_start : sl.b_start].reshape(n, r, m.in_features)
        bmat = subvectors[:, sl.b_start : sl.end].reshape(n, m.out_features // b, r, b)
        out[m.name] = (a, bmat.transpose(2, 3).reshape(n, m.out_features, r))
    return out


def compose_adapters(
    adapters: list[VBLoRAAdapter], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Compose n adapters of one config in one kernel call.

    returns: {module name: (A (n, r, in), B (n, out, r))} in `dtype` on `device`.
    Composition runs in float32 at least, whatever the stored dtype, then casts.
    """
    config = adapters[0].config
    if any(a.config.composition_key != config.composition_key for a in adapters):
        raise ValueError("compose_adapters needs adapters of one config; group them by composition_key")
    work = torch.promote_types(dtype, torch.float32)
    bank = torch.stack([a.bank for a in adapters]).to(device=device, dtype=work)
    indices = torch.stack([a.indices.long() for a in adapters]).to(device)
    weights = torch.stack([a.weights for a in adapters]).to(device=device, dtype=work)
    mats = split_lora_matrices(config, compose_subvectors(bank, indices, weights))
    return {name: (a.to(dtype), b.to(dtype)) for name, (a, b) in mats.items()}
