"""`benchmarks/quality.py --quick`: the quality benchmark runs end to end on the tiny model
(PEFT LoRA and VB-LoRA, and vbserve jobs through the HTTP API, one of them against the
frozen bank of a first pooled job), and its last line is the JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_benchmark_quick_mode() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--quick", "--threads", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    methods = ["base", "lora", "peft_vblora", "vbserve_paper", "vbserve_default", "vbserve_best", "vbserve_shared"]
    for task in ("record", "date", "verdict"):
        for method in methods:
            assert 0.0 <= summary[f"{task}_{method}"] <= 1.0
        # PEFT writes float32 LoRA; a vbserve adapter's bank is charged to it in full.
        # A client holding the family's bank pulls the body alone: a small part of what is stored.
        assert 0 < 10 * summary[f"{task}_vbserve_shared_pull_bytes"] < summary[f"{task}_vbserve_shared_bytes"]
        assert summary[f"{task}_lora_bytes"] > 0
        # PEFT's VB-LoRA saves its bank (float32, twice ours) and the top-k indices and weights,
        # not the (S, h) logits, as the paper counts its bytes.
        assert summary[f"{task}_peft_vblora_bytes"] < 2.1 * summary[f"{task}_vbserve_paper_bytes"]
    assert len(summary["default_minus_lora"]) == 3 and len(summary["shared_over_own"]) == 3
    assert "vbserve_shared" in done.stdout and "pull bytes" in done.stdout
