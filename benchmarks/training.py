"""Training: our VB-LoRA trainer against PEFT's VB-LoRA, side by side in one run.

Same model (SmolLM2-135M-Instruct, float32, CPU), same data (benchmarks/data/
reverse_words.*.jsonl: "Reverse the words: a b c" -> " c b a", 320 training rows, 64
held-out rows, made with a fixed seed from a list of 66 words; the base model cannot do
it), same tokenization (`parse_jsonl`), same batches (`plan_batches`, padding-aware),
same loss (token-level mean over each step: PEFT through Hugging Face's causal-LM loss
with `num_items_in_batch`, as PEFT models are trained; ours computes the LM head only at
labelled positions, see `trainer.loss_sum`), same initialization (ours is copied into
PEFT's layers with `copy_into_peft`), same optimizer (AdamW, bank lr 1e-3 without decay,
logits lr 1e-2, in two groups, as PEFT's VB-LoRA example builds it), same linear
schedule with 10% warmup, same seed. What differs is how the step is computed: ours
composes every sub-vector of every module in one `compose_subvectors` call per forward,
adds `B (A x)` through forward hooks and runs the LM head only where the loss needs it;
PEFT's layers each run their own top-k, gather and sum, and the head runs everywhere.

Measured:
- steps/s: both trainers run at once in two forked children that take optimizer steps in
  turn (PEFT, ours, PEFT, ...), so load from other processes on the shared machine hits
  both alike; a step is timed from getting the turn to its end, and steps/s is 1 / the
  median step time (which leaves out the first step and the steps that ran validation).
- peak memory: each trainer runs in its own forked child of the process that loaded the
  model, so neither inherits memory the other freed (glibc keeps freed pages resident,
  and the second of two runs in one process would look free). The weights are read once
  before measuring (they are shared copy-on-write or file-mapped). In the child: the peak
  resident set size during training minus the resident size at its start, from
  /proc/self/status (VmHWM - VmRSS) after resetting the peak with
  `echo 5 > /proc/self/clear_refs`. It counts everything the process touches (torch's
  CPU allocator is invisible to tracemalloc). PEFT's model copy is made before the reset.
- final training loss (last step; mean of the last 10) and validation loss on the 64
  held-out rows.
- exact match on the held-out rows, greedy through our serving engine, for the base
  model and for our trained adapter (published to a SQLite store, served as float16).

    .venv/bin/python benchmarks/training.py [--steps 80] [--batch-size 8] [--threads 2]

Prints a table and, as its last line, a JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import multiprocessing
import multiprocessing.synchronize
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vbserve.engine import AdapterRef, GenerationRequest, SamplingParams, build_engine
from vbserve.model import describe_model, load_model, module_shapes
from vbserve.settings import Settings
from vbserve.training import TrainingHyperparameters, parse_jsonl, train_adapter
from vbserve.training.data import Example
from vbserve.training.trainer import Progress, VBLoRAParameters, collate, evaluate, plan_batches, target_count
from vbserve_store import decode_adapter, encode_adapter
from vbserve_store.store import SQLiteAdapterStore

DATA = Path(__file__).resolve().parent / "data"
TENANT = "bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class PeakRSS:
    """Peak resident memory of this process during a `with` block, in MiB."""

    def __enter__(self) -> PeakRSS:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mib = (_status_kib("VmHWM") - self.start) / 1024


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class Turns:
    """Lets the two trainers, each in its own process, take optimizer steps in turn: load
    from other processes on a shared machine then falls on both alike, and a step is timed
    from the moment its process gets the turn until the step ends."""

    def __init__(self, mine: multiprocessing.synchronize.Semaphore, theirs: multiprocessing.synchronize.Semaphore):
        self.mine, self.theirs = mine, theirs
        self.durations: list[float] = []

    def begin(self) -> None:
        self.mine.acquire()
        self._began = time.perf_counter()

    def step_done(self, last: bool) -> None:
        self.durations.append(time.perf_counter() - self._began)
        self.theirs.release()
        if not last:
            self.begin()

    @property
    def steps_per_s(self) -> float:
        """1 / median step time: the median leaves out the first step and validation steps."""
        return 1.0 / statistics.median(self.durations)


def touch(model: torch.nn.Module) -> None:
    """Fault the (copy-on-write, partly file-mapped) weights into this process before its
    memory is measured, so the measurement is the training's own."""
    with torch.no_grad():
        for p in model.parameters():
            p.sum()


