"""Runs the base model's forward over a range of KV rows, every row with its own adapter.

The target linear layers of the Hugging Face model are wrapped once by
`MultiAdapterLinear`, and before each forward we set which adapter slot every row uses.
The forward itself is the engine's own (`llama.py`) for the models it covers, and the
Hugging Face decoder's otherwise (or with `VBSERVE_FAST_PATH=false`). The decode step is
static (`decode`): on CUDA it is captured as CUDA graphs and replayed (`decode_graphs.py`).
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from vbserve.vblora.layer import AdapterRouting, MultiAdapterLinear, wrap_linear_layers

from .decode_graphs import DecodeGraphs, attention_buckets, batch_buckets, bucket
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
        cuda_graphs: bool = True,
        static_decode: bool | None = None,
    ) -> None:
        """max_len: tokens per row of the KV cache, the model's context already applied
        (`BaseModelSpec.max_len`); max_rank: the widest adapter a slot holds."""
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.routing = AdapterRouting(self.device, max_rows)
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
        # The Hugging Face forward is not captured: it builds its masks and caches per call.
        captured = cuda_graphs and self.device.type == "cuda" and self.fast is not None
        self.graphs = DecodeGraphs(self.device) if captured else None
        # A replayed graph's output must live at a fixed address too; an eager step returns
        # its logits as computed (a copy in and a copy out would only add work).
        vocab_size = model.get_output_embeddings().weight.shape[0]
        self._graph_logits = (
            torch.zeros(max_rows, vocab_size, dtype=torch.float32, device=self.device) if captured else None
        )
        # Padding and the length bucket are what a graph needs. Run eagerly they only add
        # work, and the longer attention changes bfloat16's rounding on the CPU (docs/engine.md,
        # "The decode step"), so an eager step keeps its exact shapes (N rows, the longest
        # row's length) unless asked (`static_decode`: the CPU tests, `benchmarks/gpu.py`).
        self.static_decode = captured if static_decode is None else static_decode
        self.batch_buckets = batch_buckets(max_rows) if self.static_decode else []
        self.attention_buckets = attention_buckets(self.max_len) if self.static_decode else []
        log.info("decode: %s", "CUDA graphs per bucket" if captured else "eager")

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The decode step: one new token for each of rows 0..N-1 (N, 1), at `positions`
        (N, 1), with adapter `slots` (N,), all on the CPU; returns (N, V) float32 logits.

        The step is static (`static_decode`): N is padded up to a bucket of `batch_buckets`
        (padded rows: a dummy token at the cache's scratch position, base model only, logits
        dropped), it attends over a bucket of `attention_buckets` with the mask built inside
        the step from the positions buffer, and its inputs and routing (and, captured, its
        logits) sit in buffers preallocated for `max_rows`. Every shape in it depends only on the buckets
        and the adapters' ranks in use, and nothing in it reads a value back to the host, so
        on CUDA it is captured once per such key and replayed (`DecodeGraphs`). Eager
        runners (the CPU) run the same code with no buckets: N rows, the longest row's length."""
        n = input_ids.shape[0]
        rows = bucket(self.batch_buckets, n)
        kv_len = bucket(self.attention_buckets, int(positions.max()) + 1)  # CPU positions: no sync
        self._decode_ids[:n].copy_(input_ids)
        self._decode_positions[:n].copy_(positions)
        self._decode_ids[n:rows].zero_()
        self._decode_positions[n:rows].fill_(self.cache.scratch_position)
        self.cache.note_written(0, positions)
        self.routing.route(slots, padded_rows=rows if self.static_decode else None)
        try:
            if self.graphs is None:
                return self._decode_step(rows, kv_len)[:n]
            graph_logits = self._graph_logits[:rows]
            ranks = None if self.routing.index is None else tuple(m.rank for m in self.layers.values())
            self.graphs.replay((rows, kv_len, ranks), lambda: graph_logits.copy_(self._decode_step(rows, kv_len)))
            return graph_logits[:n].clone()  # the next replay overwrites the buffer
        finally:
            self.routing.slots = None

    def _decode_step(self, rows: int, kv_len: int) -> torch.Tensor:
        """The static step (see `decode`): the logits (rows, V) of the decode buffers' first
        `rows` rows, with the routing set for them."""
        positions = self._decode_positions[:rows]
        self.cache.route(0, positions, kv_len)
        return self._logits(self._decode_ids[:rows], positions, self._decode_last[:rows], kv_len)

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

        input_ids, positions: (N, L) long on the CPU (right-padded rows: padding continues the positions)
        last_index: (N,) index in L of each row's last real token
        slots:      (N,) long on the CPU, adapter slot per row, -1 = base model only
        kv_len:     1 + the largest position, when the caller knows it (else read from positions)
        returns:    (N, V) float32
        """
        dev = self.device
        kv_len = int(positions.max()) + 1 if kv_len is None else kv_len
        self.cache.note_written(first_row, positions)
        positions = positions.to(dev)
        self.cache.route(first_row, positions, kv_len)
        self.routing.slots = slots
        try:
            return self._logits(input_ids.to(dev), positions, last_index.to(dev), kv_len)
        finally:
            self.routing.slots = None

    def _logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, last_index: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """The model's forward on the device, the cache and the routing already set."""
        if self.fast is not None:
            return self.fast(self.cache, input_ids, positions, last_index)
        # Causal over each row's own history: a query at position p sees keys 0..p.
        n = input_ids.shape[0]
        mask = torch.arange(kv_len, device=self.device).view(1, 1, 1, kv_len) <= positions.view(n, 1, -1, 1)
        hidden = self.model.get_decoder()(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state
        last = hidden[torch.arange(n, device=self.device), last_index]
        return self.model.get_output_embeddings()(last).float()
