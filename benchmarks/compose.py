"""Compose time: our batched top-k gather against PEFT's own per-layer composition.

What is timed, for n adapters with SmolLM2-135M shapes (30 layers; q/o 576->576, k/v
576->192, gate/up 576->1536, down 1536->576), r=4, b=64, h=256, k=2:

- ours: `vbserve.vblora.compose.compose_adapters(adapters)`, i.e. stacking the n stored
  adapters and composing A and B of every targeted module of all of them in one call;
- PEFT: `for adapter: for module: module._get_lora_matrices(adapter)` on a real PEFT
  VB-LoRA model holding the same n adapters -- PEFT's own code, the path its forward and
  merge take (top-k of the logits, softmax, weighted sum of bank rows, A/B reshapes).

The PEFT model wraps a LlamaForCausalLM with SmolLM2's linear shapes and a 64-token
vocabulary (the embeddings play no part in composition, and SmolLM2's 49152 x 576 would
only cost memory). Our adapters are imported from PEFT's state dicts, and the benchmark
checks that both sides produce the same matrices before timing them. Ours and PEFT are
timed alternately, rep by rep, so load on the machine hits both alike.

    .venv/bin/python benchmarks/compose.py [--sizes 1,8,32,128] [--reps 5] [--threads N]

On a shared machine, other processes make torch's spinning worker threads wait on each
other; PEFT's thousands of small ops suffer from that far more than our few large ones.
`--threads 1` gives figures that such load distorts much less.

Prints a table and, as its last line, a JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vbserve.vblora.compose import compose_adapters
from vbserve_store import VBLoRAAdapter
from vbserve_store.peft_io import import_peft

R, B, H, K = 4, 64, 256, 2
LAYERS = 30
SMOLLM2_LINEARS = {  # module -> (in_features, out_features)
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (576, 192),
    "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (576, 1536),
    "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}
TARGETS = {"q,v": ["q_proj", "v_proj"], "all-linear": "all-linear"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def smollm2_standin(num_layers: int = LAYERS, vocab_size: int = 64):
    """A random LlamaForCausalLM whose decoder layers have SmolLM2-135M's exact shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=num_layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    for name, (fan_in, fan_out) in SMOLLM2_LINEARS.items():
        mod = model.get_submodule(f"model.layers.0.{name}")
        assert (mod.in_features, mod.out_features) == (fan_in, fan_out), name
    return model


def peft_with_adapters(base, targets, n: int, *, save_only_topk_weights: bool = False):
    """One PEFT VB-LoRA model holding adapters `a0..a{n-1}` (PEFT's own random init:
    logits ~ N(0, 0.1), bank ~ U(-0.02, 0.02)), each with its own bank."""
    from peft import VBLoRAConfig, get_peft_model

    def config():
        return VBLoRAConfig(
            r=R,
            vector_length=B,
            num_vectors=H,
            topk=K,
            target_modules=targets,
            save_only_topk_weights=save_only_topk_weights,
        )

    torch.manual_seed(1)
    model = get_peft_model(base, config(), adapter_name="a0")
    for i in tqdm(range(1, n), desc="PEFT add_adapter", file=sys.stderr, leave=False):
        model.add_adapter(f"a{i}", config())
    return model.eval()


def peft_modules(model) -> dict[str, torch.nn.Module]:
    """PEFT's VB-LoRA layers by the base model's module name."""
    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if hasattr(m, "_get_lora_matrices") and hasattr(m, "vblora_logits_A")
    }


def import_from_peft(model, modules: dict[str, torch.nn.Module], adapter_name: str) -> VBLoRAAdapter:
    """Our adapter from one PEFT adapter's tensors, keyed as PEFT's `save_pretrained`
    writes them (taken from the layers directly: `get_peft_model_state_dict` walks the
    whole state dict of all n adapters on every call)."""
    cfg = model.peft_config[adapter_name]
    config = {"peft_type": "VBLORA", "r": cfg.r, "num_vectors": cfg.num_vectors}
    config |= {"vector_length": cfg.vector_length, "topk": cfg.topk}
    tensors = {"base_model.vblora_vector_bank": model.base_model.vblora_vector_bank[adapter_name].detach()}
    for name, module in modules.items():
        for mat in ("A", "B"):
            logits = getattr(module, f"vblora_logits_{mat}")[adapter_name].detach()
            tensors[f"base_model.model.{name}.vblora_logits_{mat}"] = logits
    return import_peft(config, tensors)