def train_ours(model, train: list[Example], val: list[Example], hp: TrainingHyperparameters, config, pad, turns):
    losses: list[float] = []

    def on_progress(progress: Progress) -> None:
        losses.append(progress.loss)
        turns.step_done(last=progress.step == progress.total_steps)
        if progress.step % 10 == 0:
            log(f"  ours step {progress.step}/{progress.total_steps} loss {progress.loss:.4f}")

    touch(model)
    with PeakRSS() as mem:
        turns.begin()
        result = train_adapter(model, train, hp, config, val_examples=val, pad_token_id=pad, on_progress=on_progress)
    return {
        "adapter": encode_adapter(result.adapter),
        "val_loss": result.val_loss,
        "losses": losses,
        "steps_per_s": turns.steps_per_s,
        "peak_mib": mem.peak_mib,
    }


def train_peft(base, train: list[Example], val: list[Example], hp: TrainingHyperparameters, config, pad, turns):
    """PEFT's VB-LoRA with the same data pipeline, loss, optimizer and schedule as ours."""
    from peft import VBLoRAConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    peft_model = get_peft_model(
        copy.deepcopy(base),
        VBLoRAConfig(
            r=hp.r,
            vector_length=hp.vector_length,
            num_vectors=hp.num_vectors,
            topk=hp.topk,
            target_modules=hp.target_modules,
        ),
    )
    VBLoRAParameters(config, seed=hp.seed).copy_into_peft(peft_model)
    named = list(peft_model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if "vblora_vector_bank" in n], "lr": hp.lr_bank, "weight_decay": 0.0},
            {"params": [p for n, p in named if "vblora_logits" in n], "lr": hp.lr_logits, "weight_decay": 0.0},
        ]
    )
    total = hp.max_steps
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(hp.warmup_ratio * total), total)
    lengths = [len(e.input_ids) for e in train]
    losses: list[float] = []
    step, epoch = 0, 0
    touch(peft_model)
    with PeakRSS() as mem, torch.random.fork_rng(devices=[]):
        torch.manual_seed(hp.seed)
        peft_model.train()
        turns.begin()
        while step < total:
            batches = plan_batches(lengths, hp.batch_size, seed=hp.seed, epoch=epoch)
            for start in range(0, len(batches), hp.grad_accum_steps):
                group = [[train[i] for i in b] for b in batches[start : start + hp.grad_accum_steps]]
                denominator = max(1, sum(target_count(b) for b in group))
                step_loss = 0.0
                for batch in group:
                    ids, mask, labels = collate(batch, pad)
                    # Hugging Face's own causal-LM loss, the way PEFT models are trained:
                    # summed over the step's micro-batches, divided by its target tokens.
                    part = peft_model(
                        input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=denominator
                    ).loss
                    part.backward()
                    step_loss += float(part.detach())
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(step_loss)
                turns.step_done(last=step == total)
                if step % 10 == 0:
                    log(f"  peft step {step}/{total} loss {step_loss:.4f}")
                if step == total:
                    break
            epoch += 1
        val_loss = evaluate(peft_model, lambda: None, val, hp.batch_size, pad)
    return {"val_loss": val_loss, "losses": losses, "steps_per_s": turns.steps_per_s, "peak_mib": mem.peak_mib}


def train_both(*args) -> tuple[dict, dict]:
    """Both trainers in forked children of this process (they share the loaded model
    copy-on-write; neither inherits memory the other freed), stepping in turn, PEFT first."""
    ctx = multiprocessing.get_context("fork")
    peft_turn, our_turn = ctx.Semaphore(1), ctx.Semaphore(0)
    results = []
    for fn, turns in ((train_peft, Turns(peft_turn, our_turn)), (train_ours, Turns(our_turn, peft_turn))):
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=lambda fn=fn, turns=turns, send=send: send.send(fn(*args, turns)))
        child.start()
        results.append((receive, child))
    outputs = []
    for receive, child in results:
        outputs.append(receive.recv())
        child.join()
    return outputs[0], outputs[1]


async def exact_match(engine, tokenizer, rows: list[dict], adapter: AdapterRef | None) -> float:
    """Share of rows whose greedy completion (up to 16 tokens or EOS) is exactly right."""

    async def one(row: dict) -> bool:
        request = GenerationRequest(
            prompt_ids=tokenizer.encode(row["prompt"]), adapter=adapter, sampling=SamplingParams(max_new_tokens=16)
        )
        result = await (await engine.submit(request)).result()
        return result.text.strip() == row["completion"].strip()

    hits = await asyncio.gather(*(one(row) for row in rows))
    return sum(hits) / len(rows)


