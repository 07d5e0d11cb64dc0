"""Turning a batch of logits into next tokens, each row with its own settings.

Everything but the final draw is vectorized over rows; the draw loops over rows because
each seeded request owns a `torch.Generator` (same seed + request -> same tokens,
whatever else shares the batch).
"""

from __future__ import annotations

import torch

from .types import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalties: list[float]) -> torch.Tensor:
    """CTRL-style penalty (as in HF): divide positive, multiply negative logits of seen tokens.

    logits: (N, V); history[i]: token ids seen by row i (prompt + output).
    """
    rows = [i for i, p in enumerate(penalties) if p != 1.0 and history[i]]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        ids = torch.tensor(sorted(set(history[i])), device=logits.device)
        seen = logits[i, ids]
        logits[i, ids] = torch.where(seen > 0, seen / penalties[i], seen * penalties[i])
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus.

    logits: (N, V); top_k: (N,) long, 0 = off; top_p: (N,) float in (0, 1].
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(-1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # Keep a token while the mass before it is below top_p (so the top token always stays).
    drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(-1)
    # Also when top_p rounds to 0 in float32 (a valid 1e-300 does): the top token was then
    # dropped too, every logit was -inf, and the NaN softmax failed the whole batch's step.
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    history: list[list[int]],
) -> torch.Tensor:
    """Next token of every row. logits: (N, V) float32 -> (N,) long on CPU."""
    logits = apply_repetition_penalty(logits.float(), history, [p.repetition_penalty for p in params])
    greedy = torch.tensor([p.temperature == 0 for p in params])
    next_tokens = logits.argmax(-1).cpu()
    if greedy.all():
        return next_tokens
    # Only the sampled rows are filtered and copied to the CPU, where each request's own
    # generator draws.
    rows = torch.nonzero(~greedy).flatten().tolist()
    dev = logits.device
    temperature = torch.tensor([params[i].temperature for i in rows], device=dev).unsqueeze(-1)
    top_k = torch.tensor([params[i].top_k for i in rows], device=dev)
    top_p = torch.tensor([params[i].top_p for i in rows], device=dev)
    sampled = logits[torch.tensor(rows, device=dev)] / temperature
    probs = filter_top_k_top_p(sampled, top_k, top_p).softmax(-1).cpu()
    for j, i in enumerate(rows):
        next_tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i]).item()
    return next_tokens


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top_n: int
) -> tuple[list[float], list[dict[int, float]] | None]:
    """Log-probabilities of the chosen tokens under the model's distribution, and the
    top-n alternatives per row when asked for."""
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    chosen = logp.gather(-1, tokens.view(-1, 1)).flatten().tolist()
    if top_n <= 0:
        return chosen, None
    values, ids = logp.topk(top_n, dim=-1)
    return chosen, [dict(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(ids, values, strict=True)]
