"""Native upload cost against the number of adapters the tenant already stores.

A native upload that names a bank by id (the blob omits it, as `vbctl` sends one when
the server holds the bank) must check that the tenant uses that bank: banks are global,
and a bank id learnt elsewhere must reveal nothing. That check once paged through all
of the tenant's adapters; the store now answers it from an index. This times the
server's native upload path (`vbserve.api.adapter_io._decode_native`: ownership check,
bank fetch, decode and validation; then `AdapterStore.put`) for a tenant holding 1
adapter and one holding 1,000, on SQLite and on Redis. The bank the upload names is
used by the tenant's last adapter in name order (the worst case of a scan).

Adapters: SmolLM2-135M q_proj + v_proj, float16, as in benchmarks/store.py (15 KB body,
33 KB bank). The two tenants are timed in alternating rounds (each once per round), so
load from other processes falls on both alike; p50 is the median of the rounds' medians.

    .venv/bin/python benchmarks/upload.py [--redis-url redis://127.0.0.1:6379/11]

The private `_decode_native` is called (not an HTTP round trip, whose cost does not
depend on the tenant) because it is the same function, by name and signature, before
and after the index: the script runs unchanged on the old tree for a before row.
Prints a table and, as its last line, a JSON object. Target: p50 at 1,000 adapters
within 1.2x of p50 at 1 on each backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.compose import log
from benchmarks.store import AdapterMaker, delete_prefix, p50_p99, timed
from vbserve.api.adapter_io import _decode_native
from vbserve_store import VBLoRAAdapter, encode_adapter
from vbserve_store.store import AdapterStore, RedisAdapterStore, SQLiteAdapterStore

TARGET_RATIO = 1.2
MAX_BYTES = 64 << 20
SIZES = (1, 1000)


def fill(store: AdapterStore, make: AdapterMaker, tenant: str, count: int) -> bytes:
    """Store `count` adapters for `tenant`; return a bank-less blob of a new adapter that
    names the bank of the tenant's last adapter in name order."""
    for i in range(count):
        store.put(tenant, f"adapter-{i:04d}", make(i))
    last, other = make(count - 1), make.templates[1]
    return encode_adapter(VBLoRAAdapter(last.config, last.bank, other.indices, other.weights), include_bank=False)


def upload(store: AdapterStore, tenant: str, blob: bytes) -> None:
    store.put(tenant, "upload", _decode_native(store, tenant, blob, MAX_BYTES))


def measure(store: AdapterStore, calls: int, rounds: int) -> dict[int, tuple[float, float]]:
    """{adapters the tenant holds: (p50, p99) ms of one upload}."""
    make = AdapterMaker(adapters_per_bank=1)
    blobs = {}
    for size in SIZES:
        log(f"  filling a tenant with {size:,} adapters")
        blobs[size] = fill(store, make, f"tenant-{size}", size)
    times: dict[int, list[list[float]]] = {size: [] for size in SIZES}
    for _ in range(rounds):
        for size in SIZES:
            picks = [(f"tenant-{size}", "upload")] * (calls // rounds)
            times[size].append(timed(lambda tenant, _name, blob=blobs[size]: upload(store, tenant, blob), picks))
    return {size: p50_p99(rounds_) for size, rounds_ in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11", help="the Redis to time against")
    parser.add_argument("--calls", type=int, default=200, help="timed uploads per tenant")
    parser.add_argument("--rounds", type=int, default=10, help="the timed uploads are made in this many rounds")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        log("SQLite")
        with SQLiteAdapterStore(Path(folder) / "adapters.db") as store:
            results["sqlite"] = measure(store, args.calls, args.rounds)
    prefix = f"bench-upload-{uuid.uuid4().hex[:8]}"
    log(f"Redis at {args.redis_url}, prefix {prefix}")
    try:
        with RedisAdapterStore.from_url(args.redis_url, prefix=prefix) as store:
            results["redis"] = measure(store, args.calls, args.rounds)
    finally:
        delete_prefix(redis.Redis.from_url(args.redis_url), prefix)

    print(
        f"native upload naming a stored bank, {args.calls} per cell in {args.rounds} alternating rounds, "
        f"{os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'backend':>8} {'adapters':>9} {'p50 ms':>8} {'p99 ms':>8}")
    headline: dict[str, float | bool] = {}
    for backend, cells in results.items():
        for size, (p50, p99) in cells.items():
            print(f"{backend:>8} {size:>9,} {p50:>8.2f} {p99:>8.2f}")
            headline[f"{backend}_p50_ms_at_{size}"] = round(p50, 3)
        ratio = cells[SIZES[-1]][0] / cells[SIZES[0]][0]
        headline[f"{backend}_p50_ratio"] = round(ratio, 3)
        print(f"{backend}: p50 at {SIZES[-1]:,} / at {SIZES[0]:,} adapters: {ratio:.2f}x (target <= {TARGET_RATIO}x)")
    headline["target_met"] = all(headline[f"{b}_p50_ratio"] <= TARGET_RATIO for b in results)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
