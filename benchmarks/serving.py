"""Serving throughput on SmolLM2-135M, all measured side by side in one run.

(a) our engine, base model only          (b) 32 requests over 32 distinct adapters
(c) 32 requests on one adapter           (d) PEFT, switching the active adapter per request
(e) plain HF `generate`, one batch of the base model (the ceiling)
plus time to first token for a cold adapter (store fetch + compose + prefill) vs a cached one.

Throughput is generated tokens per second of wall time, prefill included. On a shared CPU
one run of a case can be 20% off the next, so (a), (b), (c) and (e) run `--rounds` times,
interleaved (e a b c, then c b a e, ...), and the table reports medians; each ratio is the median of
its per-round ratios (the two cases of a round ran seconds apart, so machine load mostly
cancels). (d) takes minutes per run and runs once.

    .venv/bin/python benchmarks/serving.py [--requests 32] [--new-tokens 32] [--rounds 5]

Prints a table and, as its last line, a JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import random_peft_vblora
from vbserve.engine import AdapterRef, GenerationRequest, SamplingParams, build_engine
from vbserve.model import describe_model, load_model
from vbserve.settings import Settings
from vbserve_store.peft_io import load_peft_dir
from vbserve_store.store import SQLiteAdapterStore

TENANT = "bench"
TOPICS = ["the sea", "a robot", "autumn", "a city at night", "mathematics", "a cat", "coffee", "the moon"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = f"Write a short poem about {TOPICS[i % len(TOPICS)]}."
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


async def run_engine(engine, jobs: list[tuple[list[int], str | None]], new_tokens: int) -> tuple[float, int]:
    """Submit all jobs at once; return (seconds, generated tokens)."""
    start = time.perf_counter()

    async def one(ids, adapter):
        ref = AdapterRef(TENANT, adapter) if adapter else None
        sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        return await (await engine.submit(GenerationRequest(ids, sp, adapter=ref))).result()

    results = await asyncio.gather(*(one(ids, a) for ids, a in jobs))
    return time.perf_counter() - start, sum(r.usage.completion_tokens for r in results)


def tok_s(run: tuple[float, int]) -> float:
    secs, tokens = run
    return tokens / secs


async def ttft(engine, ids, adapter) -> float:
    sp = SamplingParams(max_new_tokens=1)
    start = time.perf_counter()
    handle = await engine.submit(GenerationRequest(ids, sp, adapter=AdapterRef(TENANT, adapter)))
    async for _ in handle:
        return time.perf_counter() - start
    raise AssertionError


def hf_generate(model, tokenizer, ps: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """One left-padded batch through HF generate."""
    width = max(len(p) for p in ps)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=pad,
        )  # fmt: skip
    return time.perf_counter() - start, (out.shape[1] - width) * len(ps)


def peft_per_request(peft_model, ps: list[list[int]], names: list[str], new_tokens: int) -> tuple[float, int]:
    """PEFT cannot batch different VB-LoRA adapters: switch the active adapter per request."""
    start = time.perf_counter()
    total = 0
    with torch.inference_mode():
        for ids, name in zip(ps, names, strict=True):
            peft_model.set_adapter(name)
            out = peft_model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            total += out.shape[1] - len(ids)
    return time.perf_counter() - start, total


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n, new, rounds = args.requests, args.new_tokens, args.rounds
    torch.manual_seed(0)

    log("loading SmolLM2-135M ...")
    loaded = load_model(cache_dir=Settings().model_cache_dir)
    base, tok = loaded.model, loaded.tokenizer
    ps = prompts(tok, n)
    tmp = Path(tempfile.mkdtemp())

    log(f"building {n} random VB-LoRA adapters with PEFT (q,v; r=4 b=64 h=256 k=2) ...")
    peft_model = random_peft_vblora(base, r=4, b=64, h=256, k=2, targets=["q_proj", "v_proj"], seed=0, bank_scale=0.2)
    from peft import VBLoRAConfig

    names = [f"a{i}" for i in range(n)]
    store = SQLiteAdapterStore(tmp / "store.db")
    for i, name in enumerate(names):
        if i:
            cfg = VBLoRAConfig(r=4, vector_length=64, num_vectors=256, topk=2, target_modules=["q_proj", "v_proj"])
            peft_model.add_adapter(name, cfg)
            with torch.no_grad():
                gen = torch.Generator().manual_seed(i)
                for pname, p in peft_model.named_parameters():
                    if f"vblora_logits_A.{name}" in pname or f"vblora_logits_B.{name}" in pname:
                        p.copy_(torch.randn(p.shape, generator=gen))
                    elif pname.endswith(f"vblora_vector_bank.{name}"):
                        p.copy_((torch.rand(p.shape, generator=gen) - 0.5) * 0.2)
        peft_model.save_pretrained(tmp / "ckpt", selected_adapters=[name if i else "default"])
        sub = tmp / "ckpt" / name if i else tmp / "ckpt"
        store.put(TENANT, name, load_peft_dir(sub))
    names[0] = "default"
    store_names = [f"a{i}" for i in range(n)]
    store_names[0] = "a0"
    store.put(TENANT, "a0", load_peft_dir(tmp / "ckpt"))
    for i in range(rounds):  # one never-loaded adapter per cold TTFT sample
        store.put(TENANT, f"cold{i}", load_peft_dir(tmp / "ckpt" / names[1 + i % (n - 1)]))

    settings = Settings(max_batch_size=n, max_adapter_slots=n + 2, max_lora_rank=8, max_model_len=512)
    engine = build_engine(copy.deepcopy(base), tok, describe_model(base, tok, settings), store, settings)
    jobs = {
        "a": [(p, None) for p in ps],
        "b": list(zip(ps, store_names, strict=True)),
        "c": [(p, "a1") for p in ps],
    }
    runs: dict[str, list[float]] = {k: [] for k in "abce"}
    try:
        log("warm-up ...")
        for case_jobs in jobs.values():
            await run_engine(engine, case_jobs, 4)
        hf_generate(base, tok, ps, 4)
        for i in range(rounds):
            order = "eabc" if i % 2 == 0 else "cbae"  # (a) next to (b) and (e), each side first in turn
            log(f"round {i + 1}/{rounds}: {', '.join(order)} ...")
            for k in order:
                result = hf_generate(base, tok, ps, new) if k == "e" else await run_engine(engine, jobs[k], new)
                runs[k].append(tok_s(result))
        log("TTFT cold vs cached ...")
        cold = statistics.median([await ttft(engine, ps[0], f"cold{i}") for i in range(rounds)])
        cached = statistics.median([await ttft(engine, ps[0], "cold0") for _ in range(rounds)])
    finally:
        engine.shutdown()
    log(f"(d) PEFT, {n} requests switching adapters ...")
    d = tok_s(peft_per_request(peft_model, ps, names, new))

    tps = {k: statistics.median(v) for k, v in runs.items()} | {"d": d}
    spread = {k: (min(v), max(v)) for k, v in runs.items()} | {"d": (d, d)}
    labels = {
        "a": "engine, base only",
        "b": f"engine, {n} distinct adapters",
        "c": "engine, one adapter",
        "d": "PEFT, adapter switched per request",
        "e": "HF generate batch, base (ceiling)",
    }
    print(
        f"SmolLM2-135M float32, {torch.get_num_threads()} threads, {n} requests x {new} new tokens, "
        f"median of {rounds} rounds ((d): 1 run)"
    )
    print(f"{'case':<40}{'tok/s':>10}{'min':>10}{'max':>10}")
    for k in "abcde":
        print(f"({k}) {labels[k]:<36}{tps[k]:>10.1f}{spread[k][0]:>10.1f}{spread[k][1]:>10.1f}")

    def paired(num: str, den: str) -> list[float]:
        return [x / y for x, y in zip(runs[num], runs[den], strict=True)]

    per_round = {"b_over_a": paired("b", "a"), "a_over_e": paired("a", "e")}
    ratios = {k: statistics.median(v) for k, v in per_round.items()} | {"b_over_d": tps["b"] / tps["d"]}
    for key, label, target in [("b_over_a", "(b)/(a)", 0.9), ("b_over_d", "(b)/(d)", 6), ("a_over_e", "(a)/(e)", 0.9)]:
        rounds_txt = "  rounds: " + " ".join(f"{r:.2f}" for r in per_round[key]) if key in per_round else ""
        print(f"{f'{label} [target >= {target}]':<40}{ratios[key]:>10.2f}{rounds_txt}")
    print(f"{'TTFT cold adapter (ms)':<40}{cold * 1e3:>10.1f}")
    print(f"{'TTFT cached adapter (ms)':<40}{cached * 1e3:>10.1f}")
    summary = {f"tok_s_{k}": round(v, 1) for k, v in tps.items()}
    summary.update({k: round(v, 3) for k, v in ratios.items()})
    summary.update(ttft_cold_ms=round(cold * 1e3, 1), ttft_cached_ms=round(cached * 1e3, 1))
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
