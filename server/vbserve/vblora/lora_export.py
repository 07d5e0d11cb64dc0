"""Export a VB-LoRA adapter as a plain LoRA adapter (A/B materialized), for users who move
an adapter to vLLM, LoRAX or PEFT's LoRA."""

from __future__ import annotations

import torch

from vbserve_store import LoRAAdapter, LoRAConfig, VBLoRAAdapter
from vbserve_store.peft_io import export_peft_lora

from .compose import compose_adapters


def to_lora(adapter: VBLoRAAdapter) -> LoRAAdapter:
    """The equivalent LoRA adapter (float32). VB-LoRA adds `B (A x)` unscaled; LoRA scales
    by `lora_alpha / r`, so alpha = r."""
    cfg = adapter.config
    mats = compose_adapters([adapter])
    config = LoRAConfig(cfg.modules, r=cfg.r, lora_alpha=cfg.r, base_model=cfg.base_model)
    return LoRAAdapter(config, {n: a[0] for n, (a, _) in mats.items()}, {n: b[0] for n, (_, b) in mats.items()})


def export_lora(adapter: VBLoRAAdapter) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json dict, tensors) of the equivalent PEFT LoRA checkpoint."""
    return export_peft_lora(to_lora(adapter))
