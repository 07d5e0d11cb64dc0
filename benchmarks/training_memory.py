"""Memory of one fine-tuning forward + backward per padded token, which sizes
`VBSERVE_TRAINING_MAX_BATCH_TOKENS`.

SmolLM2-135M-Instruct, float32, CPU, one torch thread, VB-LoRA on all linear layers (r 4,
b 64, h 256), half of each row labelled. Each shape runs in a fresh process (glibc keeps
freed pages resident, so a second shape in one process would look cheaper), after one
warm-up step of 16 tokens that pays the one-off costs (~560 MiB: the composed matrices'
autograd buffers, the allocator's first arenas). Printed: the peak resident set size of
the measured step minus the resident size before it (/proc/self/status VmHWM - VmRSS,
the peak reset with `echo 5 > /proc/self/clear_refs`).

    python benchmarks/training_memory.py 1x1024 1x2048 8x256   # ROWSxWIDTH ...
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from pathlib import Path

import torch

WARM_UP = (1, 16)


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(rows: int, width: int) -> None:
    from vbserve.model import load_model, module_shapes
    from vbserve.settings import Settings
    from vbserve.training import TrainingHyperparameters
    from vbserve.training.trainer import VBLoRAParameters, _frozen, lora_hooks, loss_sum

    torch.set_num_threads(1)
    model = load_model(cache_dir=Settings().model_cache_dir).model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    hp = TrainingHyperparameters(target_modules=targets, r=4, vector_length=64, num_vectors=256)
    params = VBLoRAParameters(hp.check_fits(module_shapes(model)), seed=0)
    with _frozen(model), lora_hooks(model, params) as refresh:
        for shape in (WARM_UP, (rows, width)):
            ids = torch.randint(0, model.config.vocab_size, shape)
            labels = ids.clone()
            labels[:, : shape[1] // 2] = -100
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")
            before = resident_kib("VmRSS")
            start = time.perf_counter()
            refresh()
            loss_sum(model, ids, torch.ones_like(ids), labels).backward()
            added = resident_kib("VmHWM") - before
            params.zero_grad(set_to_none=True)
    tokens = rows * width
    print(
        f"{rows}x{width}: {tokens} tokens, +{added / 1024:.0f} MiB, {added * 1024 / tokens / 1e6:.2f} MB per token, "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        measure(*map(int, sys.argv[2].split("x")))
    else:
        for arg in sys.argv[1:] or ["1x1024"]:
            subprocess.run([sys.executable, __file__, "--one", arg], check=True)
