"""The memory-bandwidth ceiling of a decode step on this machine, shared by the benchmarks.

A decode step of a small batch reads every weight of the model once (the matmuls are
memory-bound), so its speed limit is bandwidth / bytes of weights per step.
"""

from __future__ import annotations

import time

import torch


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Streaming-read bandwidth in GB/s: the best of `repeats` sums over a float32 tensor of
    `gib` GiB (far beyond the caches), with torch's threads as set by the caller."""
    data = torch.ones(int(gib * (1 << 30)) // 4)
    data.sum()  # first touch: page faults are not bandwidth
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def decode_weight_bytes(model: torch.nn.Module, itemsize: int = 4) -> int:
    """Bytes of weights one decode step reads at `itemsize` bytes per element: every linear
    layer's and the LM head's (a tied embedding counted once, as the LM head); the input
    embedding is only gathered, a few rows, and the norms are negligible."""
    head = model.get_output_embeddings().weight
    linears = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    linears[id(head)] = head
    return sum(w.numel() for w in linears.values()) * itemsize


def limit_tok_s(batch: int, bandwidth_gbs: float, weight_bytes: int) -> float:
    """Decode tokens/s at `batch` rows if a step took exactly one read of the weights."""
    return batch * bandwidth_gbs * 1e9 / weight_bytes
