"""The VB-LoRA kernels against plain-torch references and against PEFT itself.

- A batch that mixes many adapters (of different ranks, padded into slots) and base-only
  rows gives, row by row, what that row computes alone: `W x + bias + B (A x)`.
- `compose_adapters` for n adapters gives PEFT's own per-layer `_get_lora_matrices`.
- Gradients through `compose_subvectors` equal autograd through PEFT's formula, so
  training can use the fused kernel.

Every test runs on CPU and, where one is present, on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import random_peft_vblora, rel_err, tiny_llama
from vbserve.vblora.compose import compose_adapters, rank_major_order, split_lora_matrices
from vbserve.vblora.layer import AdapterRouting, MultiAdapterLinear, wrap_linear_layers, write_adapter_slot
from vbserve.vblora.ops import add_multi_adapter_lora_, compose_subvectors
from vbserve_store import AdapterConfig, ModuleSpec, VBLoRAAdapter
from vbserve_store.peft_io import load_peft_dir

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
TOL = 1e-5

IN, HIDDEN = 64, 96  # both divisible by b = 16 and 32
UP = ModuleSpec("up", IN, HIDDEN)
DOWN = ModuleSpec("down", HIDDEN, IN)


class TwoLinears(nn.Module):
    """Stand-in for a transformer block: two targetable linears with different shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(IN, HIDDEN)
        self.down = nn.Linear(HIDDEN, IN)


def random_adapter(
    modules: tuple[ModuleSpec, ...], *, r: int, seed: int, b: int = 16, h: int = 32, k: int = 2
) -> VBLoRAAdapter:
    """Random logits ~ N(0, 1) and bank ~ U(-0.5, 0.5): the LoRA delta is then about as
    large as the base output, so a relative error on it is meaningful."""
    config = AdapterConfig(modules, r=r, vector_length=b, num_vectors=h, topk=k)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(config.num_subvectors, h, generator=gen)
    bank = torch.rand(h, b, generator=gen) - 0.5
    return VBLoRAAdapter.from_logits(config, bank, logits)


