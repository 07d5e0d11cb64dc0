"""VB-LoRA kernels behind one call each. The torch variants run on CPU and CUDA.

A fused Triton variant would slot in here, picked by device; see the engine README for
why the torch path is the only one today.
"""

from .torch_ops import add_multi_adapter_lora_, add_routed_lora_, compose_subvectors, route_rows

__all__ = ["add_multi_adapter_lora_", "add_routed_lora_", "compose_subvectors", "route_rows"]
