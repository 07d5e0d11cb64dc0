"""Per-request mixtures of adapters, built as PEFT's `LoraModel.add_weighted_adapter` (0.21)
builds them, so a mixture serves what PEFT's merged adapter computes.

Each component comes as its LoRA matrices `{module: (A (r, in), B (out, r))}` and its
scaling `s` (PEFT's `lora_alpha / r`; 1 for a VB-LoRA adapter, which adds `B A x` unscaled).
With weights `w`:

- `cat` (PEFT's `combination_type="cat"`): A = rows of `w_i s_i A_i` stacked, B = columns
  of `B_i` side by side. Exact: the mixture adds `sum_i w_i s_i B_i A_i`; its rank is the
  sum of the ranks.
- `linear` (PEFT's `"linear"`): the ranks must be equal; A = `sum_i sign_i sqrt(|w_i s_i|) A_i`,
  B = `sum_i sqrt(|w_i s_i|) B_i`. The product has cross terms `B_i A_j`: an approximation
  (PEFT's docs call it rough) at one adapter's rank.

As in PEFT, a module that a component does not target takes nothing from it, and a mixture
of one adapter is `linear` whatever was asked (the two give the same product).
"""

from __future__ import annotations

import math

import torch

Matrices = dict[str, tuple[torch.Tensor, torch.Tensor]]


def mix_lora(parts: list[Matrices], weights: list[float], scalings: list[float], combination: str) -> Matrices:
    """The mixture's matrices `{module: (A (r_mix, in), B (out, r_mix))}`, in the parts' dtype."""
    if not len(parts) == len(weights) == len(scalings) or not parts:
        raise ValueError("mix_lora needs one weight and one scaling per part, and at least one part")
    if len(parts) == 1:
        combination = "linear"
    if combination == "linear" and len({a.shape[0] for p in parts for a, _ in p.values()}) > 1:
        raise ValueError("a linear mixture needs adapters of one rank")
    modules = sorted({name for p in parts for name in p})
    mixed: Matrices = {}
    for name in modules:
        present = [(p[name], w * s) for p, w, s in zip(parts, weights, scalings, strict=True) if name in p]
        if combination == "cat":
            a = torch.cat([a * ws for (a, _), ws in present], dim=0)
            b = torch.cat([b for (_, b), _ in present], dim=1)
        elif combination == "linear":
            a = sum(math.copysign(math.sqrt(abs(ws)), ws) * a for (a, _), ws in present)
            b = sum(math.sqrt(abs(ws)) * b for (_, b), ws in present)
        else:
            raise ValueError(f"unknown combination {combination!r}")
        mixed[name] = (a, b)
    return mixed


def mixed_rank(ranks: list[int], combination: str) -> int:
    """The rank of a mixture of adapters of these ranks (what its slot must hold)."""
    return sum(ranks) if combination == "cat" and len(ranks) > 1 else max(ranks)
