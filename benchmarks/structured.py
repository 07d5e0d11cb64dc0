"""Structured generation's cost in a mixed batch, on SmolLM2-135M: a batch of 32 requests
of which 8 carry a `response_format` JSON Schema, against the same 32 requests unconstrained.

Throughput is generated tokens per second of wall time, prefill included. All rows are greedy
(the unconstrained batch keeps the sampler's fast path, the harshest comparison) and the
unconstrained ones ignore EOS, so every row runs to --new-tokens; the schema asks for a string
of at least 200 characters, so the constrained rows do too. The two batches run in alternating rounds (A B, B A,
...) and the ratio is the median of the per-round ratios: machine load mostly cancels. The
schema is compiled (and cached) once before the rounds, as a server sees a repeated schema.

    .venv/bin/python benchmarks/structured.py [--requests 32] [--constrained 8] [--new-tokens 32] [--rounds 5]

Prints a table and, as its last line, a JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine import GenerationRequest, ResponseFormat, SamplingParams, build_engine
from server.engine.model_loader import load_model
from server.settings import Settings

TOPICS = ["the sea", "a robot", "autumn", "a city at night", "mathematics", "a cat", "coffee", "the moon"]
SCHEMA = {
    "type": "object",
    # A story of at least 200 characters: longer than --new-tokens, so the constrained rows
    # run to the limit like the others (a row ending early would change the batch, not the cost).
    "properties": {"title": {"type": "string"}, "story": {"type": "string", "minLength": 200}},
    "required": ["title", "story"],
}
TARGET = 0.85


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = f"Write a story about {TOPICS[i % len(TOPICS)]} as JSON with a title and a story."
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


async def run(engine, requests: list[GenerationRequest]) -> tuple[float, int]:
    """Submit all at once; (seconds, generated tokens)."""
    start = time.perf_counter()
    handles = [await engine.submit(r) for r in requests]
    results = [await h.result() for h in handles]
    seconds = time.perf_counter() - start
    failed = [r.error for r in results if r.finish_reason == "error"]
    assert not failed, failed
    return seconds, sum(r.usage.completion_tokens for r in results)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--constrained", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(cache_dir=Settings().model_cache_dir)
    settings = Settings(max_batch_size=args.requests, max_queue=2 * args.requests, max_model_len=256)
    engine = build_engine(loaded.model, loaded.tokenizer, None, settings)
    ids = prompts(loaded.tokenizer, args.requests)
    fmt = ResponseFormat(json.dumps(SCHEMA))
    every = args.requests // args.constrained  # constrained rows spread through the batch

    def batch(constrained: bool) -> list[GenerationRequest]:
        return [
            GenerationRequest(p, SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))
            if not constrained or i % every
            else GenerationRequest(p, SamplingParams(max_new_tokens=args.new_tokens), response_format=fmt)
            for i, p in enumerate(ids)
        ]

    try:
        await run(engine, batch(True))  # warm-up: first forward passes, the schema's compile
        rates: dict[str, list[float]] = {"unconstrained": [], "mixed": []}
        generated: dict[str, int] = {}
        ratios = []
        for r in range(args.rounds):
            order = ["unconstrained", "mixed"] if r % 2 == 0 else ["mixed", "unconstrained"]
            for name in order:
                seconds, tokens = await run(engine, batch(name == "mixed"))
                rates[name].append(tokens / seconds)
                generated[name] = tokens
            ratios.append(rates["mixed"][-1] / rates["unconstrained"][-1])
    finally:
        engine.shutdown()
    ratio = statistics.median(ratios)
    print(
        f"SmolLM2-135M, {args.requests} requests x {args.new_tokens} new tokens, greedy, "
        f"{args.threads} threads, {args.rounds} alternating rounds (medians)"
    )
    print(f"  {'batch':44s} tokens/s  tokens per round")
    names = {
        "unconstrained": f"{args.requests} unconstrained",
        "mixed": f"{args.requests - args.constrained} unconstrained + {args.constrained} with a JSON Schema",
    }
    for name, label in names.items():
        print(f"  {label:44s} {statistics.median(rates[name]):8.1f}  {generated[name]:16d}")
    met = "met" if ratio >= TARGET else "NOT met"
    print(
        f"mixed / unconstrained: {ratio:.3f} (per-round: {', '.join(f'{x:.3f}' for x in ratios)}; target >= {TARGET}: {met})"
    )
    summary = {
        "ratio": round(ratio, 3),
        "target_met": ratio >= TARGET,
        "unconstrained_tokens_per_s": round(statistics.median(rates["unconstrained"]), 1),
        "mixed_tokens_per_s": round(statistics.median(rates["mixed"]), 1),
        "per_round_ratios": [round(x, 3) for x in ratios],
        "generated_tokens": generated,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
