"""Time one decode step's sampling (`sample_next_tokens`) for a batch of 32 rows over
SmolLM2's vocabulary (49,152), per mix of settings: the greedy fast path must not pay for
settings its rows do not use.

    .venv/bin/python benchmarks/sampling_step.py [--baseline OLD_CHECKOUT]

With --baseline, the sampler of another checkout (e.g. `git archive <commit> | tar -x -C
/tmp/old`) is timed interleaved with this one, round by round, on the cases both support.
Prints the median and the minimum over rounds in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

ROWS, VOCAB, PROMPT, GENERATED = 32, 49152, 64, 128


def load_sampler(checkout: Path) -> ModuleType:
    """`sampling.py` of another checkout's engine (with the contract module it imports,
    `contract.py`, `types.py` before the rename), as its own package."""
    package = Path(tempfile.mkdtemp()) / "baseline_engine"
    package.mkdir()
    (package / "__init__.py").write_text("")
    engine = checkout / "server" / "vbserve" / "engine"
    engine = engine if engine.is_dir() else checkout / "server" / "engine"  # before the import names
    for name in ("sampling.py", "contract.py", "types.py"):
        if (engine / name).exists():
            shutil.copy(engine / name, package / name)
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("baseline_engine.sampling")


def cases(params_class: type) -> dict[str, list]:
    new = "min_p" in inspect.signature(params_class).parameters
    greedy = [params_class(temperature=0.0) for _ in range(ROWS)]
    sampled = [params_class(temperature=0.8, top_p=0.95, top_k=50, seed=i) for i in range(ROWS)]
    found = {"32 greedy": greedy, "32 sampled (temperature, top-k, top-p)": sampled}
    if new:
        one = dict(frequency_penalty=0.5, presence_penalty=0.5, logit_bias={i: 5.0 for i in range(20)}, min_tokens=200)
        found["31 greedy + 1 with penalties, bias, min_tokens"] = [*greedy[:-1], params_class(**one)]
        found["32 sampled, all with penalties, bias, min_p"] = [
            params_class(temperature=0.8, top_p=0.95, min_p=0.05, seed=i, **one) for i in range(ROWS)
        ]
    return found


def step(module: ModuleType, params: list, logits: torch.Tensor, prompts: list, outputs: list) -> Callable[[], None]:
    """One step's sampling call, as the engine makes it with this sampler."""
    generators = [torch.Generator().manual_seed(p.seed) if p.temperature > 0 else None for p in params]
    if "history" in inspect.signature(module.sample_next_tokens).parameters:  # before issue #13
        rows = zip(params, prompts, outputs, strict=True)
        history = [q + o if p.repetition_penalty != 1.0 else [] for p, q, o in rows]
        return lambda: module.sample_next_tokens(logits, params, generators, history)
    return lambda: module.sample_next_tokens(logits, params, generators, prompts, outputs, {2})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vbserve.engine import sampling
    from vbserve.engine.contract import SamplingParams

    samplers = {"this checkout": (sampling, SamplingParams)}
    if args.baseline:
        old = load_sampler(args.baseline)
        contract = "contract" if importlib.util.find_spec("baseline_engine.contract") else "types"
        samplers["baseline"] = (old, importlib.import_module(f"baseline_engine.{contract}").SamplingParams)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(ROWS, VOCAB, generator=gen) * 3
    prompts = [torch.randint(0, VOCAB, (PROMPT,), generator=gen).tolist() for _ in range(ROWS)]
    outputs = [torch.randint(0, VOCAB, (GENERATED,), generator=gen).tolist() for _ in range(ROWS)]
    names = list(cases(SamplingParams))
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for case in names:
            for label, (module, params_class) in samplers.items():
                params = cases(params_class).get(case)
                if params is None:
                    continue
                call = step(module, params, logits, prompts, outputs)
                start = time.perf_counter()
                call()
                times.setdefault((case, label), []).append((time.perf_counter() - start) * 1e3)
    print(f"{ROWS} rows x {VOCAB} vocabulary, {args.threads} threads, {args.rounds} rounds (ms; on a busy machine")
    print("the minimum is the steadier figure):")
    for (case, label), values in times.items():
        print(f"  {case:50s} {label:14s} median {statistics.median(values):8.3f}  min {min(values):8.3f}")


if __name__ == "__main__":
    main()
