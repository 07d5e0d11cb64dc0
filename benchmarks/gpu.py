"""The engine on a GPU: multi-adapter decode throughput, torch vs Triton kernels, PEFT, compose
and cold-adapter latency, on random-weight Llama-shaped models built on the device.

Models (bfloat16 on CUDA, float32 on CPU; random weights, no download): Llama-3.2-1B shapes
(hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 128256) and Llama-3.1-8B shapes (hidden
4096, 32 layers, 32/8 heads, MLP 14336); `--tiny`: hidden 64, 2 layers, vocab 256. Adapters:
VB-LoRA r=16 on q, k, v, o of every layer (b=256, h=256, k=2; tiny: b=16, h=32), random.

What is timed, per model:
- decode tok/s at batch 64 (`--batch`), through the engine's decode step, eagerly
  (`ModelRunner.decode` with its graphs off: one token per row, greedy, the argmax copied to
  the CPU each step as the engine does), after a 128-token prefill of every row, for: base only (no adapter);
  64 rows on 1 adapter; 64 distinct adapters; 512 distinct adapters (512 slots, each step
  the next 64, so all 512 are read every 8 steps); each with the torch and the Triton kernels
  (`VBSERVE_KERNELS`), in alternating rounds, median of `--rounds`;
- CUDA graphs: the same decode step captured per bucket and replayed (`DecodeGraphs`), base
  and `batch` distinct adapters, each kernel variant, in the same rounds; and the ratio
  graphs / eager. On CPU there are no graphs: that is reported, and the eager figures are
  the same static (padded, length-bucketed) step's;
- PEFT switching adapters per request: PEFT's VB-LoRA model with 8 adapters, requests one
  at a time (`set_adapter`, then HF `generate` of the same new tokens from a 128-token
  prompt), as a server without multi-adapter batching would serve them;
- compose latency: 512 stored adapters composed into the slot tables in one call
  (`compose_into_slots`), torch vs Triton;
- cold-adapter TTFT: an adapter put in a store (SQLite), then through the engine's adapter
  manager (fetch, compose, slot write) and a 128-token prefill to the first token; and the
  same again warm (composed, in its slot);
- peak memory (CUDA: max allocated; CPU: peak RSS);
- before timing, the relative error between one decode step's logits under the two kernel
  variants (64 distinct adapters): the kernels' correctness on the real shapes and dtype.

    python benchmarks/gpu.py                      # 1B and 8B on CUDA (benchmarks/gpu_check.sh)
    python benchmarks/gpu.py --device cpu --tiny  # the same code on CPU in about a minute

On CPU the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here before
triton is imported): slow, there to prove the script, not to measure it.

Prints a table per model and, as its last line, a JSON object of every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 16
PEFT_REQUESTS = 8
GRAPHS_NOTE = "not available: CUDA graphs need CUDA; the eager figures ran the same static bucketed step"


_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"{time.perf_counter() - _START:7.1f}s {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 256 if shape == "tiny" else 128256
    heads = SHAPES[shape]["num_attention_heads"]
    config = LlamaConfig(
        **SHAPES[shape], num_key_value_heads=max(1, heads // 4), vocab_size=vocab, max_position_embeddings=4096
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype, on the device: no float32 copy of 8B weights
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def adapter_config(model, tiny: bool):
    from vbserve_store import AdapterConfig, ModuleSpec

    modules = tuple(
        ModuleSpec(name, mod.in_features, mod.out_features)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.endswith(TARGETS)
    )
    b, h = (16, 32) if tiny else (256, 256)
    return AdapterConfig(modules, r=RANK, vector_length=b, num_vectors=h, topk=2)


def random_adapters(config, count: int, seed: int = 0) -> list:
    """Random stored adapters: bank ~ U(-0.5, 0.5) / 8, top-k weights a softmax of random
    logits (built directly: the (S, h) logits of an 8B-shaped adapter would be 14M floats)."""
    from vbserve_store import VBLoRAAdapter, index_dtype_for

    gen = torch.Generator().manual_seed(seed)
    s, h, b, k = config.num_subvectors, config.num_vectors, config.vector_length, config.topk
    out = []
    for _ in range(count):
        bank = (torch.rand(h, b, generator=gen) - 0.5) / 8
        indices = torch.randint(0, h, (s, k), generator=gen).to(index_dtype_for(h))
        weights = torch.softmax(torch.randn(s, k, generator=gen), dim=-1)
        out.append(VBLoRAAdapter(config, bank, indices, weights))
    return out


def peft_switching(model, config, prompt: torch.Tensor, new_tokens: int) -> float:
    """tok/s of PEFT's VB-LoRA model serving PEFT_REQUESTS requests one at a time, each
    with its own adapter. Returns the model unwrapped (PEFT's layers removed)."""
    from peft import VBLoRAConfig, get_peft_model

    peft_cfg = VBLoRAConfig(
        r=config.r,
        target_modules=list(TARGETS),
        num_vectors=config.num_vectors,
        vector_length=config.vector_length,
        topk=config.topk,
    )
    peft_model = get_peft_model(model, peft_cfg, adapter_name="a0")
    for i in range(1, PEFT_REQUESTS):
        peft_model.add_adapter(f"a{i}", peft_cfg)
    peft_model.eval()

    def serve(requests: int) -> None:
        for i in range(requests):
            peft_model.set_adapter(f"a{i}")
            peft_model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    device = prompt.device
    with torch.inference_mode():
        timed(device, lambda: serve(1))  # warm-up
        seconds = timed(device, lambda: serve(PEFT_REQUESTS))
    peft_model.unload()  # back to plain nn.Linear layers, for our runner to wrap
    return PEFT_REQUESTS * new_tokens / seconds


class DecodeBench:
    """The engine's forward on `batch` rows, prefilled once, then decoded per scenario."""

    def __init__(self, runner, batch: int, prompt_len: int, steps: int) -> None:
        self.runner, self.batch, self.prompt_len, self.steps = runner, batch, prompt_len, steps
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(1, runner.model.config.vocab_size, (batch, prompt_len), generator=gen)
        positions = torch.arange(prompt_len).expand(batch, -1).contiguous()
        runner.forward(0, ids, positions, torch.full((batch,), prompt_len - 1), torch.full((batch,), -1))
        self.first_ids = ids[:, -1:]

    def slots(self, scenario: str, step: int) -> torch.Tensor:
        """Each row's slot in decode step `step`: -1 = base only."""
        rows = torch.arange(self.batch)
        if scenario == "base":
            return torch.full((self.batch,), -1)
        if scenario == "1 adapter":
            return torch.zeros(self.batch, dtype=torch.long)
        distinct = int(scenario.split()[0])  # "N distinct": the next `batch` of N slots each step
        return (step * self.batch + rows) % distinct

    def logits(self, scenario: str) -> torch.Tensor:
        """One decode step's logits (the same KV position every time, so repeatable)."""
        positions = torch.full((self.batch, 1), self.prompt_len)
        index = torch.zeros(self.batch, dtype=torch.long)
        return self.runner.forward(0, self.first_ids, positions, index, self.slots(scenario, 0))

    def tok_s(self, scenario: str) -> float:
        def decode(steps: int) -> None:
            ids = self.first_ids
            for step in range(steps):
                positions = torch.full((self.batch, 1), self.prompt_len + step)
                logits = self.runner.decode(ids, positions, self.slots(scenario, step))
                ids = logits.argmax(-1, keepdim=True).cpu()

        device = self.runner.device
        timed(device, lambda: decode(2))  # warm-up (Triton's compilation, the graphs' capture)
        return self.batch * self.steps / timed(device, lambda: decode(self.steps))


def fill_slots(runner, adapters: list, variant: str) -> float:
    """Compose `adapters` into slots 0..n-1 of every targeted layer; returns the seconds."""
    from vbserve.vblora import ops
    from vbserve.vblora.compose import compose_into_slots

    config = adapters[0].config
    tables = {}
    for m in config.modules:
        layer = runner.layers[m.name]
        if layer.lora_a is None:
            # A first slot write allocates the layer's tables and sets the rank its forward
            # reads (r: every adapter here has rank r); compose_into_slots then fills them.
            layer.set_slot(0, torch.zeros(config.r, m.in_features), torch.zeros(m.out_features, config.r))
        tables[m.name] = (layer.lora_a, layer.lora_b)
    ops.use_kernels(variant)
    return timed(runner.device, lambda: compose_into_slots(adapters, tables, torch.arange(len(adapters))))


def cold_ttft(runner, base_model, config, prompt_len: int) -> tuple[float, float]:
    """(cold, warm) seconds from asking for an adapter to the first token of a prompt."""
    from vbserve.engine.adapters import AdapterCache, SlotTable
    from vbserve.engine.contract import AdapterRef
    from vbserve_store.store import SQLiteAdapterStore

    (adapter,) = random_adapters(config, 1, seed=99)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteAdapterStore(Path(tmp) / "adapters.db")
        store.put("bench", "cold", adapter)
        cache = AdapterCache(store, base_model, cache_bytes=1 << 30, device=runner.device, dtype=runner.dtype)
        slots = SlotTable(runner.layers, cache)
        ids = torch.randint(1, base_model.vocab_size, (1, prompt_len))
        positions = torch.arange(prompt_len).view(1, -1)

        def first_token() -> None:
            key = cache.resolve(AdapterRef("bench", "cold"))
            cache.want(key)
            while (state := cache.state(key)) == "loading":
                time.sleep(0.0005)
            if state != "ready":
                raise RuntimeError(f"adapter failed to load: {state}")
            slot = slots.acquire(key)
            cache.unwant(key)
            logits = runner.forward(0, ids, positions, torch.tensor([prompt_len - 1]), torch.tensor([slot]))
            logits.argmax(-1).cpu()
            slots.release(slot)

        cold = timed(runner.device, first_token)
        warm = timed(runner.device, first_token)
        store.close()
    return cold, warm


def bench_model(shape: str, args: argparse.Namespace, device: torch.device) -> dict:
    from vbserve.engine.decode_graphs import DecodeGraphs
    from vbserve.engine.model_runner import ModelRunner
    from vbserve.model import BaseModelSpec, module_shapes
    from vbserve.vblora import ops

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(f"[{shape}] building the model")
    model = build_model(shape, device, dtype)
    config = adapter_config(model, args.tiny)
    result: dict = {
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "slots": args.slots,
    }

    prompt = torch.randint(1, model.config.vocab_size, (1, args.prompt_len), device=device)
    if args.skip_peft:
        result["peft_tok_s"] = None
    else:
        log(f"[{shape}] PEFT, {PEFT_REQUESTS} requests one at a time")
        result["peft_tok_s"] = peft_switching(model, config, prompt, args.steps)

    # Described before the runner wraps its layers. Random weights and no tokenizer: no EOS
    # (every benchmark row runs to its step count anyway).
    base_model = BaseModelSpec(
        name=shape,
        module_shapes=module_shapes(model),
        context_length=None,
        max_len=args.prompt_len + args.steps + 8,
        vocab_size=model.config.vocab_size,
        eos_ids=frozenset(),
        max_rank=RANK,
    )
    runner = ModelRunner(
        model,
        max_rows=args.batch,
        max_len=base_model.max_len,
        num_adapter_slots=args.slots,
        max_rank=RANK,
        static_decode=True,  # the captured step's shapes, eager too: graphs vs eager on one step
    )
    # Eager unless a round turns the graphs on (`graphs_for`): one runner, one KV cache.
    graph_device = runner.graphs.device if runner.graphs is not None else None
    runner.graphs = None
    log(f"[{shape}] {args.slots} random adapters, composed into the slots")
    adapters = random_adapters(config, args.slots)
    compose: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            compose[variant].append(fill_slots(runner, adapters, variant))
    result["compose_all_slots_s"] = {v: statistics.median(t) for v, t in compose.items()}
    del adapters

    log(f"[{shape}] decode, batch {args.batch}, {args.rounds} alternating rounds")
    bench = DecodeBench(runner, args.batch, args.prompt_len, args.steps)
    if {"torch", "triton"} <= set(args.variants):
        # Before any timing: the kernels agree on this model (distinct adapters, one step).
        distinct = f"{args.batch} distinct"
        ops.use_kernels("torch")
        reference = bench.logits(distinct)
        ops.use_kernels("triton")
        diff = (bench.logits(distinct) - reference).norm() / reference.norm()
        result["logits_rel_err_triton_vs_torch"] = float(diff)
    runs: dict[str, list[float]] = {}
    graph_runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for variant in args.variants:
            ops.use_kernels(variant)
            for scenario in scenarios(args):
                if scenario == "base" and variant != args.variants[0]:
                    continue  # no adapter: no LoRA kernel runs, the variant changes nothing
                key = "base" if scenario == "base" else f"{scenario} / {variant}"
                runs.setdefault(key, []).append(bench.tok_s(scenario))
                if graph_device is not None and scenario in ("base", f"{args.batch} distinct"):
                    # Fresh graphs per variant: a graph replays the kernels it was captured with.
                    runner.graphs = DecodeGraphs(graph_device)
                    graph_runs.setdefault(key, []).append(bench.tok_s(scenario))
                    runner.graphs = None
    result["decode_tok_s"] = {k: statistics.median(v) for k, v in runs.items()}
    if graph_device is None:
        result["graphs"] = GRAPHS_NOTE
    else:
        result["graphs"] = "measured"
        result["graphs_decode_tok_s"] = {k: statistics.median(v) for k, v in graph_runs.items()}

    log(f"[{shape}] cold-adapter TTFT")
    ops.use_kernels(args.variants[-1])
    cold, warm = cold_ttft(runner, base_model, config, args.prompt_len)
    result["ttft_s"] = {"cold": cold, "warm": warm, "kernels": args.variants[-1]}
    ops.use_kernels("auto")
    result["peak_memory_mib"] = peak_memory_mib(device)
    result["ratios"] = ratios(result["decode_tok_s"], args)
    for key, value in result.get("graphs_decode_tok_s", {}).items():
        result["ratios"][f"graphs / eager ({key})"] = value / result["decode_tok_s"][key]
    del runner, model, bench
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def scenarios(args: argparse.Namespace) -> tuple[str, ...]:
    """base, 1 adapter, `batch` distinct adapters, `slots` distinct (64 and 512 by default)."""
    return ("base", "1 adapter", f"{args.batch} distinct", f"{args.slots} distinct")


def ratios(tok_s: dict[str, float], args: argparse.Namespace) -> dict[str, float]:
    """The issue's targets: distinct/base >= 0.90, 512 within 10% of 64; and Triton / torch."""
    _, _, batch, every = scenarios(args)
    out = {}
    for v in args.variants:
        out[f"{batch} / base ({v})"] = tok_s[f"{batch} / {v}"] / tok_s["base"]
        out[f"{every} / {batch} ({v})"] = tok_s[f"{every} / {v}"] / tok_s[f"{batch} / {v}"]
    if {"torch", "triton"} <= set(args.variants):
        out[f"triton / torch ({batch})"] = tok_s[f"{batch} / triton"] / tok_s[f"{batch} / torch"]
    return out


def print_table(r: dict) -> None:
    print(f"\n## {r['shape']} ({r['dtype']}, batch {r['batch']})\n")
    print("| measurement | value |")
    print("|---|---|")
    for key, value in r["decode_tok_s"].items():
        print(f"| decode tok/s, {key} (eager) | {value:,.1f} |")
    if "graphs_decode_tok_s" in r:
        for key, value in r["graphs_decode_tok_s"].items():
            print(f"| decode tok/s, {key} (CUDA graphs) | {value:,.1f} |")
    else:
        print(f"| decode tok/s, CUDA graphs | {r['graphs']} |")
    peft = "skipped" if r["peft_tok_s"] is None else f"{r['peft_tok_s']:,.1f}"
    print(f"| PEFT tok/s, switching adapters per request ({PEFT_REQUESTS} requests, batch 1) | {peft} |")
    for variant, seconds in r["compose_all_slots_s"].items():
        print(f"| compose {r['slots']} adapters into slots, {variant} (ms) | {seconds * 1e3:,.1f} |")
    ttft = r["ttft_s"]
    print(
        f"| TTFT cold adapter / warm, {ttft['kernels']} (ms) | {ttft['cold'] * 1e3:,.1f} / {ttft['warm'] * 1e3:,.1f} |"
    )
    print(f"| peak memory (MiB) | {r['peak_memory_mib']:,.0f} |")
    if "logits_rel_err_triton_vs_torch" in r:
        print(f"| logits, Triton vs torch kernels (relative error) | {r['logits_rel_err_triton_vs_torch']:.2e} |")
    for key, value in r["ratios"].items():
        print(f"| {key} | {value:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="one tiny model (CPU check of this script)")
    ap.add_argument("--shapes", default="1b,8b", help="comma-separated: 1b, 8b (ignored with --tiny)")
    ap.add_argument("--batch", type=int, help="decode rows; default 64 (tiny: 16)")
    ap.add_argument("--slots", type=int, help="adapter slots cycled through; default 512 (tiny: 48)")
    ap.add_argument("--prompt-len", type=int, help="default 128 (tiny: 16)")
    ap.add_argument("--steps", type=int, help="decode steps timed per scenario and round; default 32 (tiny: 3)")
    ap.add_argument("--rounds", type=int, help="default 3 (tiny: 1)")
    ap.add_argument("--kernels", default="torch,triton", help="variants compared, in this order per round")
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    # --tiny proves the script, mostly under Triton's interpreter: as few steps as will do.
    for name, full, tiny in (
        ("batch", 64, 16),
        ("slots", 512, 48),
        ("prompt_len", 128, 16),
        ("steps", 32, 3),
        ("rounds", 3, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    device = torch.device(args.device)
    args.variants = args.kernels.split(",")
    if device.type == "cpu":
        # Before anything imports triton (the project's imports do): the kernels then take
        # CPU tensors, interpreted.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    start = time.perf_counter()
    results = []
    for shape in shapes:
        results.append(bench_model(shape, args, device))
        print_table(results[-1])
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1),
        "models": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
