"""benchmarks/gpu.py, the script of the first GPU run, runs its whole code on CPU (`--tiny`,
the Triton kernels interpreted), so that run is one command when a GPU is there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_tiny_on_cpu() -> None:
    args = ["--device", "cpu", "--tiny", "--batch", "4", "--slots", "6", "--steps", "1", "--prompt-len", "4"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    (model,) = summary["models"]
    assert model["shape"] == "tiny"
    expected = {"base"} | {f"{s} / {v}" for s in ("1 adapter", "4 distinct", "6 distinct") for v in ("torch", "triton")}
    assert set(model["decode_tok_s"]) == expected
    assert all(v > 0 for v in model["decode_tok_s"].values())
    assert set(model["compose_all_slots_s"]) == {"torch", "triton"}
    assert model["peft_tok_s"] > 0 and model["ttft_s"]["cold"] > 0 and model["peak_memory_mib"] > 0
    assert model["graphs"].startswith("not available")  # said, not faked
    assert model["logits_rel_err_triton_vs_torch"] < 1e-4  # float32
    assert "| decode tok/s, 6 distinct / triton (eager) |" in proc.stdout
