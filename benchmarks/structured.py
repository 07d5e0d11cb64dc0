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
import xgrammar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vbserve.engine import GenerationRequest, ResponseFormat, SamplingParams, build_engine
from vbserve.engine.grammar import mask_logits
from vbserve.model import describe_model, load_model
from vbserve.settings import Settings

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


def mask_cost_ms(grammar, rows: int, constrained: int, vocab: int, steps: int) -> float:
    """Median ms per step of what a mixed batch adds to sampling: `mask_logits` (the logits'
    copy, the masks' fill and apply) and the matchers' accept, with `constrained` of `rows`
    rows following the grammar greedily on random logits. Independent of the model, so of the
    machine load that swamps the end-to-end rounds."""
    matchers = [xgrammar.GrammarMatcher(grammar) if i % (rows // constrained) == 0 else None for i in range(rows)]
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        logits = torch.randn(rows, vocab, generator=gen)
        start = time.perf_counter()
        tokens = mask_logits(logits, matchers).argmax(-1).tolist()
        for matcher, token in zip(matchers, tokens, strict=True):
            if matcher is not None:
                assert matcher.accept_token(token)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
    base_model = describe_model(loaded.model, loaded.tokenizer, settings)
    engine = build_engine(loaded.model, loaded.tokenizer, base_model, None, settings)
    ids = prompts(loaded.tokenizer, args.requests)
    fmt = ResponseFormat(SCHEMA)
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
        grammar = await engine.grammars.compile(fmt)
        mask_ms = mask_cost_ms(grammar, args.requests, args.constrained, base_model.vocab_size, args.new_tokens)
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
    step_ms = 1e3 * args.requests / statistics.median(rates["mixed"])  # every row draws one token a step
    print(f"grammar work per step (copy + fill + apply + accept): {mask_ms:.2f} ms of about {step_ms:.0f} ms a step")
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
        "grammar_ms_per_step": round(mask_ms, 3),
        "ms_per_step": round(step_ms, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