def reference_lora(adapter: VBLoRAAdapter, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's (A (r, in), B (out, r)) by PEFT's formula, one adapter at a time: an
    oracle that shares no code with `compose_subvectors` / `split_lora_matrices`."""
    cfg = adapter.config
    sl = next(s for s in cfg.layout if s.module.name == name)
    r, b, m = cfg.r, cfg.vector_length, sl.module

    def sub(start: int, stop: int) -> torch.Tensor:
        idx = adapter.indices[start:stop].long()
        return (adapter.weights[start:stop].float().unsqueeze(-1) * adapter.bank.float()[idx]).sum(-2)

    a = sub(sl.a_start, sl.b_start).reshape(r, m.in_features)
    bmat = sub(sl.b_start, sl.end).reshape(m.out_features // b, r, b).transpose(1, 2).reshape(m.out_features, r)
    return a, bmat


def mixed_adapters() -> list[VBLoRAAdapter]:
    """Nine adapters: ranks 1..4 (so slots are zero-padded to r_max = 4), some targeting
    both linears, some only `up` (their `down` slot must act as base only)."""
    adapters = []
    for i in range(9):
        modules = (UP, DOWN) if i % 3 else (UP,)
        adapters.append(random_adapter(modules, r=1 + i % 4, seed=100 + i, b=16 if i % 2 else 32))
    return adapters


def load_slots(layers: dict[str, MultiAdapterLinear], adapters: list[VBLoRAAdapter], device: str) -> None:
    """Compose per composition group (as the engine does) and write adapter i to slot i.
    Slot 0 holds a real adapter on purpose: base-only rows (-1) are clamped to slot 0
    inside the kernel and must still add nothing."""
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(adapters):
        groups.setdefault(a.config.composition_key, []).append(i)
    for members in groups.values():
        mats = compose_adapters([adapters[i] for i in members], device=device)
        for j, i in enumerate(members):
            write_adapter_slot(layers, i, {name: (a[j], b[j]) for name, (a, b) in mats.items()})


def row_slots(num_adapters: int, base_rows: int, device: str) -> torch.Tensor:
    """Every adapter on two rows plus `base_rows` base-only rows, shuffled."""
    slots = torch.tensor([*range(num_adapters), *range(num_adapters), *[-1] * base_rows])
    return slots[torch.randperm(len(slots), generator=torch.Generator().manual_seed(7))].to(device)


def reference_rows(
    layer: MultiAdapterLinear, name: str, x: torch.Tensor, slots: torch.Tensor, adapters: list[VBLoRAAdapter]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, LoRA delta) of every row computed alone with plain matmuls and the
    adapter's own unpadded A and B."""
    w, bias = layer.base.weight, layer.base.bias
    outs, deltas = [], []
    for row, slot in zip(x, slots.tolist(), strict=True):
        base = row @ w.T + bias
        delta = torch.zeros_like(base)
        if slot >= 0 and name in {m.name for m in adapters[slot].config.modules}:
            a, bmat = (t.to(x.device) for t in reference_lora(adapters[slot], name))
            delta = (row @ a.T) @ bmat.T
        outs.append(base + delta)
        deltas.append(delta)
    return torch.stack(outs), torch.stack(deltas)


def check_rows(
    ours: torch.Tensor,
    base_out: torch.Tensor,
    ref: torch.Tensor,
    ref_delta: torch.Tensor,
    adapted: torch.Tensor,
) -> None:
    """Adapter rows match the reference (output and delta); all other rows are the base
    output bit for bit."""
    assert ours.shape == ref.shape
    assert adapted.any()
    # The adapter must matter, or the comparison below could pass with the delta dropped.
    assert ref_delta[adapted].norm() > 0.3 * base_out[adapted].norm()
    assert rel_err(ours[adapted], ref[adapted]) < TOL
    assert rel_err(ours[adapted] - base_out[adapted], ref_delta[adapted]) < TOL
    assert torch.equal(ours[~adapted], base_out[~adapted])


@pytest.fixture
def wrapped(request: pytest.FixtureRequest) -> tuple[dict[str, MultiAdapterLinear], AdapterRouting, list]:
    device = request.param
    torch.manual_seed(0)
    model = TwoLinears().to(device)
    routing = AdapterRouting(device)
    layers = wrap_linear_layers(model, routing, num_slots=12, max_rank=4)
    assert set(layers) == {"up", "down"} and model.up is layers["up"]
    adapters = mixed_adapters()
    load_slots(layers, adapters, device)
    return layers, routing, adapters


@pytest.mark.parametrize("wrapped", DEVICES, indirect=True)
@pytest.mark.parametrize("base_rows", [4, 0], ids=["with-base-rows", "adapter-rows-only"])
@pytest.mark.parametrize("seq_len", [None, 5], ids=["per-token", "rows-of-5"])
def test_mixed_batch_equals_each_row_alone(wrapped, seq_len: int | None, base_rows: int) -> None:
    """Per-token layout `(T, in)` (L = 1) and row layout `(N, L, in)`, through the kernel
    directly and through the wrapped layer, for both linears; with and without base-only
    rows (the kernel skips the row mask when every row has an adapter)."""
    layers, routing, adapters = wrapped
    device = layers["up"].base.weight.device
    slots = row_slots(len(adapters), base_rows, str(device))
    gen = torch.Generator().manual_seed(11 if seq_len is None else 12)
    for name, layer in layers.items():
        shape = (
            (len(slots), layer.base.in_features) if seq_len is None else (len(slots), seq_len, layer.base.in_features)
        )
        x = torch.randn(shape, generator=gen).to(device)
        targeted = torch.tensor(
            [s >= 0 and name in {m.name for m in adapters[s].config.modules} for s in slots.tolist()], device=device
        )
        with torch.no_grad():
            base_out = layer.base(x)
            x3 = x.reshape(len(slots), -1, x.shape[-1])
            ref, ref_delta = reference_rows(layer, name, x3, slots, adapters)

            kernel_out = add_multi_adapter_lora_(
                base_out.reshape(len(slots), -1, base_out.shape[-1]).clone(), x3, layer.lora_a, layer.lora_b, slots
            )
            check_rows(kernel_out, base_out.reshape(ref.shape), ref, ref_delta, targeted)

            routing.slots = slots
            layer_out = layer(x)
            assert layer_out.shape == base_out.shape
            check_rows(layer_out.reshape(ref.shape), base_out.reshape(ref.shape), ref, ref_delta, targeted)

            routing.slots = None  # no adapter in the batch: exactly the base layer
            assert torch.equal(layer(x), base_out)
            routing.slots = torch.full_like(slots, -1)  # only base-only rows: the same
            assert torch.equal(layer(x), base_out)


@pytest.mark.parametrize("device", DEVICES)
def test_reused_slot_holds_only_the_new_adapter(device: str) -> None:
    """The slot table reuses slots: writing a rank-1 adapter that targets only `up`
    over a rank-4 one that targeted both must clear the old rank's tail in `up` and the
    whole slot in `down`."""
    torch.manual_seed(0)
    model = TwoLinears().to(device)
    routing = AdapterRouting(device)
    layers = wrap_linear_layers(model, routing, num_slots=2, max_rank=4)
    big, small = random_adapter((UP, DOWN), r=4, seed=1), random_adapter((UP,), r=1, seed=2)
    for adapter in (big, small):
        mats = compose_adapters([adapter], device=device)
        write_adapter_slot(layers, 1, {name: (a[0], b[0]) for name, (a, b) in mats.items()})
    routing.slots = torch.tensor([1, 1, 1], device=device)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x = torch.randn(3, IN, generator=gen).to(device)
        a, b = (t.to(device) for t in reference_lora(small, "up"))
        assert rel_err(layers["up"](x) - layers["up"].base(x), (x @ a.T) @ b.T) < TOL
        h = torch.randn(3, HIDDEN, generator=gen).to(device)
        assert torch.equal(layers["down"](h), layers["down"].base(h))
        layers["up"].clear_slot(1)
        assert torch.equal(layers["up"](x), layers["up"].base(x))


PEFT_CONFIGS = {
    "qv-r4-b16-h32-k2": dict(r=4, b=16, h=32, k=2, targets=["q_proj", "v_proj"]),
    "all-r2-b32-h256-k3": dict(r=2, b=32, h=256, k=3, targets="all-linear"),
    "od-r8-b16-h300-k1": dict(r=8, b=16, h=300, k=1, targets=["down_proj", "o_proj"]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("topk_only", [False, True], ids=["logits", "topk"])
@pytest.mark.parametrize("cfg", PEFT_CONFIGS.values(), ids=PEFT_CONFIGS.keys())
def test_compose_adapters_equals_peft_per_layer(cfg: dict, topk_only: bool, device: str, tmp_path) -> None:
    """Four PEFT adapters, imported from their own checkpoints, composed in one call:
    every module's A and B equal PEFT's `_get_lora_matrices` for that adapter."""
    base = tiny_llama(seed=1)
    peft_models, adapters = [], []
    for seed in range(4):
        model = random_peft_vblora(base, seed=20 + seed, save_only_topk_weights=topk_only, **cfg)
        model.save_pretrained(tmp_path / str(seed))
        peft_models.append(model)
        adapters.append(load_peft_dir(tmp_path / str(seed)))
    composed = compose_adapters(adapters, device=device)
    assert len(composed) == len(adapters[0].config.modules)
    checked = 0
    for i, model in enumerate(peft_models):
        for full_name, module in model.named_modules():
            if not hasattr(module, "_get_lora_matrices"):
                continue
            name = full_name.removeprefix("base_model.model.")
            with torch.no_grad():
                ref_a, ref_b = module._get_lora_matrices("default")
            a, b = composed[name]
            assert a[i].device.type == device
            assert a[i].shape == ref_a.shape and b[i].shape == ref_b.shape
            assert rel_err(a[i].cpu(), ref_a) < TOL
            assert rel_err(b[i].cpu(), ref_b) < TOL
            checked += 1
    assert checked == len(adapters) * len(composed)


@pytest.mark.parametrize("device", DEVICES)
def test_both_sub_vector_orders_give_the_same_matrices(device: str) -> None:
    """Training splits sub-vectors composed in the stored order; serving composes B's in
    rank-major order so that B needs no transposing copy. Both must give PEFT's A and B."""
    adapters = [random_adapter((UP, DOWN), r=3, seed=s) for s in (1, 2)]
    config = adapters[0].config
    bank = torch.stack([a.bank for a in adapters]).to(device)
    indices = torch.stack([a.indices for a in adapters]).to(device)
    weights = torch.stack([a.weights for a in adapters]).to(device)
    order = rank_major_order(config).to(device)
    stored = split_lora_matrices(config, compose_subvectors(bank, indices, weights))
    rank_major = split_lora_matrices(
        config, compose_subvectors(bank, indices[:, order], weights[:, order]), b_rank_major=True
    )
    for i, adapter in enumerate(adapters):
        for name in ("up", "down"):
            ref_a, ref_b = reference_lora(adapter, name)
            for a, b in (stored[name], rank_major[name]):
                assert rel_err(a[i].cpu(), ref_a) < TOL and rel_err(b[i].cpu(), ref_b) < TOL


def test_compose_adapters_refuses_mixed_configs() -> None:
    """One kernel call needs one layout; the caller must group by composition_key."""
    with pytest.raises(ValueError, match="composition_key"):
        compose_adapters([random_adapter((UP,), r=2, seed=1), random_adapter((UP,), r=3, seed=2)])


@pytest.mark.parametrize("device", DEVICES)
def test_compose_subvectors_gradients_match_peft_formula(device: str) -> None:
    """d/d(bank), d/d(top-k weights) and d/d(logits) through the fused kernel equal
    autograd through PEFT's `(softmax(topk logits).unsqueeze(-1) * bank[indices]).sum(-2)`."""
    n, s, h, b, k = 3, 40, 32, 16, 3
    gen = torch.Generator().manual_seed(5)
    logits0 = torch.randn(n, s, h, generator=gen).to(device)
    bank0 = (torch.rand(n, h, b, generator=gen) - 0.5).to(device)
    upstream = torch.randn(n, s, b, generator=gen).to(device)

    def run(compose) -> tuple[torch.Tensor, ...]:
        logits = logits0.clone().requires_grad_(True)
        bank = bank0.clone().requires_grad_(True)
        top, indices = logits.topk(k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        out = compose(bank, indices, weights)
        grads = torch.autograd.grad((out * upstream).sum(), [bank, weights, logits])
        return (out.detach(), *grads, indices)

    def peft_formula(bank, indices, weights):
        return torch.stack([(weights[a].unsqueeze(-1) * bank[a][indices[a]]).sum(-2) for a in range(n)])

    out, g_bank, g_weights, g_logits, indices = run(compose_subvectors)
    ref_out, ref_bank, ref_weights, ref_logits, _ = run(peft_formula)
    assert rel_err(out, ref_out) < TOL
    assert rel_err(g_bank, ref_bank) < TOL
    assert rel_err(g_weights, ref_weights) < TOL
    assert rel_err(g_logits, ref_logits) < TOL
    # Only the top-k logits of each sub-vector receive gradient, and each of them does.
    in_topk = torch.zeros_like(g_logits, dtype=torch.bool).scatter(-1, indices, True)
    assert torch.count_nonzero(g_logits[~in_topk]) == 0
    assert torch.count_nonzero(g_logits[in_topk]) == in_topk.sum()
