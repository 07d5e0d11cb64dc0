"""Quality: what a tenant gets from a vbserve job against what it would otherwise train.

Three held-out generation tasks of different kinds, made here from a fixed seed (the
base model cannot do any of them exactly; each row is short, so a full run fits a
shared 2-core machine):

- `record`: data to a fixed-style sentence ("name: Ana | age: 34 | job: baker | city:
  Lyon" -> "Ana, 34, works as a baker in Lyon.");
- `date`: a format conversion ("March 5, 2021" -> "2021-03-05");
- `verdict`: classification answered in words (a two-clause review -> "positive",
  "negative" or "mixed").

Each task has train / validation / test splits; the score is exact match on the test
split (greedy, up to the longest answer's length, stripped text equal). `--score-on
validation` scores the validation split instead: settings are chosen on it, so the test
split stays held out.

For each task, with the same number of optimizer steps and the same batch size (by
default the steps a job with default hyperparameters takes on the task's training rows,
`TrainingHyperparameters.total_steps`; `--steps` sets them for all):
- `base`: the base model alone (served);
- `lora`: PEFT LoRA r=8 (alpha 16) on q,v, AdamW lr `--lora-lr`, linear schedule with 10%
  warmup (what a user would otherwise train);
- `peft_vblora`: PEFT VB-LoRA with the paper's settings (r=4, h=256, k=2, bank lr 1e-3,
  logits lr 1e-2, q,v) at b=64, the largest power of two dividing SmolLM2's 576 and 192;
- `vbserve_paper`: a vbserve job through the HTTP API with the paper's settings, as above
  (the trainer matches PEFT's VB-LoRA: `benchmarks/training.py`);
- `vbserve_default`: a vbserve job through the HTTP API with its default hyperparameters
  (nothing given, unless `--steps` or `--batch-size` is);
- `vbserve_best`: a job with the best settings found with this script (`BEST`);
- `vbserve_shared`: a job with the defaults trained against a frozen shared bank
  (`bank_of`): the tenant's bank made by one first job on the three tasks' pooled
  training rows, as docs recommend; its score against `vbserve_default` (own bank) is the
  cost of sharing.

Bytes: what is stored per adapter (PEFT: `save_pretrained`'s adapter_model.safetensors,
float32 as the model is; VB-LoRA's with `save_only_topk_weights`: the bank, top-k indices
and k-1 weights, the triplet the paper stores; vbserve: the store's body + bank, and the body
alone, which is what a client holding the bank pulls). Wall time: training plus evaluation.

The PEFT runs train in this process with the trainer's own data pipeline (`parse_jsonl`,
`plan_batches`, token-level mean loss); vbserve jobs run through the HTTP API of an app in
this process (ASGI transport, the embedded worker thread) and are scored through
`/v1/completions`, as a tenant would use them.

    .venv/bin/python benchmarks/quality.py [--steps 60] [--tasks record,date,verdict] [--score-on validation]
    .venv/bin/python benchmarks/quality.py --quick     # tiny random model, seconds: a smoke test

Prints a table and, as its last line, a JSON object of the scores, bytes and times.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vbserve.app import create_app
from vbserve.model.loader import load_model
from vbserve.settings import Settings
from vbserve.training import parse_jsonl
from vbserve.training.data import Example
from vbserve.training.hyperparams import TrainingHyperparameters
from vbserve.training.trainer import collate, loss_sum, plan_batches, target_count
from vbserve_store.store import SQLiteAdapterStore

SEED = 1234
# The best settings this script found for vbserve jobs beyond the defaults: none, the
# defaults are the best it found (ten times the paper's rates; see benchmarks/RESULTS.md).
BEST: dict[str, object] = {}
QV = ["q_proj", "v_proj"]
# The paper's settings (VB-LoRA, Appendix A.1) at b=64, for PEFT's VB-LoRA and a vbserve job.
PAPER = {"target_modules": QV, "r": 4, "vector_length": 64, "num_vectors": 256, "topk": 2, "lr_bank": 1e-3,
         "lr_logits": 1e-2}  # fmt: skip
LORA_R, LORA_ALPHA = 8, 16


def log(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


# -- the tasks -----------------------------------------------------------------------------

NAMES = ["Ana", "Ben", "Chloe", "Dario", "Eva", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Mei"]
JOBS = ["baker", "nurse", "pilot", "teacher", "farmer", "lawyer", "chef", "painter", "miner", "tailor"]
CITIES = ["Lyon", "Oslo", "Porto", "Quito", "Riga", "Seoul", "Tunis", "Utrecht", "Vienna", "Zagreb"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
GOOD = ["delicious", "friendly", "quick", "cozy", "fresh", "generous"]
BAD = ["cold", "rude", "slow", "noisy", "stale", "tiny"]
SUBJECTS = ["the soup", "the staff", "the service", "the room", "the bread", "the portions"]


def record_row(rng: random.Random) -> dict[str, str]:
    name, job, city, age = rng.choice(NAMES), rng.choice(JOBS), rng.choice(CITIES), rng.randint(19, 80)
    fields = [f"name: {name}", f"age: {age}", f"job: {job}", f"city: {city}"]
    rng.shuffle(fields)  # the order varies; the sentence's does not
    return {"prompt": " | ".join(fields) + "\nSentence:", "completion": f" {name}, {age}, works as a {job} in {city}."}


def date_row(rng: random.Random) -> dict[str, str]:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return {"prompt": f"Date: {MONTHS[month - 1]} {day}, {year}\nISO:", "completion": f" {year}-{month:02d}-{day:02d}"}


def verdict_row(rng: random.Random) -> dict[str, str]:
    first, second = rng.sample(SUBJECTS, 2)
    good = [rng.random() < 0.5, rng.random() < 0.5]
    words = [rng.choice(GOOD if g else BAD) for g in good]
    verdict = "positive" if all(good) else "negative" if not any(good) else "mixed"
    review = f"{first.capitalize()} was {words[0]} and {second} was {words[1]}."
    return {"prompt": f"Review: {review}\nVerdict:", "completion": f" {verdict}"}


TASKS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "record": record_row,
    "date": date_row,
    "verdict": verdict_row,
}


@dataclass(frozen=True)
class Task:
    name: str
    train: list[dict[str, str]]
    validation: list[dict[str, str]]
    test: list[dict[str, str]]

    @staticmethod
    def make(name: str, sizes: tuple[int, int, int]) -> Task:
        """Distinct rows (by prompt) split train / validation / test, so no test prompt is
        seen in training."""
        rng, rows, seen = random.Random(f"{SEED}-{name}"), [], set()
        while len(rows) < sum(sizes):
            row = TASKS[name](rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
        a, b = sizes[0], sizes[0] + sizes[1]
        return Task(name, rows[:a], rows[a:b], rows[b:])


def jsonl(rows: list[dict[str, str]]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


# -- scoring -------------------------------------------------------------------------------


def answer_tokens(tokenizer, task: Task) -> int:
    """Generation budget: the longest answer of the task, plus EOS and a little slack."""
    rows = task.test + task.validation
    return max(len(tokenizer.encode(r["completion"], add_special_tokens=False)) for r in rows) + 2


def scored_rows(task: Task, args) -> list[dict[str, str]]:
    return task.validation if args.score_on == "validation" else task.test


def pad_id(tokenizer) -> int:
    """As the worker pads: the pad token, else EOS, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad if pad is not None else 0