def peft_compose(modules: dict[str, torch.nn.Module], names: list[str]) -> dict[str, list]:
    """PEFT's path: every adapter, every layer, `_get_lora_matrices`."""
    out: dict[str, list] = {}
    for adapter_name in names:
        for module_name, module in modules.items():
            out.setdefault(module_name, []).append(module._get_lora_matrices(adapter_name))
    return out


def max_rel_err(ours: dict, peft: dict) -> float:
    worst = 0.0
    for name, pairs in peft.items():
        a, b = ours[name]
        for i, (pa, pb) in enumerate(pairs):
            for x, y in ((a[i], pa), (b[i], pb)):
                worst = max(worst, float((x.double() - y.double()).norm() / y.double().norm()))
    return worst


def time_pair(ours: Callable[[], object], peft: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median ms of each, alternating them rep by rep after one warm-up of each."""
    ours()
    peft()
    t_ours, t_peft = [], []
    for _ in range(reps):
        for fn, acc in ((ours, t_ours), (peft, t_peft)):
            start = time.perf_counter()
            fn()
            acc.append((time.perf_counter() - start) * 1e3)
    return statistics.median(t_ours), statistics.median(t_peft)


def bench_config(config_name: str, targets, sizes: list[int], reps: int, num_layers: int) -> list[tuple]:
    """Rows (n, config, ours ms, PEFT ms, speedup) for one target configuration."""
    log(f"[{config_name}] building PEFT model with {max(sizes)} adapters over the SmolLM2-shaped stand-in")
    model = peft_with_adapters(smollm2_standin(num_layers), targets, max(sizes))
    modules = peft_modules(model)
    names = [f"a{i}" for i in range(max(sizes))]
    adapters = [import_from_peft(model, modules, n) for n in tqdm(names, desc="import", file=sys.stderr, leave=False)]
    log(f"[{config_name}] {len(modules)} modules, {adapters[0].config.num_subvectors} sub-vectors per adapter")
    rows = []
    with torch.inference_mode():
        check = min(8, max(sizes))
        err = max_rel_err(compose_adapters(adapters[:check]), peft_compose(modules, names[:check]))
        log(f"[{config_name}] max relative error ours vs PEFT over {check} adapters: {err:.2e}")
        if err > 1e-5:
            raise SystemExit(f"ours and PEFT disagree ({err:.2e}); not timing a wrong result")
        for n in tqdm(sizes, desc=f"{config_name} timing", file=sys.stderr, leave=False):
            ours_ms, peft_ms = time_pair(
                lambda n=n: compose_adapters(adapters[:n]),
                lambda n=n: peft_compose(modules, names[:n]),
                reps if n < 128 else min(reps, 3),
            )
            rows.append((n, config_name, ours_ms, peft_ms, peft_ms / ours_ms))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,8,32,128", help="comma-separated adapter counts")
    parser.add_argument("--reps", type=int, default=5, help="timed reps per size (at most 3 for n >= 128)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (30 in SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]

    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    load_before = os.getloadavg()[0]
    rows = []
    for config_name, targets in TARGETS.items():
        rows += bench_config(config_name, targets, sizes, args.reps, args.layers)

    print(
        f"compose A/B of every targeted module: SmolLM2-135M shapes ({args.layers} layers), "
        f"r={R} b={B} h={H} k={K}, torch threads={torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs, 1-min load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after"
    )
    print(f"{'adapters':>8}  {'config':<10}  {'ours ms':>9}  {'PEFT ms':>9}  {'speedup':>8}  {'ours ms/adapter':>15}")
    headline = {}
    for n, config_name, ours_ms, peft_ms, speedup in rows:
        print(f"{n:>8}  {config_name:<10}  {ours_ms:>9.2f}  {peft_ms:>9.2f}  {speedup:>7.1f}x  {ours_ms / n:>15.3f}")
        key = config_name.replace(",", "").replace("-", "_")
        headline[f"speedup_at_{n}_{key}"] = round(speedup, 1)
        headline[f"ours_ms_at_{n}_{key}"] = round(ours_ms, 2)
        headline[f"peft_ms_at_{n}_{key}"] = round(peft_ms, 2)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
