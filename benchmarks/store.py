"""Redis adapter store: read latency and memory per adapter as the store grows.

Stores 100, 10,000 and 100,000 adapters (in one run, each size in its own logical
database of one Redis server) and times, on uniformly random stored names:

- `store.get`: record, body and bank (two round trips), decoded and validated: what a
  replica pays to load an adapter its composed cache lacks;
- `store.get_record`: one round trip, what every generation request pays to learn the
  adapter's current version.

The sizes are timed in alternating rounds (every size once per round), so load from
other processes on the machine falls on all of them alike; p50 is the median of the
rounds' medians, p99 is over all calls. (Timing each size right after loading it, as the
store grows, made the 100k/100 ratio swing between 1.07x and 1.49x from run to run on a
shared 2-core machine.)

Memory per adapter, two ways: the sum of `MEMORY USAGE` over every key the store wrote
(exact per key, blind to other clients of a shared server), and the growth of
`INFO memory` used_memory while one size loads (adds allocator overhead; on a shared
server it also counts what other clients wrote meanwhile).

Adapters: SmolLM2-135M q_proj + v_proj of 30 layers, r=4 b=64 h=256 k=2, float16 (the
sizes of benchmarks/adapter_size.py: 15,120 B body + 32,944 B bank). Each adapter has its
own bank by default, as a trained adapter has (our trainer and PEFT both train the bank);
`--adapters-per-bank N` shares each bank among N adapters of one tenant. Tenants hold 100
adapters each. The load goes through `RedisAdapterStore.put_many`, pipelined per tenant.

    .venv/bin/python benchmarks/store.py [--redis-url redis://127.0.0.1:6379] [--dbs 12,13,14]

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

from benchmarks.compose import LAYERS, SMOLLM2_LINEARS, B, H, K, R, log
from vbserve_store import AdapterConfig, ModuleSpec, VBLoRAAdapter
from vbserve_store.store import RedisAdapterStore

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


def load(store: RedisAdapterStore, make: AdapterMaker, count: int, tenant_size: int) -> None:
    for first in range(0, count, tenant_size):
        tenant, _ = location(first, tenant_size)
        store.put_many(
            tenant, {location(i, tenant_size)[1]: make(i) for i in range(first, min(count, first + tenant_size))}
        )
        if (first + tenant_size) % 10_000 == 0:
            log(f"  loaded {first + tenant_size:,}")


def timed(call: Callable[[str, str], object], picks: list[tuple[str, str]]) -> list[float]:
    """ms of `call(tenant, name)` for each pick."""
    times = []
    for tenant, name in picks:
        start = time.perf_counter_ns()
        call(tenant, name)
        times.append((time.perf_counter_ns() - start) / 1e6)
    return times


def p50_p99(rounds: list[list[float]]) -> tuple[float, float]:
    """The median of the rounds' medians (a burst of load spoils one round, not the
    figure), and the 99th percentile of all calls, bursts included."""
    every = [t for times in rounds for t in times]
    return statistics.median(statistics.median(times) for times in rounds), statistics.quantiles(every, n=100)[98]


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
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="the server (its database is ignored)")
    parser.add_argument("--sizes", default="100,10000,100000", help="adapters stored, one size per database")
    parser.add_argument("--dbs", default="12,13,14", help="the databases the sizes go to, in order")
    parser.add_argument("--gets", type=int, default=2000, help="timed calls per size and operation")
    parser.add_argument("--rounds", type=int, default=10, help="the timed calls are made in this many rounds")
    parser.add_argument("--tenant-size", type=int, default=100, help="adapters per tenant")
    parser.add_argument("--adapters-per-bank", type=int, default=1, help="1: every adapter has its own bank")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    dbs = [int(db) for db in args.dbs.split(",")]
    if len(dbs) != len(sizes):
        parser.error("--dbs needs one database per size")

    prefix = f"vbsbench-{uuid.uuid4().hex[:8]}"
    clients = {size: redis.Redis.from_url(args.redis_url, db=db) for size, db in zip(sizes, dbs, strict=True)}
    stores = {size: RedisAdapterStore(client, prefix=prefix) for size, client in clients.items()}
    server = clients[sizes[0]].info("server")
    log(f"Redis {server['redis_version']} at {args.redis_url}, databases {dbs}, prefix {prefix}")
    make = AdapterMaker(args.adapters_per_bank)
    rows = {size: {"adapters": size} for size in sizes}
    try:
        for size, store in stores.items():
            log(f"loading {size:,} adapters")
            before = clients[size].info("memory")["used_memory"]
            start = time.perf_counter()
            load(store, make, size, args.tenant_size)
            rows[size]["load_s"] = time.perf_counter() - start
            rows[size]["used_memory_per_adapter"] = (clients[size].info("memory")["used_memory"] - before) / size
            rows[size]["key_bytes_per_adapter"] = key_bytes(clients[size], prefix) / size
        rng = random.Random(0)
        for operation in ("get", "get_record"):
            log(f"timing {operation}")
            per_round = args.gets // args.rounds
            times: dict[int, list[list[float]]] = {size: [] for size in sizes}
            for round_ in range(args.rounds + 1):  # round 0 warms up connections, scripts and caches
                for size, store in stores.items():
                    picks = [location(rng.randrange(size), args.tenant_size) for _ in range(per_round)]
                    elapsed = timed(getattr(store, operation), picks)
                    if round_:
                        times[size].append(elapsed)
            for size in sizes:
                rows[size][f"{operation}_p50_ms"], rows[size][f"{operation}_p99_ms"] = p50_p99(times[size])
    finally:
        for size, client in clients.items():
            stores[size].close()
            delete_prefix(client, prefix)
            client.close()
    rows = [rows[size] for size in sizes]

    sharing = "own bank each" if args.adapters_per_bank == 1 else f"a bank per {args.adapters_per_bank} adapters"
    print(
        f"Redis {server['redis_version']}, SmolLM2-135M q,v r={R} b={B} h={H} k={K} float16, {sharing}, "
        f"{args.tenant_size} adapters per tenant, {args.gets} timed calls per cell in {args.rounds} alternating rounds, "
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
