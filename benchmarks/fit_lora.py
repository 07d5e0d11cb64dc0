"""Bring your LoRA: a PEFT LoRA trained on SmolLM2, then VB-LoRA adapters fitted to it
(`vbserve.training.fit`, what a fit_lora job runs), each scored as the LoRA is.

The LoRA is `benchmarks/quality.py`'s (r=8, alpha 16, q,v, AdamW lr 1e-3, its task rows
and steps). For each VB-LoRA shape: the fit's relative error of the delta weights, the
output agreement the job reports (logits on fixed random-token prompts: the LoRA's effect
missed, top-1 agreement), exact match on the task's test rows (greedy, as quality.py
scores), stored bytes (the LoRA's float32 safetensors, the VB-LoRA's store body + bank in
float16, as a job publishes) and the fit's wall time.

    .venv/bin/python benchmarks/fit_lora.py [--task date] [--steps 120] [--fit-steps 200]
    .venv/bin/python benchmarks/fit_lora.py --quick   # tiny random model: a smoke test

Prints a table and, as its last line, a JSON object of the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality import LORA_ALPHA, LORA_R, QV, Task, answer_tokens, generate, jsonl, pad_id, score, train_peft
from vbserve.model import load_model
from vbserve.settings import Settings
from vbserve.training import parse_jsonl
from vbserve.training.fit import fit_vblora, output_agreement
from vbserve.training.hyperparams import FIT_STEPS, TrainingHyperparameters
from vbserve.training.prepare import published_bytes
from vbserve.training.trainer import matrices_added
from vbserve.vblora.compose import compose_adapters
from vbserve_store import AdapterConfig
from vbserve_store.peft_io import load_peft_dir

# (r, b, h, k): the job defaults' shape at the LoRA's rank and at the paper's, and larger banks.
SHAPES = [(8, 64, 256, 2), (4, 64, 256, 2), (8, 64, 1024, 2), (8, 32, 2048, 2)]
DEFAULTS = TrainingHyperparameters()


def log(message: str) -> None:
    print(f"[fit_lora] {message}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--task", default="date")
    ap.add_argument("--steps", type=int, default=120, help="the LoRA's training steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--fit-steps", type=int, default=FIT_STEPS)
    args = ap.parse_args()
    shapes = SHAPES
    if args.quick:
        from tests.conftest import byte_tokenizer, tiny_llama

        model, tokenizer, sizes, args.steps = tiny_llama(hidden=128), byte_tokenizer(), (8, 4, 4), 3
        shapes = [(8, 64, 64, 2)]
    else:
        loaded = load_model(cache_dir=Settings().model_cache_dir)
        model, tokenizer, sizes = loaded.model, loaded.tokenizer, (240, 32, 100)
    task = Task.make(args.task, sizes)
    pad = pad_id(tokenizer)
    budget = answer_tokens(tokenizer, task)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=QV)
    )
    train = parse_jsonl(jsonl(task.train), tokenizer, max_seq_len=512)
    started = time.perf_counter()
    train_peft(peft_model, [{"params": [p for p in peft_model.parameters() if p.requires_grad], "lr": args.lora_lr}],
               train, args.steps, args.batch_size, pad)  # fmt: skip
    log(f"LoRA trained in {time.perf_counter() - started:.0f} s")
    rows = {"lora": {"score": score(generate(peft_model, tokenizer, task.test, budget), task.test)}}
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        rows["lora"]["bytes"] = (Path(tmp) / "adapter_model.safetensors").stat().st_size
        lora = load_peft_dir(Path(tmp))
    for r, b, h, k in shapes:
        config = AdapterConfig(lora.config.modules, r=r, vector_length=b, num_vectors=h, topk=k)
        started = time.perf_counter()
        result = fit_vblora(
            lora, config, steps=args.fit_steps, lr_bank=DEFAULTS.lr_bank, lr_logits=DEFAULTS.lr_logits, seed=0
        )
        wall = time.perf_counter() - started
        agreement = output_agreement(model, lora, result.adapter)
        mats = {n: (a[0], bt[0]) for n, (a, bt) in compose_adapters([result.adapter]).items()}
        with matrices_added(model, list(mats), mats):
            answers = generate(model, tokenizer, task.test, budget)
        rows[f"vblora r={r} b={b} h={h} k={k}"] = {
            "score": score(answers, task.test),
            "bytes": published_bytes(config, torch.float16),
            "fit_error": round(result.rel_error, 4),
            "output_rel_error": round(agreement.rel_error, 4),
            "top1_agreement": round(agreement.top1_agreement, 4),
            "fit_wall_s": round(wall, 1),
        }
        log(f"{r=} {b=} {h=} {k=}: {rows[f'vblora r={r} b={b} h={h} k={k}']}")
    print(f"{'adapter':28} {'exact':>6} {'bytes':>10} {'fit err':>8} {'out err':>8} {'top-1':>6} {'fit s':>6}")
    for name, row in rows.items():
        cells = [f"{row.get(key, '-'):>8}" for key in ("fit_error", "output_rel_error")]
        print(
            f"{name:28} {row['score']:6.3f} {row['bytes']:10,} {cells[0]} {cells[1]} "
            f"{row.get('top1_agreement', '-'):>6} {row.get('fit_wall_s', '-'):>6}"
        )
    print(json.dumps({"task": args.task, "lora_steps": args.steps, "fit_steps": args.fit_steps, **rows}))


if __name__ == "__main__":
    main()
