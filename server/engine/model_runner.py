"""Runs the base model's forward over a range of KV rows, every row with its own adapter.

The target linear layers of the Hugging Face model are wrapped once by
`MultiAdapterLinear`, and before each forward we set which adapter slot every row uses.
The forward itself is the engine's own (`llama.py`) for the models it covers, and the
Hugging Face decoder's otherwise (or with `VBSERVE_FAST_PATH=false`).
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from server.vblora.layer import AdapterRouting, MultiAdapterLinear, wrap_linear_layers

from .kv_cache import SlotKVCache
from .llama import LlamaForward, unsupported

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_rows: int,
        max_len: int,
        num_adapter_slots: int,
        max_rank: int,
        fast_path: bool = True,
    ) -> None:
        """max_len: tokens per row of the KV cache, the model's context already applied
        (`BaseModelSpec.max_len`); max_rank: the widest adapter a slot holds."""
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
        self.max_len = max_len
        self.max_rows = max_rows
        self.cache = SlotKVCache(
            cfg.num_hidden_layers, max_rows, kv_heads, self.max_len, head_dim, dtype=self.dtype, device=self.device
        )
        reason = unsupported(model) if fast_path else "turned off (VBSERVE_FAST_PATH=false)"
        self.fast = LlamaForward(model) if reason is None else None
        log.info("forward: %s", "the engine's Llama forward" if reason is None else f"Hugging Face's ({reason})")
        # The decode step's inputs live at fixed addresses (see `decode`).
        self._decode_ids = torch.zeros(max_rows, 1, dtype=torch.long, device=self.device)
        self._decode_positions = torch.zeros(max_rows, 1, dtype=torch.long, device=self.device)
        self._decode_last = torch.zeros(max_rows, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The decode step: one new token for each of rows 0..N-1 (N, 1), at `positions`
        (N, 1), with adapter `slots` (N,). Its inputs are copied into buffers preallocated
        for `max_rows` and the adapter routing into `AdapterRouting`'s, so every step reads
        the same addresses: what capturing the step (a CUDA graph per batch-size bucket)
        needs. Not done here: padding N up to a bucket, and attending over a fixed length
        rather than the longest row's."""
        n = input_ids.shape[0]
        kv_len = int(positions.max()) + 1  # from the CPU positions: no device sync
        ids = self._decode_ids[:n].copy_(input_ids)
        pos = self._decode_positions[:n].copy_(positions)
        return self.forward(0, ids, pos, self._decode_last[:n], slots, kv_len)

    @torch.inference_mode()
    def forward(
        self,
        first_row: int,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        last_index: torch.Tensor,
        slots: torch.Tensor,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Logits at each row's last real token.

        input_ids, positions: (N, L) long (right-padded rows: padding continues the positions)
        last_index: (N,) index in L of each row's last real token
        slots:      (N,) long on the CPU, adapter slot per row, -1 = base model only
        kv_len:     1 + the largest position, when the caller knows it (else read from positions,
                    which the batcher builds on the CPU: no device sync)
        returns:    (N, V) float32
        """
        n = input_ids.shape[0]
        dev = self.device
        kv_len = int(positions.max()) + 1 if kv_len is None else kv_len
        input_ids, positions, last_index = input_ids.to(dev), positions.to(dev), last_index.to(dev)
        self.cache.begin(first_row, positions, kv_len)
        self.routing.slots = slots
        try:
            if self.fast is not None:
                return self.fast(self.cache, input_ids, positions, last_index)
            # Causal over each row's own history: a query at position p sees keys 0..p.
            mask = torch.arange(kv_len, device=dev).view(1, 1, 1, kv_len) <= positions.view(n, 1, -1, 1)
            hidden = self.model.get_decoder()(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            ).last_hidden_state
            last = hidden[torch.arange(n, device=dev), last_index]
            return self.model.get_output_embeddings()(last).float()
        finally:
            self.routing.slots = None