def score(answers: list[str], rows: list[dict[str, str]]) -> float:
    return sum(a.strip() == r["completion"].strip() for a, r in zip(answers, rows, strict=True)) / len(rows)


@torch.no_grad()
def generate(model, tokenizer, rows: list[dict[str, str]], max_new_tokens: int, batch: int = 32) -> list[str]:
    """Greedy answers of an in-process model (the base, or a PEFT model), left-padded batches."""
    pad = pad_id(tokenizer)
    model.eval()
    answers = []
    for start in range(0, len(rows), batch):
        prompts = [tokenizer.encode(r["prompt"]) for r in rows[start : start + batch]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


# -- PEFT ----------------------------------------------------------------------------------


def train_peft(peft_model, groups: list[dict], train: list[Example], steps: int, batch_size: int, pad: int) -> None:
    """The vbserve trainer's loop around a PEFT model: same batches (`plan_batches`), same
    token-level mean loss, AdamW over `groups`, linear schedule with 10% warmup."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(groups)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.1 * steps), steps)
    lengths = [len(e.input_ids) for e in train]
    step, epoch = 0, 0
    peft_model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        while step < steps:
            for batch in plan_batches(lengths, batch_size, seed=0, epoch=epoch):
                rows = [train[i] for i in batch]
                ids, mask, labels = collate(rows, pad)
                # PEFT's layers live inside the base model: calling it directly runs them,
                # and lets `loss_sum` skip the LM head off the labelled positions, as ours does.
                (loss_sum(peft_model.get_base_model(), ids, mask, labels) / max(1, target_count(rows))).backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % 20 == 0:
                    log(f"  step {step}/{steps}")
                if step == steps:
                    break
            epoch += 1


def peft_bytes(peft_model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


def run_peft(kind: str, model, tokenizer, task: Task, train: list[Example], args) -> dict:
    from peft import LoraConfig, VBLoRAConfig, get_peft_model

    started = time.perf_counter()
    pad = pad_id(tokenizer)
    if kind == "lora":
        config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=QV)
        peft_model = get_peft_model(copy.deepcopy(model), config)
        groups = [{"params": [p for p in peft_model.parameters() if p.requires_grad], "lr": args.lora_lr}]
    else:
        p = PAPER
        # save_only_topk_weights is the config's, not save_pretrained's: there it would be
        # swallowed by **kwargs and the full (S, h) logits saved.
        config = VBLoRAConfig(r=p["r"], vector_length=p["vector_length"], num_vectors=p["num_vectors"], topk=p["topk"],
                              target_modules=QV, save_only_topk_weights=True)  # fmt: skip
        peft_model = get_peft_model(copy.deepcopy(model), config)
        named = [(n, q) for n, q in peft_model.named_parameters() if q.requires_grad]
        groups = [
            {"params": [q for n, q in named if "vector_bank" in n], "lr": p["lr_bank"], "weight_decay": 0.0},
            {"params": [q for n, q in named if "logits" in n], "lr": p["lr_logits"], "weight_decay": 0.0},
        ]
    train_peft(peft_model, groups, train, args.steps, args.batch_size, pad)
    rows = scored_rows(task, args)
    answers = generate(peft_model, tokenizer, rows, answer_tokens(tokenizer, task))
    return {"score": score(answers, rows), "bytes": peft_bytes(peft_model),
            "wall_s": time.perf_counter() - started}  # fmt: skip


# -- vbserve over HTTP ---------------------------------------------------------------------


async def run_job(api: httpx.AsyncClient, name: str, task_rows: list[dict], validation: list[dict], hp: dict) -> dict:
    """Submit a job as a tenant would (multipart form), wait for it, return the adapter's info."""
    files = {"training_file": ("train.jsonl", jsonl(task_rows), "application/jsonl")}
    if validation:
        files["validation_file"] = ("validation.jsonl", jsonl(validation), "application/jsonl")
    form = {"adapter": name, **{k: ",".join(v) if isinstance(v, list) else str(v) for k, v in hp.items()}}
    r = await api.post("/v1/fine_tuning/jobs", data=form, files=files)
    if r.status_code != 201:
        raise SystemExit(f"job {name} refused: {r.status_code} {r.text}")
    job = r.json()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        await asyncio.sleep(0.5)
        job = (await api.get(f"/v1/fine_tuning/jobs/{job['id']}")).json()
    if job["status"] != "succeeded":
        raise SystemExit(f"job {name} ended {job['status']}: {job['error']}")
    return (await api.get(f"/v1/adapters/{name}")).json()


async def served_answers(api: httpx.AsyncClient, rows: list[dict], adapter: str, max_tokens: int) -> list[str]:
    """All rows at once through /v1/completions: the engine batches them."""

    async def one(row: dict) -> str:
        body = {"model": adapter, "prompt": row["prompt"], "temperature": 0, "max_tokens": max_tokens}
        r = await api.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    return list(await asyncio.gather(*(one(row) for row in rows)))


async def run_vbserve(api, kind: str, task: Task, tokenizer, args, hp: dict) -> dict:
    started = time.perf_counter()
    name = f"{task.name}-{kind.removeprefix('vbserve_')}"
    info = await run_job(api, name, task.train, task.validation if hp.get("eval_steps") else [], hp)
    rows = scored_rows(task, args)
    answers = await served_answers(api, rows, name, answer_tokens(tokenizer, task))
    return {"score": score(answers, rows), "bytes": info["stored_bytes"], "pull_bytes": info["body_bytes"],
            "wall_s": time.perf_counter() - started}  # fmt: skip


# -- the run -------------------------------------------------------------------------------

METHODS = ["base", "lora", "peft_vblora", "vbserve_paper", "vbserve_default", "vbserve_best", "vbserve_shared"]


async def run_all(
    model, tokenizer, tasks: list[Task], args, settings: Settings, methods: list[str]
) -> dict[str, dict[str, dict]]:
    """Task by task, every method (so an interrupted run still has whole comparisons; each
    result is logged as it comes). The app serves a copy of the model: its engine wraps the
    layers in place, and PEFT needs the plain model."""
    steps = {"max_steps": args.steps, "batch_size": args.batch_size}
    # The default job is given only what the command line sets: its steps come from the data.
    given = {k: v for k, v in steps.items() if k in args.given}
    if args.quick:  # the tiny model's context is 256 tokens, under the default max_seq_len
        steps["max_seq_len"] = given["max_seq_len"] = 128
    jobs = {
        "vbserve_paper": {**steps, **PAPER},
        "vbserve_default": given,
        "vbserve_best": {**steps, **json.loads(args.best)},
        "vbserve_shared": {**steps, "bank_of": "pooled"},
    }
    results: dict[str, dict[str, dict]] = {t.name: {} for t in tasks}
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteAdapterStore(Path(tmp) / "adapters.db")
        app = create_app(
            settings.model_copy(update={"jobs_url": f"sqlite:///{tmp}/jobs.db"}),
            model=copy.deepcopy(model),
            tokenizer=tokenizer,
            store=store,
        )
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://quality", timeout=3600) as api:
                if "vbserve_shared" in methods:
                    log("the tenant's bank: a first job on the pooled training rows of all tasks ...")
                    sizes = (len(tasks[0].train), len(tasks[0].validation), len(tasks[0].test))
                    pooled = [row for name in TASKS for row in Task.make(name, sizes).train]
                    random.Random(SEED).shuffle(pooled)
                    await run_job(api, "pooled", pooled, [], {**steps, "max_steps": args.pooled_steps or args.steps})
                base_name = (await api.get("/v1/models")).json()["data"][0]["id"]
                for task in tasks:
                    for kind in methods:
                        log(f"{task.name}: {kind} ...")
                        if kind == "base":
                            started = time.perf_counter()
                            rows = scored_rows(task, args)
                            answers = await served_answers(api, rows, base_name, answer_tokens(tokenizer, task))
                            result = {"score": score(answers, rows), "bytes": 0,
                                      "wall_s": time.perf_counter() - started}  # fmt: skip
                        elif kind in jobs:
                            result = await run_vbserve(api, kind, task, tokenizer, args, jobs[kind])
                        else:
                            train = parse_jsonl(
                                jsonl(task.train), tokenizer, max_seq_len=settings.training_max_batch_tokens
                            )
                            result = await asyncio.to_thread(run_peft, kind, model, tokenizer, task, train, args)
                        results[task.name][kind] = result
                        log(f"{task.name}: {kind} {result}")
        store.close()
    return results


def report(results: dict[str, dict[str, dict]], header: str) -> dict:
    """The table, and the must-show checks where the methods they compare ran."""
    print(header)
    print(f"{'task':<9}{'method':<17}{'exact match':>12}{'bytes':>11}{'pull bytes':>12}{'wall s':>9}")
    summary: dict[str, object] = {}
    for task, methods in results.items():
        for method, r in methods.items():
            pull = r.get("pull_bytes", r["bytes"])
            print(f"{task:<9}{method:<17}{r['score']:>12.3f}{r['bytes']:>11,}{pull:>12,}{r['wall_s']:>9.1f}")
            summary[f"{task}_{method}"] = round(r["score"], 4)
            summary[f"{task}_{method}_bytes"] = r["bytes"]
            if "pull_bytes" in r:
                summary[f"{task}_{method}_pull_bytes"] = r["pull_bytes"]
            summary[f"{task}_{method}_wall_s"] = round(r["wall_s"], 1)
    ran = set.intersection(*(set(m) for m in results.values()))
    if {"lora", "vbserve_default"} <= ran:
        gaps = [round(m["vbserve_default"]["score"] - m["lora"]["score"], 4) for m in results.values()]
        ratio = max(m["vbserve_default"]["bytes"] / m["lora"]["bytes"] for m in results.values())
        summary["default_minus_lora"] = gaps
        summary["default_vs_lora_met"] = sum(g >= 0 for g in gaps) >= min(2, len(gaps)) and min(gaps) >= -0.03
        summary["default_bytes_over_lora"] = round(ratio, 4)
        summary["default_bytes_met"] = ratio <= 1 / 30
        print(f"vbserve default - LoRA r=8: {gaps} (>= 0 on 2 of 3, >= -0.03 on the third: "
              f"{summary['default_vs_lora_met']}); bytes / LoRA's: {ratio:.4f} (<= 1/30: {summary['default_bytes_met']})")  # fmt: skip
    if {"vbserve_shared", "vbserve_default"} <= ran:
        shared = [
            round(m["vbserve_shared"]["score"] / m["vbserve_default"]["score"], 4) if m["vbserve_default"]["score"]
            else None for m in results.values()
        ]  # fmt: skip
        summary["shared_over_own"] = shared
        summary["shared_met"] = all(s is not None and s >= 0.9 for s in shared)
        print(f"frozen shared bank / own bank: {shared} (>= 0.9: {summary['shared_met']})")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a tiny random model and a few rows: a smoke test")
    default_job = TrainingHyperparameters()
    ap.add_argument("--steps", type=int, help="optimizer steps of every method (default: the default job's)")
    ap.add_argument("--batch-size", type=int, help=f"(default: the default job's, {default_job.batch_size})")
    ap.add_argument("--score-on", choices=["test", "validation"], default="test")
    ap.add_argument("--pooled-steps", type=int, help="steps of the job that makes the shared bank (default --steps)")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--best", default=json.dumps(BEST), help="vbserve_best's hyperparameters, a JSON object")
    ap.add_argument("--sizes", default="240,100,100", help="train,validation,test rows per task")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(max_batch_size=32, max_queue=256, max_adapter_slots=8, max_lora_rank=8, max_model_len=256)
    if args.quick:
        from tests.conftest import byte_tokenizer, tiny_llama

        # hidden 128: every dimension divisible by the default vector_length of 64.
        model, tokenizer, name = tiny_llama(hidden=128), byte_tokenizer(), "tiny random Llama"
        args.steps, sizes = 3, (8, 4, 4)
    else:
        loaded = load_model(cache_dir=settings.model_cache_dir)
        model, tokenizer, name = loaded.model, loaded.tokenizer, loaded.name
        sizes = tuple(int(n) for n in args.sizes.split(","))
    args.given = {k for k, v in (("max_steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    args.batch_size = args.batch_size or default_job.batch_size
    args.steps = args.steps or default_job.model_copy(update={"batch_size": args.batch_size}).total_steps(sizes[0])
    tasks = [Task.make(t, sizes) for t in args.tasks.split(",")]
    started = time.perf_counter()
    results = asyncio.run(run_all(model, tokenizer, tasks, args, settings, args.methods.split(",")))
    header = (
        f"{name}, {args.steps} steps x batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"rows train/validation/test {sizes}, scored on {args.score_on}, vbserve_best {args.best}, "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    print(json.dumps(report(results, header)))


if __name__ == "__main__":
    main()
