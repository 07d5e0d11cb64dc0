"""The layer that applies many adapters in one batch: a base `nn.Linear` plus slot tables.

Each wrapped linear owns `lora_a (slots, r_max, in)` and `lora_b (slots, r_max, out)` (B
transposed, see `add_multi_adapter_lora_`); the engine's slot table writes an adapter's
composed matrices into a slot (zero-padded to r_max, zeros for modules it does not
target), and the engine sets, before each forward, which slot every batch row uses
(`AdapterRouting.slots`, -1 = base only). The forward only touches the first
`max(rank in use)` rows of the tables, so a server configured for rank 16 serving rank-4
adapters pays for rank 4.

Nothing is decided per call: the routing (gather index, base-row mask) is computed once
per forward into buffers that are reused, and each layer's rank in use (`rank`) is
updated when a slot is written, not recomputed by `max(slot_rank)` in every one of the
model's wrapped layers. The engine's own Llama forward (`server/vbserve/engine/llama.py`) calls
`add_lora_` on slices of its fused projections; the Hugging Face forward calls the layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import add_routed_lora_, route_rows


class AdapterRouting:
    """Per-forward row -> slot map shared by all wrapped layers of one model, whose slot
    tables live on `device`."""

    def __init__(self, device: torch.device | str = "cpu", rows: int = 0) -> None:
        self.device = torch.device(device)
        self._slots: torch.Tensor | None = None
        self.index: torch.Tensor | None = None
        self.row_mask: torch.Tensor | None = None
        # Reused from forward to forward (allocated for `rows`, grown when a batch is larger),
        # so a step's routing lands at the same addresses every time: what a captured (CUDA
        # graph) step needs.
        self._index_buf = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._mask_buf = torch.zeros(rows, 1, 1, dtype=torch.bool, device=self.device)

    @property
    def slots(self) -> torch.Tensor | None:
        """(N,) long slot per row of the next forward (on the CPU); None = no adapter in this batch."""
        return self._slots

    @slots.setter
    def slots(self, slots: torch.Tensor | None) -> None:
        self.route(slots)

    def route(self, slots: torch.Tensor | None, padded_rows: int | None = None) -> None:
        """Route the next forward's rows: `slots` (N,) long, -1 = base only. With
        `padded_rows` (the decode step's bucket, >= N), rows N.. are padding, routed to the
        base model, and the base-row mask is set even when every row has an adapter, so the
        ops a layer runs depend only on the bucket and on whether any row has an adapter."""
        # Computed once here rather than in each of the model's wrapped layers, and on the
        # CPU (where the engine builds slots): the "any adapter? every row?" decisions then
        # cost no device synchronization.
        slots = None if slots is None else slots.cpu()
        if slots is None or not bool((slots >= 0).any()):
            self._slots = self.index = self.row_mask = None
            return
        if padded_rows is not None:
            slots = torch.cat([slots, slots.new_full((padded_rows - slots.shape[0],), -1)])
        self._slots = slots
        index, row_mask = route_rows(slots)
        if row_mask is None and padded_rows is not None:
            row_mask = torch.zeros(padded_rows, 1, 1, dtype=torch.bool)
        n = index.shape[0]
        if n > self._index_buf.shape[0]:
            self._index_buf = torch.zeros(n, dtype=torch.long, device=self.device)
            self._mask_buf = torch.zeros(n, 1, 1, dtype=torch.bool, device=self.device)
        self.index = self._index_buf[:n].copy_(index)
        self.row_mask = None if row_mask is None else self._mask_buf[:n].copy_(row_mask)


class MultiAdapterLinear(nn.Module):
    def __init__(self, base: nn.Linear, routing: AdapterRouting, num_slots: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.num_slots = num_slots
        self.max_rank = max_rank
        # Allocated on first use: most adapters target a few module kinds, so tables for
        # the others would be memory spent on zeros.
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.slot_rank = [0] * num_slots
        self.rank = 0  # max(slot_rank): the table rows a forward reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.routing.index is None or self.rank == 0:
            return y
        n = self.routing.index.shape[0]
        out = self.add_lora_(y.reshape(n, -1, y.shape[-1]), x.reshape(n, -1, x.shape[-1]))
        return out.reshape(*x.shape[:-1], y.shape[-1])

    def add_lora_(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Add each row's adapter delta into `y` (N, L, out), in place; `y` may be a slice of
        a fused projection's output. x: (N, L, in), the layer's input."""
        if self.routing.index is None or self.rank == 0:
            return y
        r = self.rank
        return add_routed_lora_(y, x, self.lora_a[:, :r], self.lora_b[:, :r], self.routing.index, self.routing.row_mask)

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write one adapter's A `(r, in)` and B `(out, r)` into `slot`."""
        if self.lora_a is None:
            w = self.base.weight
            self.lora_a = w.new_zeros(self.num_slots, self.max_rank, self.base.in_features)
            self.lora_b = w.new_zeros(self.num_slots, self.max_rank, self.base.out_features)
        r = a.shape[0]
        self.clear_slot(slot)
        self.lora_a[slot, :r].copy_(a)
        self.lora_b[slot, :r].copy_(b.T)
        self.slot_rank[slot] = r
        self.rank = max(self.slot_rank)

    def clear_slot(self, slot: int) -> None:
        if self.lora_a is not None:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        self.slot_rank[slot] = 0
        self.rank = max(self.slot_rank)


def targetable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` an adapter may target (all but the LM head), by dotted name.
    These names are the module names adapters use."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and mod is not output}


def wrap_linear_layers(
    model: nn.Module, routing: AdapterRouting, num_slots: int, max_rank: int
) -> dict[str, MultiAdapterLinear]:
    """Replace every targetable linear with a `MultiAdapterLinear` reading `routing`."""
    wrapped: dict[str, MultiAdapterLinear] = {}
    for name, mod in targetable_linears(model).items():
        parent_name, _, child = name.rpartition(".")
        layer = MultiAdapterLinear(mod, routing, num_slots, max_rank)
        setattr(model.get_submodule(parent_name), child, layer)
        wrapped[name] = layer
    return wrapped


def write_adapter_slot(
    layers: dict[str, MultiAdapterLinear], slot: int, matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Put one composed adapter ({module: (A (r, in), B (out, r))}) into `slot` of every
    layer; layers it does not target get zeros there."""
    for name, layer in layers.items():
        if name in matrices:
            layer.set_slot(slot, *matrices[name])
        else:
            layer.clear_slot(slot)
