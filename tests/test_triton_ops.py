"""The Triton kernels against the torch ops, on CPU under Triton's interpreter (set up by
conftest), on CUDA where a GPU is present.

- LoRA apply: random shapes, ranks 1-16 (slices of wider slot tables, as the layer passes
  them), rows without an adapter, slots shared by several rows, decode (L = 1) and prefill
  segments (L > 1), float32 and bfloat16: both variants within float rounding of an exact
  (float64) computation on the same inputs.
- Compose: uint8 and int16 indices, straight into slot tables of the model's dtype, which
  then hold what the torch path (`compose_adapters` + the layer's slot writes) puts there,
  slots written again.
- End to end: the engine on the tiny random Llama gives the same greedy tokens with either
  kernel variant.
- The kernels compile for sm_90 (H100/H200) with triton's own compiler, no GPU needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import byte_tokenizer, engine_over, tiny_llama
from vbserve.engine import AdapterRef, GenerationRequest, SamplingParams
from vbserve.settings import Settings
from vbserve.vblora import ops
from vbserve.vblora.compose import compose_adapters, compose_into_slots
from vbserve.vblora.layer import MultiAdapterLinear, write_adapter_slot
from vbserve.vblora.ops import route_rows, torch_ops, triton_ops
from vbserve_store import AdapterConfig, ModuleSpec, VBLoRAAdapter
from vbserve_store.store import SQLiteAdapterStore

_triton_apply = triton_ops.add_routed_lora_
# conftest chose the interpreter where there is no GPU; with one, the kernels are compiled.
DEVICE = "cpu" if triton_ops.INTERPRETED else "cuda"
# Relative error (Frobenius norm) against float64 on the same inputs. bfloat16: torch's
# bmm rounds to nearest (about 2.5e-3 here); the interpreter casts float32 -> bfloat16 by
# truncation, twice (xa, then the output), about 6.5e-3: bounded by 2 * 2^-7.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 * 2**-7}


def rel_err(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return float((ours.double() - exact).norm() / exact.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(6))
def test_lora_apply_matches_torch(dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    rows, num_slots, r_max = randint(1, 9), randint(1, 5), 16
    length = 1 if seed % 2 else randint(2, 40)  # decode rows, or prefill segments
    d_in, d_out = randint(8, 300), randint(8, 300)  # not multiples of any block size
    r = 1 + (seed * 5) % 16  # 1, 6, 11, 16, 5, 10
    x = torch.randn(rows, length, d_in, generator=gen).to(DEVICE, dtype)
    a_table = torch.randn(num_slots, r_max, d_in, generator=gen).to(DEVICE, dtype)
    b_t_table = torch.randn(num_slots, r_max, d_out, generator=gen).to(DEVICE, dtype)
    base = torch.randn(rows, length, d_out, generator=gen).to(DEVICE, dtype)
    slots = torch.randint(-1, num_slots, (rows,), generator=gen)  # repeats, and -1 rows
    slots[0] = -1 if seed % 3 == 0 else slots[0]
    index, mask = route_rows(slots)
    index, mask = index.to(DEVICE), None if mask is None else mask.to(DEVICE)
    args = (x, a_table[:, :r], b_t_table[:, :r], index, mask)  # strided views, as the layer passes

    got = triton_ops.add_routed_lora_(base.clone(), *args)
    ref = torch_ops.add_routed_lora_(base.clone(), *args)
    exact = torch_ops.add_routed_lora_(
        base.double(), x.double(), a_table[:, :r].double(), b_t_table[:, :r].double(), index, mask
    )
    assert rel_err(got, exact) < TOL[dtype]
    assert rel_err(ref, exact) < TOL[dtype]
    # Base-only rows are the base output, bit for bit.
    assert torch.equal(got[slots < 0], base[slots < 0])


def test_base_only_rows_never_see_another_slots_inf() -> None:
    """Slot 0 (the index of base-only rows) holds a tenant's huge values: the base-only rows
    stay their base output, bit for bit (inf * 0 would be NaN in a masking kernel)."""
    x = torch.randn(3, 1, 32, device=DEVICE)
    a_table = torch.randn(2, 4, 32, device=DEVICE)
    b_t_table = torch.randn(2, 4, 48, device=DEVICE)
    a_table[0], b_t_table[0] = 3e38, 3e38
    base = torch.randn(3, 1, 48, device=DEVICE)
    out = triton_ops.add_routed_lora_(base.clone(), x, a_table, b_t_table, *route_rows(torch.tensor([1, -1, -1])))
    assert torch.equal(out[1:], base[1:])
    assert torch.isfinite(out[0]).all() and not torch.equal(out[0], base[0])


@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int16])
def test_compose_subvectors_matches_torch(index_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    n, h, b, s, k = 5, 300 if index_dtype == torch.int16 else 40, 24, 70, 3
    bank = torch.randn(n, h, b, generator=gen).to(DEVICE)
    indices = torch.randint(0, h, (n, s, k), generator=gen).to(DEVICE, index_dtype)
    weights = torch.rand(n, s, k, generator=gen).to(DEVICE)
    got = triton_ops.compose_subvectors(bank, indices, weights)
    assert rel_err(got, torch_ops.compose_subvectors(bank.double(), indices, weights.double())) < 1e-6


def random_adapter(modules: tuple[ModuleSpec, ...], r: int, seed: int, b: int = 16, h: int = 32) -> VBLoRAAdapter:
    config = AdapterConfig(modules, r=r, vector_length=b, num_vectors=h, topk=2)
    gen = torch.Generator().manual_seed(seed)
    bank = torch.rand(h, b, generator=gen) - 0.5
    return VBLoRAAdapter.from_logits(config, bank, torch.randn(config.num_subvectors, h, generator=gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compose_into_slots_writes_what_the_torch_path_writes(dtype: torch.dtype) -> None:
    """Two adapters into slots 3 and 0 of two layers' tables, then a third into slot 3 again
    (a slot reused): each slot then holds, in the table's dtype, what `compose_adapters` +
    `write_adapter_slot` put there."""
    modules = (ModuleSpec("up", 48, 80), ModuleSpec("down", 80, 48))
    adapters = [random_adapter(modules, r=4, seed=s) for s in (1, 2, 3)]

    def layers() -> dict[str, MultiAdapterLinear]:
        found = {}
        for m in modules:
            base = torch.nn.Linear(m.in_features, m.out_features, device=DEVICE, dtype=dtype)
            layer = MultiAdapterLinear(base, None, num_slots=4, max_rank=8)
            layer.set_slot(1, torch.ones(2, m.in_features), torch.ones(m.out_features, 2))  # allocates the tables
            found[m.name] = layer
        return found

    expected = layers()
    mats = compose_adapters(adapters, device=DEVICE, dtype=dtype)
    for i, slot in enumerate((3, 0, 3)):
        write_adapter_slot(expected, slot, {name: (a[i], b[i]) for name, (a, b) in mats.items()})

    for kernels in ("triton", "torch"):
        ops.use_kernels(kernels)
        try:
            got = layers()
            tables = {name: (lay.lora_a, lay.lora_b) for name, lay in got.items()}
            compose_into_slots(adapters[:2], tables, torch.tensor([3, 0]))
            compose_into_slots(adapters[2:], tables, torch.tensor([3]))
        finally:
            ops.use_kernels("auto")
        for name, layer in got.items():
            assert layer.lora_a.dtype == dtype
            # Rounded once from the same float32 sums (the interpreter truncates, torch
            # rounds to nearest): one bfloat16 step apart at most.
            atol = 0 if dtype == torch.float32 else 2**-7
            for table, want in ((layer.lora_a, expected[name].lora_a), (layer.lora_b, expected[name].lora_b)):
                torch.testing.assert_close(table, want, rtol=atol or 1e-6, atol=1e-6)


def test_auto_picks_torch_on_cpu_and_triton_when_forced() -> None:
    cpu = torch.zeros(1)
    try:
        ops.use_kernels("auto")
        assert ops.variant(cpu) is torch_ops
        ops.use_kernels("triton")
        assert ops.variant(cpu) is triton_ops
        with pytest.raises(ValueError, match="kernels"):
            ops.use_kernels("cuda")
    finally:
        ops.use_kernels("auto")


async def test_engine_greedy_tokens_equal_with_either_kernels(tmp_path, monkeypatch) -> None:
    """Mixed batch: base-only rows, two adapters of different ranks and targets, one of them
    shared by two requests, a prompt with and without an adapter; prompts of different
    lengths (prefill segments), 8 new tokens."""
    model_seed = 7
    store = SQLiteAdapterStore(tmp_path / "a.db")
    model = tiny_llama(seed=model_seed)
    shapes = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}

    def targets(*kinds: str) -> tuple[ModuleSpec, ...]:
        return tuple(ModuleSpec(n, m.in_features, m.out_features) for n, m in shapes.items() if n.endswith(kinds))

    store.put("t", "a", random_adapter(targets("q_proj", "v_proj"), r=3, seed=11))
    store.put("t", "b", random_adapter(targets("o_proj", "down_proj", "up_proj"), r=8, seed=12))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (length,), generator=gen).tolist() for length in (5, 9, 12)]
    requests = [(prompts[0], None), (prompts[0], "a"), (prompts[1], "b"), (prompts[1], None), (prompts[2], "a")]

    async def tokens(kernels: str) -> list[list[int]]:
        settings = Settings(kernels=kernels, max_lora_rank=8, max_model_len=64, max_batch_size=8)
        engine = engine_over(tiny_llama(seed=model_seed).to(DEVICE), byte_tokenizer(), store, settings)
        try:
            handles = [
                await engine.submit(
                    GenerationRequest(
                        prompt_ids=prompt,
                        adapter=AdapterRef("t", name) if name else None,
                        sampling=SamplingParams(max_new_tokens=8),
                    )
                )
                for prompt, name in requests
            ]
            return [(await h.result()).token_ids for h in handles]
        finally:
            engine.shutdown()
            ops.use_kernels("auto")

    triton_calls = []
    monkeypatch.setattr(triton_ops, "add_routed_lora_", lambda *a: triton_calls.append(a[1].shape) or _triton_apply(*a))
    try:
        with_torch = await tokens("torch")
        assert not triton_calls
        with_triton = await tokens("triton")
    finally:
        store.close()
    # The triton path ran the kernels, on decode rows (L = 1) and on prefill segments.
    assert {shape[1] == 1 for shape in triton_calls} == {True, False}
    assert with_triton == with_torch
    # The adapters change the tokens (else this would not test the kernels' output).
    assert with_torch[1] != with_torch[0]
    assert with_torch[2] != with_torch[3]


def test_kernels_compile_for_hopper(tmp_path) -> None:
    """The kernels as the GPU gets them: compiled for sm_90 by triton's own compiler (no
    device needed), in a fresh cache so nothing is taken from an earlier build."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.triton_compile"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = [line.split()[0] for line in proc.stdout.splitlines()]
    assert built == ["_lora_shrink_kernel", "_lora_expand_kernel"] * 2 + ["_compose_kernel"] * 2
