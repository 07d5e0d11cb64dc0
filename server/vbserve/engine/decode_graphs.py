"""The decode step captured as CUDA graphs, replayed each step (as vLLM and gpt-fast do).

A decode step launches hundreds of small kernels (seven projections, their adapter deltas,
norms, RoPE and attention in every layer); at batch 64 on a GPU the launches, not the
arithmetic, set its pace. A CUDA graph records the step's kernels once and replays them
with one launch. A graph replays fixed kernels on fixed addresses, so the step it records
must have shapes that depend on nothing but its key, and read its inputs from buffers that
never move (`ModelRunner.decode` is that step):

- rows: the batch padded up to a bucket of `batch_buckets` (padded rows decode a dummy token
  into the cache's scratch position, their logits dropped);
- attention length: a bucket of `attention_buckets`, the mask built inside the step from
  the positions buffer;
- the adapters' ranks in use: a layer reads `rank` rows of its slot tables (a Python int set
  when a slot is written), and none when no row of the step has an adapter. A new adapter of
  a higher rank (or on a module no adapter targeted yet) makes a new key; the slot tables
  themselves are written in place, so a graph reads whatever adapters the slots hold now.

Graphs are captured on first use of a key (the warm-up, on a side stream as PyTorch
documents, is that step's real work), all in one memory pool: they never run at once, and
the step's logits are copied into one buffer that outlives them all.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


def batch_buckets(max_rows: int) -> list[int]:
    """Row counts a decode step is padded to: 1, 2, 4, then every multiple of 8 (vLLM's
    sizes) below `max_rows`, and `max_rows`."""
    return sorted({b for b in (1, 2, 4) if b < max_rows} | set(range(8, max_rows, 8)) | {max_rows})


def attention_buckets(max_len: int, smallest: int = 64) -> list[int]:
    """Key lengths a decode step attends over: powers of two from `smallest`, and `max_len`.
    Attending over at most twice the longest row's keys costs little next to the weights a
    step reads; attending over `max_len` every step would not (see docs/engine.md)."""
    sizes = {max_len}
    size = smallest
    while size < max_len:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def bucket(sizes: list[int], n: int) -> int:
    """The smallest of `sizes` (ascending) that holds `n`; `n` itself past the largest."""
    return next((s for s in sizes if s >= n), n)


class DecodeGraphs:
    """One CUDA graph per key, captured from `step` on first use, in a shared memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.side_stream = torch.cuda.Stream(device)
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}

    def replay(self, key: Hashable, step: Callable[[], object]) -> None:
        """Run `step` (which reads and writes only buffers that never move): its graph's
        replay when `key` was seen before, else the step itself, then its capture."""
        graph = self.graphs.get(key)
        if graph is None:
            self.graphs[key] = self._capture(step)  # the warm-up ran the step already
            return
        graph.replay()

    def _capture(self, step: Callable[[], object]) -> torch.cuda.CUDAGraph:
        # The warm-up runs on the side stream, as PyTorch documents: lazy initializations
        # (cuBLAS workspaces, Triton's compilation) then happen outside the capture. It is
        # this step's real work: the capture below only records kernels.
        self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side_stream):
            step()
        torch.cuda.current_stream(self.device).wait_stream(self.side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        return graph
