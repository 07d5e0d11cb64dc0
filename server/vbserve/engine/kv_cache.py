"""A slot-based KV cache: one buffer row per running request, driven by the model's own
forward (the model calls `update(keys, values, layer_idx)` in every attention layer).

Rows of running requests are kept contiguous (0..n-1) by the batcher, so a forward over a
row range returns a view of the buffer, never a copy.

A row attends over [0, kv_len), the longest row's length, with the positions past its own
length masked out. Masked is not enough: softmax gives them weight 0, but 0 * NaN is NaN,
so a stale inf/NaN left there by an earlier request (one tenant's adapter can make its own
keys overflow) would turn another request's output into NaN. Rows are therefore zeroed
when their request leaves (`clear_row`), as far as anything was written (`_written`): one
memset of what the request wrote, 0.7 ms for 64 positions of SmolLM2 on the 2-core CPU.

Every row has one position more than `max_len`, `scratch_position`: the decode step pads its
batch up to a bucket (`ModelRunner.decode`), and a padded row writes its keys and values
there. No real row ever attends to it (a request's positions stay below `max_len`), and it is
never marked written, so a padded row changes nothing that a request reads, even when it lands
on a row a chunked prefill is filling.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (max_rows, num_kv_heads, max_len + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.scratch_position = max_len
        self._written = [0] * max_rows  # per row: positions [0, n) may hold a request's keys/values
        self._rows = slice(0, 0)
        self._write_index = torch.zeros(0, dtype=torch.long)
        self._kv_len = 0

    def note_written(self, first_row: int, positions: torch.Tensor) -> None:
        """Before a forward over rows first_row..first_row+N-1 that writes row i's new keys
        and values at `positions[i]` (N, L, on the CPU: no device sync): record how far each
        row gets written, so `clear_row` knows what to zero."""
        for i, end in enumerate((positions[:, -1] + 1).tolist()):
            self._written[first_row + i] = max(self._written[first_row + i], end)

    def route(self, first_row: int, positions: torch.Tensor, kv_len: int) -> None:
        """Set up that forward: it covers rows first_row..first_row+N-1, writes at `positions`
        (N, L, on the cache's device: nothing here reads a value back, so a captured decode
        step runs it, see `DecodeGraphs`), and attends over [0, kv_len)."""
        n = positions.shape[0]
        self._rows = slice(first_row, first_row + n)
        # Where each new (row, head, position) vector lands in a layer's buffer seen as
        # (rows * heads * positions, head_dim), computed once per forward for all layers: an
        # `index_copy_` with it takes 6 us where advanced indexing `k[rows, :, pos] = ...`
        # takes 20 us (decode, 32 rows of SmolLM2, 2-core CPU; in a profiled step of the
        # loaded shared machine the indexed writes averaged 380 us), twice in every layer.
        _, heads, row_len, _ = self.keys[0].shape
        row_idx = torch.arange(first_row, first_row + n, device=positions.device).view(n, 1, 1)
        head_idx = torch.arange(heads, device=positions.device).view(1, heads, 1)
        self._write_index = ((row_idx * heads + head_idx) * row_len + positions.view(n, 1, -1)).view(-1)
        self._kv_len = kv_len

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value_states: (N, kv_heads, L, head_dim) -> the rows' (N, kv_heads, kv_len, head_dim).
        The attention layers pass more (`cache_kwargs`, and from transformers 5.24 `kwargs=`),
        which a cache whose positions are set per step has no use for."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        d = k.shape[-1]
        k.view(-1, d).index_copy_(0, self._write_index, key_states.reshape(-1, d))
        v.view(-1, d).index_copy_(0, self._write_index, value_states.reshape(-1, d))
        return k[self._rows, :, : self._kv_len], v[self._rows, :, : self._kv_len]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy a request's first `length` cached positions from row `src` to row `dst`
        (compaction after a request leaves)."""
        for buf in (*self.keys, *self.values):
            buf[dst, :, :length] = buf[src, :, :length]
        self._written[dst] = max(self._written[dst], length)

    def clear_row(self, row: int) -> None:
        """Zero what requests wrote into `row`, so the next one finds only zeros there."""
        end, self._written[row] = self._written[row], 0
        if end:
            for buf in (*self.keys, *self.values):
                buf[row, :, :end] = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    @property
    def is_compileable(self) -> bool:
        return False
