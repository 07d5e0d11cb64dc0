"""The engine's own Llama forward (server/vbserve/engine/llama.py) against Hugging Face's, and
bfloat16 against float32.

The engine tests (batch invariance, greedy parity with PEFT on SmolLM2) run through the
fast forward already, since their models are Llamas; these compare it to the Hugging Face
forward directly, at the logits, and state bfloat16's agreement as measured numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import rel_err, tiny_llama
from tests.test_engine import random_adapter
from tests.test_engine_smollm2 import QUESTIONS, chat_ids, smollm2_adapter
from vbserve.engine.model_runner import ModelRunner
from vbserve.model.loader import cpu_has_bfloat16, resolve_dtype
from vbserve.vblora.compose import compose_adapters
from vbserve.vblora.layer import write_adapter_slot

# bfloat16 against float32 on SmolLM2, measured (docs/engine.md): max relative error of a
# row's logits 0.094 (median 0.017), top-1 agreement 129 of 136 (0.949). Bounds with a margin.
BF16_MAX_REL_ERR = 0.12
BF16_MIN_TOP1 = 0.93
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def runner_with_adapters(model, adapters, *, fast_path: bool = True, rows: int = 8) -> ModelRunner:
    """A runner over `model` with adapter i in slot i."""
    runner = ModelRunner(model, max_rows=rows, max_len=128, num_adapter_slots=4, max_rank=8, fast_path=fast_path)
    dtype = next(model.parameters()).dtype
    for slot, adapter in enumerate(adapters):
        mats = compose_adapters([adapter], dtype=dtype)
        write_adapter_slot(runner.layers, slot, {n: (a[0], b[0]) for n, (a, b) in mats.items()})
    return runner


def prefill_then_decode(runner: ModelRunner, ids: torch.Tensor, slots: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Logits of a prefill of `ids` (N, L) and of `steps` decode steps fed the first run's
    own greedy tokens (teacher-forced by `feed`, when given, so two runs see one sequence)."""
    n, length = ids.shape
    out = [runner.forward(0, ids, torch.arange(length).repeat(n, 1), torch.full((n,), length - 1), slots)]
    for i in range(steps):
        nxt = out[-1].argmax(-1, keepdim=True)
        out.append(runner.decode(nxt, torch.full((n, 1), length + i), slots))
    return out


def test_fast_forward_gives_hugging_faces_logits_with_mixed_adapters():
    model = tiny_llama(seed=7)
    adapters = [random_adapter(model, seed=s, targets=ALL_MODULES, r=2 + s) for s in range(3)]
    fast = runner_with_adapters(copy.deepcopy(model), adapters)
    hf = runner_with_adapters(copy.deepcopy(model), adapters, fast_path=False)
    assert fast.fast is not None and hf.fast is None
    ids = torch.randint(0, 256, (5, 9), generator=torch.Generator().manual_seed(1))
    slots = torch.tensor([0, -1, 2, 1, 0])
    ours, ref = prefill_then_decode(fast, ids, slots, 6), prefill_then_decode(hf, ids, slots, 6)
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert rel_err(a, b) < 1e-5, step
        assert torch.equal(a.argmax(-1), b.argmax(-1)), step
    # The adapters act through the fused projections' slices: a row's logits move with its slot.
    base = prefill_then_decode(fast, ids, torch.full((5,), -1), 0)[0]
    assert rel_err(ours[0][[0, 2, 3, 4]], base[[0, 2, 3, 4]]) > 1e-3
    assert rel_err(ours[0][1], base[1]) < 1e-6


def test_fused_projections_share_the_models_weights():
    model = tiny_llama(seed=3)
    runner = ModelRunner(model, max_rows=2, max_len=32, num_adapter_slots=2, max_rank=4)
    block, attn = runner.fast.blocks[0], model.model.layers[0].self_attn
    assert attn.q_proj.base.weight.data_ptr() == block.qkv_weight.data_ptr()
    assert attn.v_proj.base.weight.untyped_storage().data_ptr() == block.qkv_weight.untyped_storage().data_ptr()


def test_a_model_the_fast_forward_does_not_cover_runs_hugging_faces():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, attention_bias=True,
    )  # fmt: skip
    runner = ModelRunner(LlamaForCausalLM(cfg).eval(), max_rows=2, max_len=16, num_adapter_slots=1, max_rank=2)
    assert runner.fast is None
    logits = runner.forward(
        0, torch.tensor([[1, 2, 3]]), torch.arange(3).view(1, 3), torch.tensor([2]), torch.tensor([-1])
    )
    assert logits.shape == (1, 64) and logits.dtype == torch.float32


def test_auto_dtype_serves_bfloat16_where_the_cpu_has_it_and_trains_in_float32():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_bfloat16() else torch.float32)
    assert resolve_dtype("auto", cpu, training=True) == torch.float32
    assert resolve_dtype("float32", cpu) == torch.float32


@pytest.mark.smollm2
def test_bfloat16_logits_agree_with_float32_on_smollm2(smollm2):
    """bfloat16 weights, KV cache and adapters (composed in float32, then cast), float32
    logits, against float32: 8 chat prompts, half the rows with an adapter, a prefill and 16
    decode steps on float32's greedy tokens. Measured: see docs/engine.md."""
    tok = smollm2.tokenizer
    prompts = [chat_ids(tok, q) for q in [*QUESTIONS, "Name a colour.", "Count to five.", "Say hello."]]
    width = max(map(len, prompts))
    # Left-aligned prompts padded with their own last token (no row attends to another's).
    ids = torch.tensor([p + [p[-1]] * (width - len(p)) for p in prompts])
    adapters = [smollm2_adapter(smollm2.model, seed=s) for s in range(2)]
    slots = torch.tensor([0, -1, 1, -1, 0, -1, 1, -1])
    f32 = runner_with_adapters(copy.deepcopy(smollm2.model), adapters)
    bf16 = runner_with_adapters(copy.deepcopy(smollm2.model).to(torch.bfloat16), adapters)
    ref = prefill_then_decode(f32, ids, slots, 16)
    n, length = ids.shape
    ours = [bf16.forward(0, ids, torch.arange(length).repeat(n, 1), torch.full((n,), length - 1), slots)]
    for i, step in enumerate(ref[:-1]):  # fed float32's tokens
        ours.append(bf16.decode(step.argmax(-1, keepdim=True), torch.full((n, 1), length + i), slots))
    errors = [rel_err(a[row], b[row]) for a, b in zip(ours, ref, strict=True) for row in range(n)]
    top1 = sum(int(a[row].argmax() == b[row].argmax()) for a, b in zip(ours, ref, strict=True) for row in range(n))
    print(f"bf16 vs fp32: max rel err {max(errors):.4f}, median {sorted(errors)[len(errors) // 2]:.4f}, "
          f"top-1 agreement {top1}/{len(errors)}")  # fmt: skip
    assert all(o.dtype == torch.float32 for o in ours)
    assert max(errors) < BF16_MAX_REL_ERR
    assert top1 / len(errors) >= BF16_MIN_TOP1
