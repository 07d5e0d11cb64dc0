"""Our import of PEFT VB-LoRA checkpoints gives PEFT's logits; our exports load in PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from tests.conftest import random_peft_vblora, rel_err, tiny_llama
from vbserve.vblora.compose import compose_adapters
from vbserve.vblora.layer import AdapterRouting, wrap_linear_layers, write_adapter_slot
from vbserve.vblora.lora_export import export_lora
from vbserve_store.peft_io import load_peft_dir, save_peft_dir, write_checkpoint_dir

CONFIGS = [
    dict(r=4, b=16, h=32, k=2, targets=["q_proj", "v_proj"]),
    dict(r=2, b=32, h=256, k=3, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    dict(r=8, b=16, h=300, k=1, targets=["down_proj", "o_proj"]),
]


def serve_logits(base, adapter, input_ids):
    """Logits of `base` with `adapter` applied through our multi-adapter layers."""
    model = copy.deepcopy(base)
    routing = AdapterRouting()
    layers = wrap_linear_layers(model, routing, num_slots=2, max_rank=8)
    adapter.config.check_compatible({n: (m.base.in_features, m.base.out_features) for n, m in layers.items()})
    mats = compose_adapters([adapter])
    write_adapter_slot(layers, 1, {n: (a[0], b[0]) for n, (a, b) in mats.items()})
    routing.slots = torch.ones(input_ids.shape[0], dtype=torch.long)
    with torch.no_grad():
        return model(input_ids).logits


def check_parity(base, peft_model, tmp_path, topk_only, input_ids, tol=1e-5):
    with torch.no_grad():
        ref = peft_model(input_ids).logits
        base_logits = base(input_ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = load_peft_dir(tmp_path / "peft")
    ours = serve_logits(base, adapter, input_ids)
    # Relative error on the adapter's effect, not just on the logits (which the base dominates).
    assert rel_err(ref - base_logits, base_logits) > 1e-3, "the adapter must move the logits"
    assert rel_err(ours, ref) < tol
    assert rel_err(ours - base_logits, ref - base_logits) < 100 * tol

    # export -> PEFT load -> same logits, both export modes
    for export_topk in (True, False):
        save_peft_dir(adapter, tmp_path / f"export-{export_topk}", save_only_topk_weights=export_topk)
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / f"export-{export_topk}").eval()
        with torch.no_grad():
            assert rel_err(reloaded(input_ids).logits, ref) < tol

    # plain LoRA export -> PEFT LoRA load -> same logits
    write_checkpoint_dir(tmp_path / "lora", *export_lora(adapter))
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert lora.peft_config["default"].peft_type.value == "LORA"
    with torch.no_grad():
        assert rel_err(lora(input_ids).logits, ref) < tol
    return adapter


@pytest.mark.parametrize("topk_only", [False, True], ids=["logits", "topk"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["qv-r4-b16-h32-k2", "all-r2-b32-h256-k3", "od-r8-b16-h300-k1"])
def test_tiny_llama_parity(cfg, topk_only, tmp_path):
    base = tiny_llama(seed=1)
    peft_model = random_peft_vblora(base, seed=2, save_only_topk_weights=topk_only, **cfg)
    input_ids = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(3))
    adapter = check_parity(base, peft_model, tmp_path, topk_only, input_ids)
    assert adapter.config.r == cfg["r"] and adapter.config.topk == cfg["k"]
    assert adapter.indices.dtype == (torch.uint8 if cfg["h"] <= 256 else torch.int16)


@pytest.mark.smollm2
@pytest.mark.parametrize(
    "cfg",
    [dict(r=4, b=64, h=256, k=2, targets=["q_proj", "v_proj"]), dict(r=2, b=32, h=64, k=2, targets="all-linear")],
    ids=["qv", "all-linear"],
)
def test_smollm2_parity(smollm2, cfg, tmp_path):
    base = smollm2.model
    peft_model = random_peft_vblora(base, seed=5, save_only_topk_weights=True, bank_scale=0.1, **cfg)
    input_ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(6))
    check_parity(base, peft_model, tmp_path, True, input_ids)