async def base_and_tuned_accuracy(model, tokenizer, store, rows: list[dict], r: int) -> tuple[float, float]:
    """One engine (it wraps the model's layers in place, once) serves both."""
    settings = Settings(max_batch_size=32, max_queue=128, max_adapter_slots=2, max_lora_rank=r, max_model_len=128)
    engine = build_engine(model, tokenizer, describe_model(model, tokenizer, settings), store, settings)
    try:
        base = await exact_match(engine, tokenizer, rows, None)
        tuned = await exact_match(engine, tokenizer, rows, AdapterRef(TENANT, "reverse"))
    finally:
        engine.shutdown()
    return base, tuned


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(cache_dir=Settings().model_cache_dir)
    model, tok = loaded.model, loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hp = TrainingHyperparameters(
        target_modules=args.targets.split(","),
        r=4,
        vector_length=64,
        num_vectors=256,
        topk=2,
        max_steps=args.steps,
        batch_size=args.batch_size,
        warmup_ratio=0.1,
        max_seq_len=64,
        seed=args.seed,
    )
    train_bytes = (DATA / "reverse_words.train.jsonl").read_bytes()
    val_bytes = (DATA / "reverse_words.validation.jsonl").read_bytes()
    train = parse_jsonl(train_bytes, tok, max_seq_len=hp.max_seq_len)
    val = parse_jsonl(val_bytes, tok, max_seq_len=hp.max_seq_len, field="validation_file")
    val_rows = [json.loads(line) for line in val_bytes.splitlines()]
    config = hp.check_fits(module_shapes(model), base_model=loaded.name)
    log(f"{len(train)} training rows, {len(val)} held out; {config.num_subvectors} sub-vectors x {hp.num_vectors}")

    log("training: PEFT and ours, in turn ...")
    peft, ours = train_both(model, train, val, hp, config, pad)
    adapter = decode_adapter(ours["adapter"])
    peft_val, peft_losses, peft_mem = peft["val_loss"], peft["losses"], peft["peak_mib"]
    our_val, our_losses, our_mem = ours["val_loss"], ours["losses"], ours["peak_mib"]

    log("exact match through the engine ...")
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteAdapterStore(Path(tmp) / "adapters.db")
        store.put(TENANT, "reverse", adapter)
        base_acc, tuned_acc = asyncio.run(base_and_tuned_accuracy(model, tok, store, val_rows, hp.r))
        store.close()

    ours_rate, peft_rate = ours["steps_per_s"], peft["steps_per_s"]
    rows = [
        ("steps/s", ours_rate, peft_rate),
        ("peak memory delta (MiB)", our_mem, peft_mem),
        ("final train loss (last step)", our_losses[-1], peft_losses[-1]),
        ("train loss (mean of last 10)", statistics.mean(our_losses[-10:]), statistics.mean(peft_losses[-10:])),
        ("validation loss", our_val, peft_val),
    ]
    print(
        f"SmolLM2-135M float32, {torch.get_num_threads()} threads, {hp.max_steps} steps x batch {hp.batch_size}, "
        f"targets {','.join(hp.target_modules)}, r={hp.r} b={hp.vector_length} h={hp.num_vectors} k={hp.topk}"
    )
    print(f"{'':<32}{'ours':>12}{'PEFT':>12}")
    for name, ours, peft in rows:
        print(f"{name:<32}{ours:>12.4f}{peft:>12.4f}")
    speed = ours_rate / peft_rate
    val_gap = abs(our_val - peft_val) / peft_val
    print(f"{'speed ours/PEFT [target >= 1.0]':<32}{speed:>12.3f}")
    print(f"{'val loss gap [target <= 2%]':<32}{val_gap * 100:>11.3f}%")
    print(f"{'exact match, base model':<32}{base_acc:>12.3f}")
    print(f"{'exact match, our adapter':<32}{tuned_acc:>12.3f}")
    summary = {
        "steps": hp.max_steps,
        "batch_size": hp.batch_size,
        "threads": torch.get_num_threads(),
        "ours_steps_per_s": round(ours_rate, 4),
        "peft_steps_per_s": round(peft_rate, 4),
        "speed_ratio": round(speed, 4),
        "ours_peak_mib": round(our_mem, 1),
        "peft_peak_mib": round(peft_mem, 1),
        "ours_final_train_loss": round(our_losses[-1], 5),
        "peft_final_train_loss": round(peft_losses[-1], 5),
        "ours_val_loss": round(our_val, 5),
        "peft_val_loss": round(peft_val, 5),
        "val_loss_gap": round(val_gap, 6),
        "exact_match_base": base_acc,
        "exact_match_ours": tuned_acc,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
