"""Bring your LoRA: fit a VB-LoRA adapter to a plain LoRA adapter's delta weights.

A LoRA adapter adds `s B A x` to a linear layer (`s` its scaling), a VB-LoRA adapter
`B' A' x` with A', B' composed from a bank (`trainer.VBLoRAParameters`). The fit minimises
the relative Frobenius error of the delta weights over all modules,

    E = sum_m ||B'_m A'_m - s B_m A_m||^2 / sum_m ||s B_m A_m||^2,

by gradient descent (AdamW, as the trainer, cosine-decayed) on the logits and, unless it
is frozen, the bank; the result is the best iterate, which the start may be.

It fits the product, not A and B: `B A = (B G)(G^-1 A)` for any invertible G, so the
LoRA's own factors are one arbitrary choice among many, and the VB-LoRA rank may differ
from the LoRA's (a rank-16 LoRA fitted at rank 4 can only reach its best rank-4
approximation). The product's error needs no `(out, in)` matrix: with Gram matrices of the
rank dimension only,

    ||B'A' - D||^2 = <B'^T B', A'A'^T> - 2 <B'^T sB, A'A^T> + <sB^T sB, AA^T>,

O((in + out) r r') per module, in float64 so that a small error is not lost to the
cancellation of its three terms.

Initialization: top-k selection is discrete (a bank vector outside a sub-vector's top-k
gets no gradient), so gradient descent from a random start barely moves which vectors a
sub-vector mixes; the start is a sparse coding of the target instead. The targets are cut
into sub-vectors in the adapter's layout in two factorizations, the LoRA's own (sqrt of
the scaling on each side; only when the VB-LoRA rank is at least the LoRA's) and the
SVD-balanced one (`A* = sqrt(S) V^T`, `B* = U sqrt(S)`, the best rank-r' pair). For each,
every sub-vector gets its best k-mixture of the bank (`_code`: the best segment between
two bank vectors, exact for k = 2); a new bank starts from k-means++ seeds among the
sub-vectors and alternates with the coding, as k-means does (`_refit_bank`, least
squares). The factorization whose coding gives the lower product error is kept, and
gradient descent on the product refines it (the gauge may drift from there).
Measured on a tiny model (tests): a LoRA exported from a VB-LoRA adapter is recovered
exactly against that adapter's bank (relative error < 1e-3); with a new bank of the same
shape the coding reaches about 0.25 (a local optimum of the dictionary learning).

Deterministic for a seed on one device; `on_progress` after every step, `should_stop`
before each (`TrainingCancelled`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vbserve.vblora.compose import compose_adapters
from vbserve_store import AdapterConfig, LoRAAdapter, VBLoRAAdapter

from .errors import TrainingCancelled
from .trainer import VBLoRAParameters, matrices_added

# The initial factorizations tried (module doc): the LoRA's own factors, the SVD-balanced ones.
GAUGES = ("own", "svd")
# Alternations of coding the sub-vectors and refitting a new bank, before gradient descent.
CODING_ROUNDS = 10
# Pair search for each sub-vector among this many nearest bank vectors (all when h is smaller).
PAIR_CANDIDATES = 64
# Logits of unselected bank vectors start this far below the smallest selected one.
LOGIT_MARGIN = 4.0
MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class FitProgress:
    step: int
    total_steps: int
    rel_error: float  # overall relative Frobenius error of the delta weights, the best iterate's so far


@dataclass(frozen=True)
class FitResult:
    adapter: VBLoRAAdapter
    rel_error: float  # overall, of the returned adapter (top-k, in its stored dtype)
    module_errors: dict[str, float]  # per module, of the returned adapter
    steps: int


@dataclass(frozen=True)
class OutputAgreement:
    """How the fitted adapter's model agrees with the LoRA adapter's, on `AGREEMENT_ROWS`
    prompts of `AGREEMENT_TOKENS` random tokens (seeded: the same prompts every time)."""

    rel_error: float  # ||logits_fit - logits_lora|| / ||logits_lora - logits_base||: the adapter's effect missed
    top1_agreement: float  # share of positions where both models' most likely next token is the same


AGREEMENT_ROWS = 4
AGREEMENT_TOKENS = 32


@torch.no_grad()
def output_agreement(model: nn.Module, lora: LoRAAdapter, adapter: VBLoRAAdapter, *, seed: int = 0) -> OutputAgreement:
    """Compare `model` with `lora` against `model` with `adapter` (forward hooks, removed
    after; `model`'s train/eval mode is restored)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    length = min(AGREEMENT_TOKENS, getattr(model.config, "max_position_embeddings", AGREEMENT_TOKENS))
    prompts = torch.randint(vocab, (AGREEMENT_ROWS, length), generator=torch.Generator().manual_seed(seed))
    prompts = prompts.to(device)
    s = lora.config.scaling
    lora_mats = {n: (a.to(device), (b * s).to(device)) for n, (a, b) in lora.matrices().items()}
    fitted = {n: (a[0], b[0]) for n, (a, b) in compose_adapters([adapter], device=device).items()}
    was_training = model.training
    model.eval()
    try:
        plain = model(input_ids=prompts).logits.float()
        outputs = []
        for mats in (lora_mats, fitted):
            with matrices_added(model, list(mats), mats):
                outputs.append(model(input_ids=prompts).logits.float())
    finally:
        model.train(was_training)
    reference, ours = outputs
    effect = float((reference - plain).norm()) or 1.0
    return OutputAgreement(
        float((ours - reference).norm()) / effect, float((ours.argmax(-1) == reference.argmax(-1)).float().mean())
    )


@dataclass(frozen=True)
class _Target:
    """One module's LoRA delta `D = sB A` as its factors and their Gram matrices (float64)."""

    a: torch.Tensor  # (r, in)
    sb: torch.Tensor  # (out, r), scaling folded in
    norm2: float  # ||D||_F^2
    scaling: float

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor, scaling: float) -> _Target:
        a, sb = a.double(), b.double() * scaling
        return cls(a, sb, float(((sb.T @ sb) * (a @ a.T)).sum()), scaling)

    def error2(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """||B'A' - D||_F^2 for A' (r', in), B' (out, r'), differentiable."""
        a, b = a.double(), b.double()
        fitted = ((b.T @ b) * (a @ a.T)).sum()
        cross = ((b.T @ self.sb) * (a @ self.a.T)).sum()
        return fitted - 2 * cross + self.norm2


def lora_targets(lora: LoRAAdapter) -> dict[str, _Target]:
    s = lora.config.scaling
    return {name: _Target.of(a, b, s) for name, (a, b) in lora.matrices(torch.float32).items()}


def relative_errors(
    targets: dict[str, _Target], matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, dict[str, float]]:
    """(overall, per module) relative Frobenius errors of composed matrices against targets.
    A module whose target is zero reports its absolute error (the relative one is undefined)."""
    errors = {name: float(t.error2(*matrices[name]).clamp_min(0)) for name, t in targets.items()}
    total = sum(t.norm2 for t in targets.values())
    per_module = {n: math.sqrt(e / (targets[n].norm2 or 1.0)) for n, e in errors.items()}
    return math.sqrt(sum(errors.values()) / (total or 1.0)), per_module


def fit_vblora(
    lora: LoRAAdapter,
    config: AdapterConfig,
    *,
    steps: int,
    lr_bank: float,
    lr_logits: float,
    seed: int = 0,
    frozen_bank: torch.Tensor | None = None,
    save_dtype: torch.dtype = torch.float16,
    on_progress: Callable[[FitProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FitResult:
    """A VB-LoRA adapter of shape `config` whose delta weights approximate `lora`'s.

    config: the modules must be the LoRA's (same names and shapes); r, b, h, k are free.
    frozen_bank: fit only the logits against this `(h, b)` bank; the adapter keeps it as
    given (same bank id). Raises ValueError on a config that does not match the LoRA.
    """
    if {(m.name, m.in_features, m.out_features) for m in config.modules} != {
        (m.name, m.in_features, m.out_features) for m in lora.config.modules
    }:
        raise ValueError("the VB-LoRA config must target the LoRA adapter's modules, with their shapes")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    targets = lora_targets(lora)
    total = sum(t.norm2 for t in targets.values()) or 1.0
    params = VBLoRAParameters(config, seed=seed, frozen_bank=frozen_bank)
    _initialize(params, targets, seed)
    groups = [{"params": [params.logits], "lr": lr_logits, "weight_decay": 0.0}]
    if frozen_bank is None:
        groups.append({"params": [params.bank], "lr": lr_bank, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    # Cosine decay: large steps find the sub-vectors' bank vectors, small ones settle the weights.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    stop = should_stop or (lambda: False)
    # Adam's first steps move every logit by about the learning rate whatever its gradient,
    # which can undo a close start: the best iterate seen is the result, not the last.
    best = (math.inf, params.logits.detach().clone(), params.bank.detach().clone())
    for step in range(1, steps + 2):
        if stop():
            raise TrainingCancelled()
        mats = params.matrices()
        loss = sum(t.error2(*mats[name]) for name, t in targets.items()) / total
        if float(loss.detach()) < best[0]:
            best = (float(loss.detach()), params.logits.detach().clone(), params.bank.detach().clone())
        if step > steps:  # the last update's result, measured only
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if on_progress is not None:
            on_progress(FitProgress(step, steps, math.sqrt(best[0])))
    with torch.no_grad():
        params.logits.copy_(best[1])
        params.bank.copy_(best[2])
    adapter = params.to_adapter(save_dtype)
    composed = {name: (a[0], b[0]) for name, (a, b) in compose_adapters([adapter]).items()}
    overall, per_module = relative_errors(targets, composed)
    return FitResult(adapter, overall, per_module, steps)


@torch.no_grad()
def _initialize(params: VBLoRAParameters, targets: dict[str, _Target], seed: int) -> None:
    """Bank (unless frozen) and logits that code the targets' sub-vectors (module doc)."""
    config = params.config
    best = None
    for gauge in GAUGES:
        subvectors = _target_subvectors(config, targets, gauge)
        if subvectors is None:
            continue
        bank = params.bank.detach().double().clone()
        if params.frozen_bank is None:
            bank = _initial_bank(subvectors, config.num_vectors, seed, bank)
        indices, weights = _code(subvectors, bank, config.topk)
        for _ in range(CODING_ROUNDS if params.frozen_bank is None else 0):
            bank = _refit_bank(subvectors, indices, weights, bank)
            indices, weights = _code(subvectors, bank, config.topk)
        logits = _logits_for(subvectors, bank, indices, weights)
        params.logits.copy_(logits)
        if params.frozen_bank is None:
            params.bank.copy_(bank.float())
        mats = {n: (a.detach(), b.detach()) for n, (a, b) in params.matrices().items()}
        error, _ = relative_errors(targets, mats)
        if best is None or error < best[0]:
            best = (error, logits.clone(), params.bank.detach().clone())
    assert best is not None  # the SVD factorization always applies
    params.logits.copy_(best[1])
    if params.frozen_bank is None:
        params.bank.copy_(best[2])


def _balanced_factors(target: _Target, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A* (r, in), B* (out, r)) with `B* A*` the best rank-r approximation of the target
    and the singular values split evenly (`sqrt(S)` on each side); zero-padded past the
    target's rank. From QR factors, so no `(out, in)` matrix is formed."""
    qb, rb = torch.linalg.qr(target.sb)  # (out, r0), (r0, r0)
    qa, ra = torch.linalg.qr(target.a.T)  # (in, r0), (r0, r0)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    keep = min(r, len(s))
    root = s[:keep].sqrt()
    a_star = torch.zeros(r, target.a.shape[1], dtype=torch.float64)
    b_star = torch.zeros(target.sb.shape[0], r, dtype=torch.float64)
    a_star[:keep] = root[:, None] * (vh[:keep] @ qa.T)
    b_star[:, :keep] = (qb @ u[:, :keep]) * root[None, :]
    return a_star, b_star


def _target_subvectors(config: AdapterConfig, targets: dict[str, _Target], gauge: str) -> torch.Tensor | None:
    """All targets' sub-vectors `(S, b)` in the adapter's layout, in one factorization:
    "own" (the LoRA's A and sB, sqrt of the scaling on each side, zero rank rows past the
    LoRA's rank; None when the VB-LoRA rank is smaller) or "svd" (`_balanced_factors`)."""
    r, b = config.r, config.vector_length
    parts = []
    for sl in config.layout:
        t = targets[sl.module.name]
        if gauge == "svd":
            a, bmat = _balanced_factors(t, r)
        elif t.a.shape[0] > r:
            return None
        else:
            root = math.sqrt(t.scaling)
            a = torch.zeros(r, t.a.shape[1], dtype=torch.float64)
            bmat = torch.zeros(t.sb.shape[0], r, dtype=torch.float64)
            a[: t.a.shape[0]], bmat[:, : t.a.shape[0]] = t.a * root, t.sb / root
        # A's sub-vectors are (r, in/b), B's (out/b, r) (`split_lora_matrices`).
        parts += [a.reshape(-1, b), bmat.reshape(-1, b, r).transpose(1, 2).reshape(-1, b)]
    return torch.cat(parts)


def _initial_bank(subvectors: torch.Tensor, h: int, seed: int, fallback: torch.Tensor) -> torch.Tensor:
    """h of the sub-vectors, picked as k-means++ seeds (each next one drawn with
    probability proportional to its squared distance from those picked), so the bank
    starts spread over the sub-vectors; with fewer sub-vectors than h, the remaining rows
    keep `fallback`'s."""
    gen = torch.Generator().manual_seed(seed)
    picked = [int(torch.randint(len(subvectors), (1,), generator=gen))]
    dist = (subvectors - subvectors[picked[0]]).pow(2).sum(1)
    while len(picked) < min(h, len(subvectors)):
        if float(dist.sum()) <= 0:  # the rest coincide with picked ones
            break
        picked.append(int(torch.multinomial(dist, 1, generator=gen)))
        dist = torch.minimum(dist, (subvectors - subvectors[picked[-1]]).pow(2).sum(1))
    bank = fallback.clone()
    bank[: len(picked)] = subvectors[picked]
    return bank


def _code(subvectors: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sub-vector's k bank rows `(S, k)` and convex weights `(S, k)` (float64): the
    best segment between two bank vectors among the `PAIR_CANDIDATES` nearest (exact for
    k = 2, the paper's), the nearest vector for k = 1; past 2, the next nearest rows join
    with weight 0 (gradient descent weighs them)."""
    dist = torch.cdist(subvectors, bank).pow(2)  # (S, h)
    if k == 1 or len(bank) == 1:
        nearest = dist.argsort(dim=1, stable=True)[:, :k]
        weights = torch.zeros(nearest.shape, dtype=torch.float64)
        weights[:, 0] = 1.0
        return nearest, weights
    c = min(PAIR_CANDIDATES, len(bank))
    near = dist.argsort(dim=1, stable=True)[:, :c]  # (S, c)
    gram = bank @ bank.T
    chunk = max(1, (1 << 22) // (c * c))
    best_i, best_j, best_t = [], [], []
    for start in range(0, len(subvectors), chunk):
        u, cand = subvectors[start : start + chunk], near[start : start + chunk]
        p = torch.einsum("sb,scb->sc", u, bank[cand])  # <u, a_i>
        g = gram[cand[:, :, None], cand[:, None, :]]  # (s, c, c): <a_i, a_j>
        gd = torch.diagonal(g, dim1=1, dim2=2)  # (s, c)
        # u ~ a_j + t (a_i - a_j): t = <u - a_j, a_i - a_j> / ||a_i - a_j||^2, in [0, 1].
        num = p[:, :, None] - p[:, None, :] - g + gd[:, None, :]
        den = gd[:, :, None] + gd[:, None, :] - 2 * g
        t = (num / den.clamp_min(1e-30)).clamp(0, 1)
        rest = (u * u).sum(1)[:, None, None] - 2 * p[:, None, :] + gd[:, None, :]
        residual = rest - 2 * t * num + t * t * den  # (s, c_i, c_j)
        residual.diagonal(dim1=1, dim2=2).fill_(math.inf)  # two distinct rows: top-k picks each once
        flat = residual.flatten(1).argmin(dim=1)
        i, j = flat // c, flat % c
        rows = torch.arange(len(u))
        best_i.append(cand[rows, i])
        best_j.append(cand[rows, j])
        best_t.append(t[rows, i, j])
    first, second, share = torch.cat(best_i), torch.cat(best_j), torch.cat(best_t)
    indices = [first, second]
    weights = [share, 1 - share]
    if k > 2:
        taken = torch.stack(indices, dim=1)
        others = near[~(near[:, :, None] == taken[:, None, :]).any(-1)].view(len(near), -1)
        indices += list(others[:, : k - 2].T)
        weights += [torch.zeros_like(share)] * (k - 2)
    return torch.stack(indices, dim=1), torch.stack(weights, dim=1)


def _refit_bank(
    subvectors: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, bank: torch.Tensor
) -> torch.Tensor:
    """The bank that codes the sub-vectors best for fixed indices and weights: the least
    squares `min ||U - W bank||`, W the `(S, h)` mixing matrix; rows no sub-vector uses
    keep their values (a small ridge keeps the system regular)."""
    w = torch.zeros(len(subvectors), len(bank), dtype=torch.float64)
    w.scatter_add_(1, indices, weights)
    lhs = w.T @ w
    ridge = 1e-6 * float(lhs.diagonal().mean().clamp_min(1e-30))
    lhs = lhs + ridge * torch.eye(len(bank), dtype=torch.float64)
    return torch.linalg.solve(lhs, w.T @ subvectors + ridge * bank)


def _logits_for(
    subvectors: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """`(S, h)` logits whose top-k are `indices` with softmax weights `weights` (each at
    least MIN_WEIGHT, so every selected row gets a gradient); the other rows start
    LOGIT_MARGIN lower, ordered by closeness so that the nearest one enters first when a
    selected row's logit falls."""
    selected = weights.clamp_min(MIN_WEIGHT).log()
    closeness = -torch.cdist(subvectors, bank)
    closeness = (closeness - closeness.mean(1, keepdim=True)) / closeness.std(1, keepdim=True).clamp_min(1e-30)
    logits = selected.min(1, keepdim=True).values - LOGIT_MARGIN + 0.5 * closeness.tanh()
    logits.scatter_(1, indices, selected)
    return logits.float()
