"""Export a VB-LoRA adapter as a plain LoRA checkpoint (A/B materialized, `peft_type`
LORA), for users who move an adapter to vLLM, LoRAX or PEFT's LoRA."""

from __future__ import annotations

import torch

from adapter_store import VBLoRAAdapter

from .compose import compose_adapters


def export_lora(adapter: VBLoRAAdapter) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json dict, tensors) of the equivalent LoRA.

    VB-LoRA adds `B (A x)` unscaled; LoRA scales by `lora_alpha / r`, so alpha = r.
    """
    cfg = adapter.config
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in compose_adapters([adapter]).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a[0].contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b[0].contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.base_model or None,
        "target_modules": [m.name for m in cfg.modules],
        "r": cfg.r,
        "lora_alpha": cfg.r,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    return config, tensors
