"""Redis adapter store: read latency and memory per adapter as the store grows.

Loads 100, then 10,000, then 100,000 adapters (cumulatively, in one run) into Redis and,
at each size, times on uniformly random stored names:

- `store.get`: record, body and bank (two round trips), decoded and validated: what a
  replica pays to load an adapter its composed cache lacks;
- `store.get_record`: one round trip, what every generation request pays to learn the
  adapter's current version;

and measures memory per adapter two ways: the sum of `MEMORY USAGE` over every key the
store wrote (exact per key, blind to other clients of a shared server), and the growth of
`INFO memory` used_memory since the start (adds allocator overhead; on a shared server it
also counts what other clients wrote meanwhile).

Adapters: SmolLM2-135M q_proj + v_proj of 30 layers, r=4 b=64 h=256 k=2, float16 (the
sizes of benchmarks/adapter_size.py: 15,120 B body + 32,944 B bank). Each adapter has its
own bank by default, as a trained adapter has (our trainer and PEFT both train the bank);
`--adapters-per-bank N` shares each bank among N adapters of one tenant. Tenants hold 100
adapters each. The load goes through `RedisAdapterStore.put_many`, pipelined per tenant.

    .venv/bin/python benchmarks/store.py [--redis-url redis://127.0.0.1:6379/14] [--sizes 100,10000,100000]

Everything is written under a fresh key prefix and deleted at the end (also on Ctrl-C).
Prints a table and, as its last line, a JSON object of the headline figures. Target
(issue #6): get p50 at the largest size within 1.2x of get p50 at the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapter_store import AdapterConfig, ModuleSpec, VBLoRAAdapter
from adapter_store.store import RedisAdapterStore
from benchmarks.compose import LAYERS, SMOLLM2_LINEARS, B, H, K, R, log

TARGET_RATIO = 1.2
TEMPLATES = 8  # distinct top-k index/weight sets; banks are made per adapter (cheap)


def smollm2_qv_config() -> AdapterConfig:
    modules = tuple(
        ModuleSpec(f"model.layers.{layer}.{name}", *SMOLLM2_LINEARS[name])
        for layer in range(LAYERS)
        for name in ("self_attn.q_proj", "self_attn.v_proj")
    )
    return AdapterConfig(modules, r=R, vector_length=B, num_vectors=H, topk=K)


class AdapterMaker:
    """Realistic adapters, fast: top-k selection over (3600, 256) logits costs ~40 ms, so
    a few templates give the indices and weights, and each bank is drawn fresh."""

    def __init__(self, adapters_per_bank: int) -> None:
        self.config = smollm2_qv_config()
        self.adapters_per_bank = adapters_per_bank
        gen = torch.Generator().manual_seed(0)
        self.templates = [
            VBLoRAAdapter.from_logits(
                self.config, self._bank(0), torch.randn(self.config.num_subvectors, H, generator=gen)
            ).to(torch.float16)
            for _ in range(TEMPLATES)
        ]

    @staticmethod
    def _bank(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.empty(H, B).uniform_(-0.02, 0.02, generator=gen).to(torch.float16)  # PEFT's init range

    def __call__(self, i: int) -> VBLoRAAdapter:
        template = self.templates[i % TEMPLATES]
        return VBLoRAAdapter(
            self.config, self._bank(1 + i // self.adapters_per_bank), template.indices, template.weights
        )


def location(i: int, tenant_size: int) -> tuple[str, str]:
    return f"tenant-{i // tenant_size:05d}", f"adapter-{i % tenant_size:04d}"


def load(store: RedisAdapterStore, make: AdapterMaker, start: int, stop: int, tenant_size: int) -> None:
    batch: dict[str, VBLoRAAdapter] = {}
    tenant = None
    for i in range(start, stop):
        t, name = location(i, tenant_size)
        if t != tenant and batch:
            store.put_many(tenant, batch)
            batch = {}
        tenant = t
        batch[name] = make(i)
        if (i + 1) % 10_000 == 0:
            log(f"  loaded {i + 1:,}")
    if batch:
        store.put_many(tenant, batch)


def percentiles(
    call: Callable[[str, str], object], count: int, tenant_size: int, gets: int, rounds: int
) -> tuple[float, float]:
    """p50 and p99 in ms of `call(tenant, name)` on uniformly random stored adapters.

    The calls are timed in `rounds` rounds; p50 is the median of the rounds' medians, so
    a burst of load from other processes on the machine spoils one round, not the figure.
    p99 is taken over all calls, bursts included."""
    rng = random.Random(count)
    picks = [location(rng.randrange(count), tenant_size) for _ in range(gets + gets // 10)]
    for tenant, name in picks[gets:]:  # warm-up: connections, scripts, allocator
        call(tenant, name)
    times = []
    for tenant, name in picks[:gets]:
        start = time.perf_counter_ns()
        call(tenant, name)
        times.append((time.perf_counter_ns() - start) / 1e6)
    per_round = len(times) // rounds
    p50 = statistics.median(
        statistics.median(times[i : i + per_round]) for i in range(0, per_round * rounds, per_round)
    )
    return p50, statistics.quantiles(times, n=100)[98]


def key_bytes(client: redis.Redis, prefix: str) -> int:
    """Sum of MEMORY USAGE (all elements counted) over every key under `prefix`."""
    total = 0
    keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
    for start in range(0, len(keys), 2000):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + 2000]:
            pipe.memory_usage(key, samples=0)
        total += sum(size or 0 for size in pipe.execute())
    return total


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
    for start in range(0, len(keys), 2000):
        client.unlink(*keys[start : start + 2000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="a database the run may write to")
    parser.add_argument("--sizes", default="100,10000,100000", help="adapters stored at each measurement")
    parser.add_argument("--gets", type=int, default=2000, help="timed calls per size and operation")
    parser.add_argument("--rounds", type=int, default=5, help="p50 is the median of this many rounds' medians")
    parser.add_argument("--tenant-size", type=int, default=100, help="adapters per tenant")
    parser.add_argument("--adapters-per-bank", type=int, default=1, help="1: every adapter has its own bank")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    client = redis.Redis.from_url(args.redis_url)
    prefix = f"vbsbench-{uuid.uuid4().hex[:8]}"
    store = RedisAdapterStore.from_url(args.redis_url, prefix=prefix)
    server = client.info("server")
    log(f"Redis {server['redis_version']} at {args.redis_url}, prefix {prefix}")
    make = AdapterMaker(args.adapters_per_bank)
    rows = []
    try:
        baseline = client.info("memory")["used_memory"]
        loaded = 0
        for size in sizes:
            log(f"loading {size - loaded:,} adapters ({loaded:,} -> {size:,})")
            start = time.perf_counter()
            load(store, make, loaded, size, args.tenant_size)
            load_s = time.perf_counter() - start
            loaded = size
            get_p50, get_p99 = percentiles(store.get, size, args.tenant_size, args.gets, args.rounds)
            record_p50, record_p99 = percentiles(store.get_record, size, args.tenant_size, args.gets, args.rounds)
            rows.append(
                {
                    "adapters": size,
                    "load_s": load_s,
                    "get_p50_ms": get_p50,
                    "get_p99_ms": get_p99,
                    "get_record_p50_ms": record_p50,
                    "get_record_p99_ms": record_p99,
                    "key_bytes_per_adapter": key_bytes(client, prefix) / size,
                    "used_memory_per_adapter": (client.info("memory")["used_memory"] - baseline) / size,
                }
            )
    finally:
        store.close()
        delete_prefix(client, prefix)
        client.close()

    sharing = "own bank each" if args.adapters_per_bank == 1 else f"a bank per {args.adapters_per_bank} adapters"
    print(
        f"Redis {server['redis_version']}, SmolLM2-135M q,v r={R} b={B} h={H} k={K} float16, {sharing}, "
        f"{args.tenant_size} adapters per tenant, {args.gets} timed calls per cell in {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs, "
        f"1-min load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'adapters':>9} {'load s':>7} {'get p50':>8} {'get p99':>8} {'rec p50':>8} {'rec p99':>8}"
        f" {'B/adapter (keys)':>17} {'B/adapter (used_memory)':>24}"
    )
    for row in rows:
        print(
            f"{row['adapters']:>9,} {row['load_s']:>7.1f} {row['get_p50_ms']:>8.3f} {row['get_p99_ms']:>8.3f}"
            f" {row['get_record_p50_ms']:>8.3f} {row['get_record_p99_ms']:>8.3f}"
            f" {row['key_bytes_per_adapter']:>17,.0f} {row['used_memory_per_adapter']:>24,.0f}"
        )
    first, last = rows[0], rows[-1]
    ratio = last["get_p50_ms"] / first["get_p50_ms"]
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(
        f"get p50 at {last['adapters']:,} / at {first['adapters']:,}: {ratio:.2f}x (target <= {TARGET_RATIO}x: {verdict})"
    )
    headline = {"get_p50_ratio": round(ratio, 3), "target_met": ratio <= TARGET_RATIO}
    for row in rows:
        n = row["adapters"]
        for field in ("get_p50_ms", "get_p99_ms", "get_record_p50_ms", "get_record_p99_ms"):
            headline[f"{field}_at_{n}"] = round(row[field], 3)
        headline[f"key_bytes_per_adapter_at_{n}"] = round(row["key_bytes_per_adapter"])
        headline[f"used_memory_per_adapter_at_{n}"] = round(row["used_memory_per_adapter"])
        headline[f"load_s_at_{n}"] = round(row["load_s"], 1)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
