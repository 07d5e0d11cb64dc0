"""What a per-request mixture or a plain LoRA row costs the batch it joins (SmolLM2-135M).

Cases, each 32 concurrent greedy requests of `--new-tokens` tokens (prefill included):

(a) 32 rows, each on its own VB-LoRA adapter (q,v; r=4 b=64 h=256 k=2);
(b) as (a), but one row on a `cat` mixture of two of those adapters (rank 8);
(c) as (a), but one row on a plain LoRA adapter (q,v; r=8).

The batched LoRA layers run at the largest rank in the batch (`layer.py`), so one rank-8
row makes every row pay rank 8: (b) and (c) measure that. Cases run interleaved, `--rounds`
times (a b c, then c b a, ...); each ratio is the median of its per-round ratios. Also
timed: composing a recipe in the loader (two VB-LoRA adapters, composed and mixed), against
composing one adapter, median of 20, on one thread.

    .venv/bin/python benchmarks/mixtures.py [--new-tokens 32] [--rounds 5]

Prints a table and, as its last line, a JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_engine import random_adapter
from vbserve.engine import AdapterRef, GenerationRequest, MixtureComponent, MixtureRef, SamplingParams, build_engine
from vbserve.model import describe_model, load_model
from vbserve.settings import Settings
from vbserve.vblora.compose import compose_adapters
from vbserve.vblora.mixture import mix_lora
from vbserve_store import LoRAAdapter, LoRAConfig, ModuleSpec
from vbserve_store.store import SQLiteAdapterStore

TENANT = "bench"
ROWS = 32


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_lora(model, r: int, seed: int) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "v_proj"))
    }
    config = LoRAConfig(
        tuple(ModuleSpec(n, m.in_features, m.out_features) for n, m in linears.items()), r=r, lora_alpha=2 * r
    )
    a = {n: torch.randn(r, m.in_features, generator=gen) * 0.02 for n, m in linears.items()}
    b = {n: torch.randn(m.out_features, r, generator=gen) * 0.02 for n, m in linears.items()}
    return LoRAAdapter(config, a, b)


async def run(engine, rows: list[tuple[list[int], object]], new_tokens: int) -> float:
    """Tokens per second of all rows submitted at once."""
    start = time.perf_counter()
    sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    handles = [await engine.submit(GenerationRequest(ids, sp, adapter=ref)) for ids, ref in rows]
    results = [await h.result() for h in handles]
    return sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - start)


def median_ms(fn, reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    log("loading SmolLM2-135M ...")
    loaded = load_model(cache_dir=Settings().model_cache_dir)
    model, tok = loaded.model, loaded.tokenizer
    adapters = [random_adapter(model, seed=i, r=4, b=64, h=256, k=2, bank_scale=0.2) for i in range(ROWS)]
    store = SQLiteAdapterStore(Path(tempfile.mkdtemp()) / "store.db")
    for i, adapter in enumerate(adapters):
        store.put(TENANT, f"a{i}", adapter)
    store.put(TENANT, "lora", random_lora(model, r=8, seed=99))

    def recipe() -> None:  # what the loader does for a mixture (server/vbserve/engine/adapters/compose.py, _compose_mixture)
        parts = [{n: (a[0], b[0]) for n, (a, b) in compose_adapters([x]).items()} for x in adapters[:2]]
        mix_lora(parts, [0.5, 0.5], [1.0, 1.0], "cat")

    # One thread: these are hundreds of small ops, and on a shared machine torch's worker
    # threads waiting on each other turned a 2 ms recipe into 40 ms in one run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    compose_one_ms, compose_mix_ms = median_ms(lambda: compose_adapters([adapters[0]])), median_ms(recipe)
    torch.set_num_threads(threads)

    settings = Settings(max_batch_size=ROWS, max_adapter_slots=ROWS + 4, max_lora_rank=8, max_model_len=512)
    engine = build_engine(model, tok, describe_model(model, tok, settings), store, settings)
    ids = [tok.encode(f"Tell me about topic number {i}.") for i in range(ROWS)]
    own = [(p, AdapterRef(TENANT, f"a{i}")) for i, p in enumerate(ids)]
    mixture = MixtureRef(TENANT, tuple(MixtureComponent(f"a{i}", 0.5, "", "") for i in (0, 1)), "cat")
    cases = {"a": own, "b": [*own[:-1], (ids[-1], mixture)], "c": [*own[:-1], (ids[-1], AdapterRef(TENANT, "lora"))]}
    speeds: dict[str, list[float]] = {k: [] for k in cases}
    try:
        for rows in cases.values():  # warm-up: every adapter, mixture and slot loaded
            await run(engine, rows, 2)
        for i in range(args.rounds):
            order = "abc" if i % 2 == 0 else "cba"
            log(f"round {i + 1}/{args.rounds}: {order}")
            for k in order:
                speeds[k].append(await run(engine, cases[k], args.new_tokens))
    finally:
        engine.shutdown()
        store.close()

    def ratio(k: str) -> float:
        return statistics.median(x / a for x, a in zip(speeds[k], speeds["a"], strict=True))

    print("| case | tok/s (median) | vs (a) |")
    print("| --- | --- | --- |")
    labels = {"a": "(a) 32 rank-4 VB-LoRA rows", "b": "(b) one row a rank-8 mixture", "c": "(c) one row a rank-8 LoRA"}
    for k, label in labels.items():
        print(f"| {label} | {statistics.median(speeds[k]):.1f} | {ratio(k):.3f} |")
    print(
        f"\ncompose (1 thread) one adapter: {compose_one_ms:.2f} ms; a two-adapter cat recipe: {compose_mix_ms:.2f} ms"
    )
    print(
        json.dumps(
            {
                "rows": ROWS,
                "new_tokens": args.new_tokens,
                "rounds": args.rounds,
                "tok_s_vblora_only": round(statistics.median(speeds["a"]), 2),
                "mixture_row_ratio": round(ratio("b"), 4),
                "lora_row_ratio": round(ratio("c"), 4),
                "compose_one_ms": round(compose_one_ms, 3),
                "compose_mixture_ms": round(compose_mix_ms, 3),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
