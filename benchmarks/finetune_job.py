"""A fine-tuning job end to end on SmolLM2, the way a tenant runs one: a real `vbserve
serve` process (default model, SQLite store and job queue, in-process worker), the
training file uploaded with `vbctl train --follow` (its progress bar and live loss), the
published adapter then served by the same process, and exact match on held-out rows
measured through the HTTP API for the base model and for the adapter.

Data: benchmarks/data/reverse_words.*.jsonl ("Reverse the words: a b c" -> " c b a"; 320
training rows, 64 held out), which the base model cannot do. Hyperparameters as in
benchmarks/training.py: all linear layers, r=4, b=64, h=256, k=2, 80 steps of batch 8.

    .venv/bin/python benchmarks/finetune_job.py [--steps 80]

Prints a table and, as its last line, a JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from vbserve_client import AsyncVBServeClient, VBServeClient
from vbserve_client.cli import main as vbctl

DATA = Path(__file__).resolve().parent / "data"
ADAPTER = "reverse"
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def log(message: str) -> None:
    print(f"[finetune_job] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "VBSERVE_STORE_URL": f"sqlite:///{folder / 'adapters.db'}",
        "VBSERVE_PORT": str(port),
        "VBSERVE_MAX_MODEL_LEN": "256",
    }
    return subprocess.Popen([sys.executable, "-m", "vbserve.cli", "serve", "--log-level", "warning"], env=env)


def wait_ready(url: str, server: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vbserve serve exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


async def exact_match(url: str, rows: list[dict], adapter: str | None) -> float:
    """Share of rows whose greedy completion (16 tokens at most) is exactly right; all rows
    are sent at once, so the engine batches them."""
    async with AsyncVBServeClient(url) as vb:
        done = await asyncio.gather(
            *(vb.generate(row["prompt"], adapter=adapter, temperature=0, max_tokens=16) for row in rows)
        )
    return sum(d.text.strip() == row["completion"].strip() for d, row in zip(done, rows, strict=True)) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    args = ap.parse_args()
    rows = [json.loads(line) for line in (DATA / "reverse_words.validation.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log(f"starting vbserve serve on {url} ...")
        server = start_server(Path(tmp), port)
        try:
            wait_ready(url, server)
            base = asyncio.run(exact_match(url, rows, None))
            log(f"base model exact match {base:.3f}; training through the API ...")
            start = time.perf_counter()
            code = vbctl([
                "--url", url, "train", str(DATA / "reverse_words.train.jsonl"), "--adapter", ADAPTER,
                "--validation", str(DATA / "reverse_words.validation.jsonl"), "--steps", str(args.steps),
                "--batch-size", "8", "--r", "4", "--b", "64", "--h", "256", "--k", "2", "--max-seq-len", "64",
                "--modules", ALL_LINEAR, "--seed", "0", "--follow",
            ])  # fmt: skip
            job_s = time.perf_counter() - start
            if code != 0:
                raise SystemExit(f"vbctl train exited with {code}")
            with VBServeClient(url) as vb:
                job = vb.jobs.list(limit=1).data[0]
                info = vb.adapters.get(ADAPTER)
            tuned = asyncio.run(exact_match(url, rows, ADAPTER))
        finally:
            server.terminate()
            server.wait(timeout=60)

    progress = job.progress
    print(f"{'':<36}{'value':>12}")
    print(f"{'job wall time, upload to published (s)':<36}{job_s:>12.1f}")
    print(f"{'steps':<36}{progress.step:>12d}")
    print(f"{'final training loss':<36}{progress.loss:>12.4f}")
    print(f"{'validation loss':<36}{progress.val_loss:>12.4f}")
    print(f"{'published adapter bytes':<36}{info.stored_bytes:>12d}")
    print(f"{'exact match, base model':<36}{base:>12.3f}")
    print(f"{'exact match, trained adapter':<36}{tuned:>12.3f}")
    figures = {
        "steps": progress.step,
        "job_seconds": round(job_s, 1),
        "final_train_loss": round(progress.loss, 5),
        "val_loss": progress.val_loss and round(progress.val_loss, 5),
        "adapter_stored_bytes": info.stored_bytes,
        "adapter_version": job.adapter_version,
        "exact_match_base": base,
        "exact_match_tuned": tuned,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
