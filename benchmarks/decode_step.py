"""One decode step of SmolLM2-135M at N rows: the engine's forwards side by side.

Cases (each its own copy of the model, built as the engine builds it):
  hf-fp32    the Hugging Face decoder over the slot cache (VBSERVE_FAST_PATH=false)
  fast-fp32  the engine's Llama forward (server/vbserve/engine/llama.py), float32
  fast-bf16  the same in bfloat16 (what dtype=auto picks on a CPU with AVX512-BF16/AMX)
  fast-fp32-compiled  (--compile) the fast forward's decoder layer under torch.compile
each with base-only rows and with N distinct adapters (all seven modules, r=4). Rounds
alternate the cases (forward order, then backward), and the table reports the median step;
the float32 memory-bandwidth ceiling measured here is printed beside it.

    .venv/bin/python benchmarks/decode_step.py [--rows 32] [--rounds 5] [--compile] [--profile]
    .venv/bin/python benchmarks/decode_step.py --static 25  # the static step's cost, below

`--static N`: instead, fast-fp32 alone, N rows with distinct adapters in a runner of
`--rows` rows (max_len 512), the decode step with exact shapes (what the CPU runs) against
the static one a CUDA graph captures (N padded to its bucket, attention over a length bucket),
and padded over the full 512 positions, alternating per round.

Prints a table and, as its last line, a JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bandwidth import decode_weight_bytes, limit_tok_s, read_bandwidth_gbs
from tests.test_engine import random_adapter
from vbserve.engine.model_runner import ModelRunner
from vbserve.model.loader import load_model
from vbserve.vblora.compose import compose_adapters
from vbserve.vblora.layer import write_adapter_slot

PROMPT_LEN = 40
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(case: str, rows: int, cache_dir: Path, max_len: int = 256, static_decode: bool = False) -> ModelRunner:
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    model = load_model(cache_dir=cache_dir, dtype=dtype).model
    adapters = [random_adapter(model, seed=i, targets=ALL_MODULES, r=4, bank_scale=0.1) for i in range(rows)]
    runner = ModelRunner(
        model,
        max_rows=rows,
        max_len=max_len,
        num_adapter_slots=rows,
        max_rank=8,
        fast_path=not case.startswith("hf"),
        static_decode=static_decode,
    )
    mats = compose_adapters(adapters, dtype=dtype)
    for slot in range(rows):
        write_adapter_slot(runner.layers, slot, {n: (a[slot], b[slot]) for n, (a, b) in mats.items()})
    if "compiled" in case:
        # Inductor cannot lower oneDNN's linear over an unpacked weight: the compiled layer
        # gets `F.linear` and chooses its own kernels.
        runner.fast.linear = torch.nn.functional.linear
        runner.fast._layer = torch.compile(runner.fast._layer, dynamic=True)
    ids = torch.randint(0, 49152, (rows, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    runner.forward(
        0, ids, torch.arange(PROMPT_LEN).repeat(rows, 1), torch.full((rows,), PROMPT_LEN - 1), slot_ids(rows, True)
    )
    return runner


def slot_ids(rows: int, adapters: bool) -> torch.Tensor:
    return torch.arange(rows) if adapters else torch.full((rows,), -1)


def step_seconds(runner: ModelRunner, rows: int, adapters: bool, steps: int) -> float:
    """Median of `steps` decode steps, each one position further into the rows' history."""
    ids = torch.randint(0, 49152, (rows, 1), generator=torch.Generator().manual_seed(1))
    times = []
    for i in range(steps):
        start = time.perf_counter()
        runner.decode(ids, torch.full((rows, 1), PROMPT_LEN + i), slot_ids(rows, adapters))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def static_costs(args: argparse.Namespace) -> None:
    """Decode tok/s of the step's shape modes (see the module docstring, `--static`)."""
    runner = build("fast-fp32", args.rows, args.cache_dir, max_len=512, static_decode=True)
    n = args.static
    modes = {
        "exact shapes": ([], []),
        "padded, length bucket": (runner.batch_buckets, runner.attention_buckets),
        "padded, full length": (runner.batch_buckets, [runner.max_len]),
    }
    ids = torch.randint(0, 49152, (n, 1), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else reversed(modes):
            runner.batch_buckets, runner.attention_buckets = modes[mode]
            for i in range(args.steps):
                start = time.perf_counter()
                runner.decode(ids, torch.full((n, 1), PROMPT_LEN + i), torch.arange(n))
                times[mode].append(time.perf_counter() - start)
    tok_s = {m: round(n / statistics.median(t), 1) for m, t in times.items()}
    print(json.dumps({"rows": n, "runner_rows": args.rows, "tok_s": tok_s}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per case and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table for fast-fp32")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "vbserve" / "models")
    parser.add_argument("--static", type=int, metavar="N", help="the static step's cost at N rows (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.static:
        static_costs(args)
        return
    cases = ["hf-fp32", "fast-fp32", "fast-bf16"] + (["fast-fp32-compiled"] if args.compile else [])
    runners = {c: build(c, args.rows, args.cache_dir) for c in cases}
    bandwidth = read_bandwidth_gbs()
    weight_bytes = decode_weight_bytes(runners["hf-fp32"].model)
    ceiling = limit_tok_s(args.rows, bandwidth, weight_bytes)

    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            step_seconds(runners["fast-fp32"], args.rows, True, args.steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    results: dict[str, list[float]] = {f"{c} {kind}": [] for c in cases for kind in ("base", "adapters")}
    for r in range(args.rounds):
        for case in cases if r % 2 == 0 else reversed(cases):
            for adapters in (False, True):
                seconds = step_seconds(runners[case], args.rows, adapters, args.steps)
                results[f"{case} {'adapters' if adapters else 'base'}"].append(args.rows / seconds)

    median = {k: statistics.median(v) for k, v in results.items()}
    print(f"float32 read bandwidth {bandwidth:.1f} GB/s; {weight_bytes / 1e6:.0f} MB of float32 weights per step;")
    print(f"ceiling at {args.rows} rows: {ceiling:.0f} tok/s (float32)\n")
    print(f"| case ({args.rows} rows, decode) | tok/s | x hf-fp32 | of the fp32 ceiling |")
    print("|---|---|---|---|")
    for key, value in median.items():
        ref = median[f"hf-fp32 {key.split()[1]}"]
        print(f"| {key} | {value:.0f} | {value / ref:.2f} | {value / ceiling:.2f} |")
    print(
        json.dumps(
            {
                "rows": args.rows,
                "bandwidth_gbs": round(bandwidth, 1),
                "ceiling_tok_s": round(ceiling),
                "tok_s": {k: round(v, 1) for k, v in median.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
