"""Time incremental detokenization (`IncrementalDetokenizer.add`) per generated token on
SmolLM2's tokenizer: what the engine thread spends turning each row's new token into text,
with a stop string to watch for, as in a batch of 32 rows of 256 tokens.

    .venv/bin/python benchmarks/detokenizer.py --baseline OLD_CHECKOUT

With --baseline, the detokenizer of another checkout (e.g. `git archive <commit> | tar -x
-C /tmp/old`) is timed interleaved with this one, round by round. Prints a table of
microseconds per token (median and minimum over rounds) and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

ROWS, TOKENS, CONTEXT = 32, 256, 6
STOP = ["\n\nUser:"]
# Prose with some multi-byte characters, so some tokens end inside a character.
TEXT = (
    "The café on the corner opens at seven; its naïve owner greets everyone with a smile. "
    "Prices are in € and ¥, and the menu lists crème brûlée, 寿司 and 饺子 — all made fresh. "
    "Visitors leave notes like “merci!” or 🎉 on the wall, and the wall is nearly full.\n"
)


def load_detokenizer(path: Path) -> ModuleType:
    """`server/vbserve/engine/detokenizer.py` of a checkout, loaded on its own (it imports only
    the tokenizer libraries)."""
    spec = importlib.util.spec_from_file_location(f"detokenizer_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_batch(module: ModuleType, tokenizer, rows: list[list[int]]) -> float:
    """Seconds to detokenize every row of `rows` token by token, rows interleaved as the
    engine steps them."""
    detoks = [module.IncrementalDetokenizer(tokenizer, STOP, row[:CONTEXT]) for row in rows]
    start = time.perf_counter()
    for i in range(CONTEXT, CONTEXT + TOKENS):
        for detok, row in zip(detoks, rows, strict=True):
            detok.add(row[i])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, help="another checkout to time interleaved with this one")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from vbserve.model.loader import load_model
    from vbserve.settings import Settings

    tokenizer = load_model(cache_dir=Settings().model_cache_dir).tokenizer
    ids = tokenizer.encode(TEXT * 40)
    rows = [ids[r * 7 : r * 7 + CONTEXT + TOKENS] for r in range(ROWS)]  # each row its own offset
    versions = {"this checkout": load_detokenizer(root / "server/vbserve/engine/detokenizer.py")}
    if args.baseline:
        path = args.baseline / "server/vbserve/engine/detokenizer.py"
        path = path if path.exists() else args.baseline / "server/engine/detokenizer.py"  # before the import names
        versions["baseline"] = load_detokenizer(path)
    per_token: dict[str, list[float]] = {label: [] for label in versions}
    for _ in range(args.rounds):
        for label, module in versions.items():
            per_token[label].append(one_batch(module, tokenizer, rows) / (ROWS * TOKENS) * 1e6)
    print(f"{ROWS} rows x {TOKENS} tokens, stop {STOP!r}, {args.rounds} rounds (us per token; a busy machine")
    print("makes the minimum the steadier figure):")
    print("| detokenizer | us/token (median) | min |")
    print("|---|---|---|")
    for label, values in per_token.items():
        print(f"| {label} | {statistics.median(values):.1f} | {min(values):.1f} |")
    result = {label: round(statistics.median(values), 2) for label, values in per_token.items()}
    if args.baseline:
        ratios = [b / t for t, b in zip(per_token["this checkout"], per_token["baseline"], strict=True)]
        result["baseline / this checkout"] = round(statistics.median(ratios), 2)
        print(f"baseline / this checkout, per round: {' '.join(f'{r:.2f}' for r in ratios)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
