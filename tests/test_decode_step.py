"""The static decode step (`ModelRunner.decode`, server/vbserve/engine/decode_graphs.py): batch
padded to a bucket, attention over a length bucket, inputs, routing and logits in buffers
that never move. On the CPU it runs eagerly through the same code a CUDA graph captures;
with a GPU, the graphs themselves are checked against it.

- bucket arithmetic;
- the step through its buffers, twice, gives the eager forward's logits exactly (same
  shapes), and reading the buffers leaves nothing of one step in the next;
- padding: a batch padded to its bucket decodes the same greedy tokens as each row alone and
  as every other bucket, and its padded rows write only the scratch position (a chunked
  prefill's row under the padding keeps its keys);
- CUDA only: graphs replay the eager step's logits exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import rel_err, tiny_llama
from tests.test_engine import random_adapter
from vbserve.engine.decode_graphs import attention_buckets, batch_buckets, bucket
from vbserve.engine.model_runner import ModelRunner
from vbserve.vblora.compose import compose_adapters
from vbserve.vblora.layer import write_adapter_slot
from vbserve_store import VBLoRAAdapter

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = 7


def adapter(seed: int, r: int) -> VBLoRAAdapter:
    """A random adapter on all seven modules of the tiny Llama (its shapes read before the
    runner wraps the linears)."""
    return random_adapter(tiny_llama(), seed=seed, targets=ALL_MODULES, r=r)


def write_slot(runner: ModelRunner, slot: int, stored: VBLoRAAdapter) -> None:
    mats = compose_adapters([stored], device=runner.device)
    write_adapter_slot(runner.layers, slot, {n: (a[0], b[0]) for n, (a, b) in mats.items()})


def runner_with_adapters(*, rows: int = 8, device: str = "cpu", cuda_graphs: bool = False) -> ModelRunner:
    """The tiny Llama with adapters of ranks 2, 3, 4 in slots 0-2."""
    model = tiny_llama(seed=5).to(device)
    runner = ModelRunner(
        model, max_rows=rows, max_len=100, num_adapter_slots=3, max_rank=8, cuda_graphs=cuda_graphs, static_decode=True
    )
    for slot in range(3):
        write_slot(runner, slot, adapter(slot, 2 + slot))
    return runner


def prefill(runner: ModelRunner, ids: torch.Tensor, slots: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    n, length = ids.shape
    positions = torch.arange(length).repeat(n, 1)
    return runner.forward(first_row, ids, positions, torch.full((n,), length - 1), slots)


def greedy_decode(runner: ModelRunner, ids: torch.Tensor, slots: torch.Tensor, steps: int) -> torch.Tensor:
    """(N, steps) greedy tokens after a prefill of `ids` (N, L) in rows 0..N-1."""
    logits = prefill(runner, ids, slots)
    tokens = []
    for i in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits = runner.decode(nxt, torch.full((ids.shape[0], 1), ids.shape[1] + i), slots)
    return torch.cat(tokens, dim=1)


def prompts(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, PROMPT), generator=torch.Generator().manual_seed(seed))


def test_an_eager_runner_keeps_exact_shapes():
    """Without graphs (the CPU) the step pads nothing and attends over the longest row."""
    runner = ModelRunner(tiny_llama(), max_rows=8, max_len=100, num_adapter_slots=1, max_rank=2)
    assert runner.graphs is None and not runner.static_decode
    assert runner.batch_buckets == [] and runner.attention_buckets == []


def test_buckets():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(30) == [1, 2, 4, 8, 16, 24, 30]
    assert batch_buckets(1) == [1]
    assert attention_buckets(2048) == [64, 128, 256, 512, 1024, 2048]
    assert attention_buckets(100) == [64, 100]
    assert attention_buckets(40) == [40]
    sizes = batch_buckets(32)
    assert [bucket(sizes, n) for n in (1, 3, 5, 8, 9, 25, 32)] == [1, 4, 8, 8, 16, 32, 32]
    assert bucket(sizes, 33) == 33  # past the largest: itself


def test_step_through_the_buffers_gives_the_eager_logits_exactly():
    """Twice through the static buffers at one position (the KV writes repeat the same
    values) and once through `forward` with the same shapes (8 rows, the step's length
    bucket): the same logits to the bit."""
    runner = runner_with_adapters()
    slots = torch.tensor([0, -1, 2, 1, 0, -1, 1, 2])
    ids = prompts(8)
    nxt = prefill(runner, ids, slots).argmax(-1, keepdim=True)
    positions = torch.full((8, 1), PROMPT)
    first = runner.decode(nxt, positions, slots)
    again = runner.decode(nxt, positions, slots)
    kv_len = bucket(runner.attention_buckets, PROMPT + 1)
    eager = runner.forward(0, nxt, positions, torch.zeros(8, dtype=torch.long), slots, kv_len)
    assert torch.equal(first, again) and torch.equal(first, eager)
    # What decode returns is its own: the next step does not overwrite it.
    kept = first.clone()
    base = runner.decode(nxt, positions, torch.full((8,), -1))
    assert torch.equal(first, kept)
    # The adapters act (rows with one differ from the base model's), and only in their rows.
    assert rel_err(first[slots >= 0], base[slots >= 0]) > 1e-3
    assert torch.equal(first[slots < 0], base[slots < 0])


def test_padded_decode_is_batch_invariant_across_buckets():
    """5 rows (padded to 8), each row alone (bucket 1), and the 3- and 2-row batches that
    split them (padded to 4 and 2): the same greedy tokens, the same logits to float rounding."""
    ids, slots = prompts(5), torch.tensor([0, -1, 2, 1, 0])
    together = greedy_decode(runner_with_adapters(), ids, slots, 6)
    alone = torch.cat([greedy_decode(runner_with_adapters(), ids[i : i + 1], slots[i : i + 1], 6) for i in range(5)])
    split = torch.cat(
        [
            greedy_decode(runner_with_adapters(), ids[:3], slots[:3], 6),
            greedy_decode(runner_with_adapters(), ids[3:], slots[3:], 6),
        ]
    )
    assert torch.equal(together, alone) and torch.equal(together, split)


def test_padded_logits_equal_unpadded_to_float_rounding():
    padded = runner_with_adapters()
    unpadded = copy.deepcopy(padded)
    unpadded.batch_buckets = []  # every batch its own size, as an eager runner's
    ids, slots = prompts(5, seed=2), torch.tensor([1, 2, -1, 0, 2])
    nxt = prefill(padded, ids, slots).argmax(-1, keepdim=True)
    prefill(unpadded, ids, slots)
    positions = torch.full((5, 1), PROMPT)
    assert rel_err(padded.decode(nxt, positions, slots), unpadded.decode(nxt, positions, slots)) < 1e-6


def test_padded_rows_write_only_the_scratch_position():
    """Rows 0-2 decode (padded to 4); row 3 holds a chunked prefill's first chunk meanwhile:
    its keys and values are untouched, and only the scratch position of row 3 changed."""
    runner = runner_with_adapters()
    ids, slots = prompts(3), torch.tensor([0, 1, -1])
    nxt = prefill(runner, ids, slots).argmax(-1, keepdim=True)
    prefill(runner, prompts(1, seed=9), torch.tensor([2]), first_row=3)
    cache = runner.cache
    before = [buf.clone() for buf in (*cache.keys, *cache.values)]
    written = list(cache._written)
    runner.decode(nxt, torch.full((3, 1), PROMPT), slots)
    scratch = cache.scratch_position
    for old, buf in zip(before, (*cache.keys, *cache.values), strict=True):
        assert torch.equal(old[3:, :, :scratch], buf[3:, :, :scratch])
        assert not torch.equal(old[3, :, scratch], buf[3, :, scratch])  # the padded row wrote there
        assert torch.equal(old[:3, :, :PROMPT], buf[:3, :, :PROMPT])
    assert cache._written == [PROMPT + 1] * 3 + written[3:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_replay_the_eager_step():
    """Graphs on and off over the same model and inputs: the same logits to the bit, at two
    buckets, with and without adapters, and after an adapter of a new rank is written."""
    graphs = runner_with_adapters(device="cuda", cuda_graphs=True)
    eager = runner_with_adapters(device="cuda")
    assert graphs.graphs is not None and eager.graphs is None
    for n, slots in ((5, torch.tensor([0, -1, 2, 1, 0])), (2, torch.tensor([-1, -1])), (3, torch.tensor([2, 2, 2]))):
        ids = prompts(n)
        nxt = prefill(graphs, ids, slots).argmax(-1, keepdim=True).cpu()
        assert torch.equal(nxt, prefill(eager, ids, slots).argmax(-1, keepdim=True).cpu())
        for i in range(4):  # the first step of a key captures, the others replay
            positions = torch.full((n, 1), PROMPT + i)
            ours, ref = graphs.decode(nxt, positions, slots), eager.decode(nxt, positions, slots)
            assert torch.equal(ours, ref), (n, i)
            nxt = ref.argmax(-1, keepdim=True).cpu()
    keys = len(graphs.graphs.graphs)
    for r in (graphs, eager):  # rank 6 in slot 1: a new key
        write_slot(r, 1, adapter(7, 6))
    slots, positions = torch.tensor([1, 0, 1]), torch.full((3, 1), PROMPT)
    nxt = prefill(graphs, prompts(3, seed=4), slots).argmax(-1, keepdim=True).cpu()
    prefill(eager, prompts(3, seed=4), slots)
    for _ in range(2):
        assert torch.equal(graphs.decode(nxt, positions, slots), eager.decode(nxt, positions, slots))
    assert len(graphs.graphs.graphs) == keys + 1
