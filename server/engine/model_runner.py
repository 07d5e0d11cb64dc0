"""Runs the base model's forward over a range of KV rows, every row with its own adapter.

The model is the unmodified Hugging Face model; its target linear layers are wrapped once
by `MultiAdapterLinear`, and before each forward we set which adapter slot every row uses.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from server.vblora.layer import AdapterRouting, MultiAdapterLinear, wrap_linear_layers

from .kv_cache import SlotKVCache


class ModelRunner:
    def __init__(
        self, model: PreTrainedModel, *, max_rows: int, max_len: int, num_adapter_slots: int, max_rank: int
    ) -> None:
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.routing = AdapterRouting(self.device)
        self.layers: dict[str, MultiAdapterLinear] = wrap_linear_layers(
            model, self.routing, num_adapter_slots, max_rank
        )
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.max_len = min(max_len, getattr(cfg, "max_position_embeddings", max_len))
        self.max_rows = max_rows
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.cache = SlotKVCache(
            cfg.num_hidden_layers, max_rows, kv_heads, self.max_len, head_dim, dtype=self.dtype, device=self.device
        )

    @property
    def base_module_shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (m.base.in_features, m.base.out_features) for n, m in self.layers.items()}

    @torch.inference_mode()
    def forward(
        self,
        first_row: int,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        last_index: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """Logits at each row's last real token.

        input_ids, positions: (N, L) long on the CPU (right-padded rows: padding continues the positions)
        last_index: (N,) index in L of each row's last real token
        slots:      (N,) long on the CPU, adapter slot per row, -1 = base model only
        returns:    (N, V) float32
        """
        n = input_ids.shape[0]
        dev = self.device
        kv_len = int(positions.max()) + 1  # before the copy to the device: no sync
        input_ids, positions = input_ids.to(dev), positions.to(dev)
        self.cache.begin(first_row, positions, kv_len)
        # Causal over each row's own history: a query at position p sees keys 0..p.
        mask = torch.arange(kv_len, device=dev).view(1, 1, 1, kv_len) <= positions.view(n, 1, -1, 1)
        self.routing.slots = slots
        try:
            hidden = self.model.get_decoder()(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            ).last_hidden_state
            last = hidden[torch.arange(n, device=dev), last_index.to(dev)]
            return self.model.get_output_embeddings()(last).float()
        finally:
            self.routing.slots = None
