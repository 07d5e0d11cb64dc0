"""Adapter size on the wire and the cost of storing it in float16.

One VB-LoRA adapter for SmolLM2-135M, targets q_proj and v_proj (30 layers), r=4, b=64,
h=256, k=2, made by PEFT over a stand-in model with SmolLM2's linear shapes and imported
from PEFT's own `save_pretrained` output. Measured side by side:

- our blob (`encode_adapter`) in float16 and float32, with and without its bank;
- PEFT's `save_only_topk_weights=True` `adapter_model.safetensors` for the same adapter
  (and, for scale, PEFT's default checkpoint with full logits);
- what float16 storage costs in accuracy: relative error of every composed A and B
  against the float32 adapter and, on the real SmolLM2-135M (skip with --no-model), of the
  logits and of the adapter's effect on them (logits minus base logits).

Targets (issue #2): float16 without bank <= 16 KB, with bank <= 64 KB (1 KB = 1024 bytes).

    .venv/bin/python benchmarks/adapter_size.py [--no-model]

Prints tables and, as its last line, a JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compose import B, H, K, R, log, smollm2_standin
from tests.conftest import random_peft_vblora
from vbserve.vblora.compose import compose_adapters
from vbserve.vblora.layer import AdapterRouting, wrap_linear_layers, write_adapter_slot
from vbserve_store import VBLoRAAdapter, encode_adapter, encode_bank
from vbserve_store.peft_io import WEIGHTS_NAME, load_peft_dir

TARGETS = ["q_proj", "v_proj"]
KB = 1024
TARGET_NO_BANK, TARGET_WITH_BANK = 16 * KB, 64 * KB
PROMPTS = [
    "The history of the printing press begins in",
    "def fibonacci(n):\n    ",
    "Q: What is the capital of France?\nA:",
]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


def header_bytes(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


def make_adapter(tmp: Path) -> tuple[VBLoRAAdapter, dict[str, int]]:
    """The adapter (from PEFT's top-k checkpoint) and PEFT's checkpoint sizes.

    Logits ~ N(0, 1) (so the top-k weights are far from uniform, as after training) and
    bank ~ U(-0.02, 0.02), PEFT's own bank initialisation range."""
    standin = smollm2_standin()
    sizes = {}
    for topk_only in (True, False):
        peft = random_peft_vblora(
            standin, r=R, b=B, h=H, k=K, targets=TARGETS, seed=7, save_only_topk_weights=topk_only, bank_scale=0.04
        )
        peft.save_pretrained(tmp / f"peft-{topk_only}")
        sizes["topk" if topk_only else "logits"] = (tmp / f"peft-{topk_only}" / WEIGHTS_NAME).stat().st_size
    return load_peft_dir(tmp / "peft-True"), sizes


def composed_errors(adapter: VBLoRAAdapter, dtype: torch.dtype) -> tuple[float, float]:
    """Relative error of all A (resp. all B) of the `dtype` copy against float32."""
    ref = compose_adapters([adapter])
    low = compose_adapters([adapter.to(dtype)])
    a_ref = torch.cat([a.flatten() for a, _ in ref.values()])
    b_ref = torch.cat([b.flatten() for _, b in ref.values()])
    a_low = torch.cat([a.flatten() for a, _ in low.values()])
    b_low = torch.cat([b.flatten() for _, b in low.values()])
    return rel_err(a_low, a_ref), rel_err(b_low, b_ref)


def smollm2_logits(adapters: dict[str, VBLoRAAdapter]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Base logits and, per adapter, logits with it applied through our serving layers."""
    from vbserve.model.loader import load_model

    cache = Path(os.environ.get("VBSERVE_MODEL_CACHE_DIR", Path.home() / ".cache" / "vbserve" / "models"))
    log("loading SmolLM2-135M")
    loaded = load_model(cache_dir=cache)
    prompts = [loaded.tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    model = copy.deepcopy(loaded.model)
    routing = AdapterRouting()
    layers = wrap_linear_layers(model, routing, num_slots=len(adapters), max_rank=R)

    def run() -> torch.Tensor:
        """Every prompt alone (no padding to get wrong), all positions concatenated."""
        return torch.cat([model(ids).logits[0] for ids in prompts])

    with torch.no_grad():
        base = run()
        out = {}
        for slot, (name, adapter) in enumerate(adapters.items()):
            adapter.config.check_compatible({n: (m.base.in_features, m.base.out_features) for n, m in layers.items()})
            mats = compose_adapters([adapter])
            write_adapter_slot(layers, slot, {n: (a[0], b[0]) for n, (a, b) in mats.items()})
            routing.slots = torch.tensor([slot])
            out[name] = run()
            routing.slots = None
    return base, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-model", action="store_true", help="skip the logits check on the real SmolLM2")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        log("building the PEFT adapter over the SmolLM2-shaped stand-in")
        adapter, peft_sizes = make_adapter(Path(tmp))
    cfg = adapter.config
    f16 = adapter.to(torch.float16)
    blobs = {
        ("ours", "float16", "without bank"): encode_adapter(f16, include_bank=False),
        ("ours", "float16", "with bank"): encode_adapter(f16),
        ("ours", "float32", "without bank"): encode_adapter(adapter, include_bank=False),
        ("ours", "float32", "with bank"): encode_adapter(adapter),
        ("ours", "float16", "bank alone"): encode_bank(f16.bank),
    }
    no_bank, with_bank = blobs["ours", "float16", "without bank"], blobs["ours", "float16", "with bank"]
    config_json = json.dumps(cfg.to_json(), separators=(",", ":")).encode()

    print(
        f"SmolLM2-135M, targets {','.join(TARGETS)} x {len(cfg.modules) // len(TARGETS)} layers, "
        f"r={R} b={B} h={H} k={K}: {cfg.num_subvectors} sub-vectors"
    )
    print(f"{'artifact':<66}  {'bytes':>9}  {'KB':>8}  {'header B':>8}")
    for (who, dtype, what), blob in blobs.items():
        print(f"{who + ' ' + dtype + ', ' + what:<66}  {len(blob):>9}  {len(blob) / KB:>8.2f}  {header_bytes(blob):>8}")
    for mode, label in (("topk", "save_only_topk_weights=True"), ("logits", "default (full logits)")):
        size = peft_sizes[mode]
        print(f"{'PEFT float32, ' + label + ', ' + WEIGHTS_NAME:<66}  {size:>9}  {size / KB:>8.2f}  {'':>8}")
    payload = len(no_bank) - header_bytes(no_bank)
    print(
        f"float16 without bank = {payload} B of tensors (indices uint8 {cfg.num_subvectors}x{K}, "
        f"weights float16 {cfg.num_subvectors}x{K - 1}) + {header_bytes(no_bank)} B header, of which "
        f"{len(config_json)} B is the config JSON listing {len(cfg.modules)} modules "
        f"({len(zlib.compress(config_json, 9))} B if zlib-compressed)"
    )
    print(
        f"targets: without bank {len(no_bank) / KB:.2f} KB <= 16 KB: {'met' if len(no_bank) <= TARGET_NO_BANK else 'MISSED'}; "
        f"with bank {len(with_bank) / KB:.2f} KB <= 64 KB: {'met' if len(with_bank) <= TARGET_WITH_BANK else 'MISSED'}"
    )

    print()
    print(
        f"{'copy vs float32':<16}  {'rel err A':>10}  {'rel err B':>10}  {'rel err logits':>14}  {'rel err delta':>13}"
    )
    copies = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    errs = {name: composed_errors(adapter, dtype) for name, dtype in copies.items()}
    logit_errs: dict[str, tuple[float, float]] = {}
    effect = None
    if not args.no_model:
        base, logits = smollm2_logits({"float32": adapter, **{n: adapter.to(d) for n, d in copies.items()}})
        ref = logits["float32"]
        effect = float((ref - base).double().norm() / base.double().norm())
        for name in copies:
            logit_errs[name] = (rel_err(logits[name], ref), rel_err(logits[name] - base, ref - base))
    for name, (ea, eb) in errs.items():
        el, ed = logit_errs.get(name, (float("nan"), float("nan")))
        print(f"{name:<16}  {ea:>10.2e}  {eb:>10.2e}  {el:>14.2e}  {ed:>13.2e}")
    if effect is not None:
        print(
            f"(logits on SmolLM2-135M over {len(PROMPTS)} prompts; the float32 adapter moves them by "
            f"{effect:.2e} relative to the base, 'delta' = error on that movement)"
        )

    headline = {
        "ours_f16_no_bank_bytes": len(no_bank),
        "ours_f16_with_bank_bytes": len(with_bank),
        "ours_f32_with_bank_bytes": len(blobs["ours", "float32", "with bank"]),
        "peft_topk_bytes": peft_sizes["topk"],
        "peft_topk_over_ours_f16_with_bank": round(peft_sizes["topk"] / len(with_bank), 2),
        "target_no_bank_16kb_met": len(no_bank) <= TARGET_NO_BANK,
        "target_with_bank_64kb_met": len(with_bank) <= TARGET_WITH_BANK,
        "f16_rel_err_A": float(f"{errs['float16'][0]:.3g}"),
        "f16_rel_err_B": float(f"{errs['float16'][1]:.3g}"),
    }
    if logit_errs:
        headline["f16_rel_err_logits"] = float(f"{logit_errs['float16'][0]:.3g}")
        headline["f16_rel_err_logit_delta"] = float(f"{logit_errs['float16'][1]:.3g}")
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
