"""VB-LoRA training, as the paper writes it (Sec. 3, Algorithm 1).

Trainable: one `(S, h)` logits tensor for every sub-vector of every targeted module, in
the canonical layout of `AdapterConfig`, and the `(h, b)` vector bank. The base model
stays frozen. Each forward composes all sub-vectors in one differentiable call,

    w = softmax(topk(logits, k)),  u_s = sum_j w_sj * bank[i_sj]   (compose_subvectors)

views them as each module's A `(r, in)` and B `(out, r)` (split_lora_matrices, PEFT's
layout), and adds `B (A x)` to the output of every targeted linear layer through a forward
hook. Hooks leave the model's structure untouched and are removed when training ends, so
the model can be trained again or served afterwards; they never touch the serving
engine's slot tables. A worker owns the model it trains: two trainers must not hook one
model at once.

Optimizer and schedule are the paper's: AdamW with the bank and the logits in two
parameter groups (rates from the hyperparameters), linear warmup then linear decay. The loss of an
optimizer step is the token-level mean over all its micro-batches (summed per micro-batch,
divided by the step's target-token count), so gradient accumulation gives the same
gradient as one large batch. An optimizer step takes `batch_size x grad_accum_steps`
rows; each forward runs on at most `max_batch_tokens` padded tokens of them
(`micro_batches`), which is what bounds a job's activation memory whatever its batch
size. At the end only the top-k indices and weights of the logits are kept:
`VBLoRAAdapter.from_logits`.

Initialization: bank ~ U(-0.02, 0.02); logits ~ N(0, 0.01) in the paper's (mean,
variance) notation, i.e. standard deviation 0.1, which is PEFT's `init_logits_std`.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_linear_schedule_with_warmup

from vbserve.vblora.compose import split_lora_matrices
from vbserve.vblora.ops import compose_subvectors
from vbserve_store import AdapterConfig, VBLoRAAdapter

from .data import IGNORE_INDEX, Example
from .errors import TrainingCancelled
from .hyperparams import TrainingHyperparameters

INIT_BANK_BOUND = 0.02
INIT_LOGITS_STD = 0.1
# Batches are formed inside windows of this many batches' worth of shuffled rows, sorted by
# length: rows of similar length share a batch (little padding) while the order stays random.
SORT_WINDOW_BATCHES = 16


@dataclass(frozen=True)
class Progress:
    """What the trainer reports after an optimizer step (`on_progress`)."""

    step: int
    total_steps: int
    loss: float  # mean token loss of this step
    tokens_per_s: float
    val_loss: float | None = None  # set on the steps that ran validation
    val_exact_match: float | None = None  # set on validation steps with `eval_exact_match_rows`
    best_step: int | None = None  # the step of the checkpoint that would be published now
    best_val_loss: float | None = None
    # A fit_lora job's last report (`fit.OutputAgreement`), where `loss` is the fit error.
    output_rel_error: float | None = None
    top1_agreement: float | None = None


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class TrainingResult:
    adapter: VBLoRAAdapter  # the best checkpoint by validation loss; the last one without validation rows
    steps: int  # optimizer steps run (fewer than planned after an early stop)
    train_loss: float  # mean token loss of the last optimizer step
    val_loss: float | None  # the published checkpoint's (None without validation rows)
    tokens_per_s: float  # input tokens (padding excluded) per second over the whole run
    best_step: int  # the step the published checkpoint was taken at
    stopped_early: bool = False


class VBLoRAParameters(nn.Module):
    """The trainable part of one adapter: `logits (S, h)` and `bank (h, b)`.

    frozen_bank: an existing bank `(h, b)` (a shared-bank family's): it is used as it is,
    gets no gradient, and the adapter keeps that very tensor, so it is published under
    the same bank id. The logits start as they would with a bank of their own."""

    def __init__(
        self,
        config: AdapterConfig,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        frozen_bank: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        h, b = config.num_vectors, config.vector_length
        bank = torch.empty(h, b).uniform_(-INIT_BANK_BOUND, INIT_BANK_BOUND, generator=gen)
        logits = torch.empty(config.num_subvectors, h).normal_(0.0, INIT_LOGITS_STD, generator=gen)
        if frozen_bank is not None:
            if tuple(frozen_bank.shape) != (h, b):
                raise ValueError(f"the frozen bank is {tuple(frozen_bank.shape)}, the config needs {(h, b)}")
            bank = frozen_bank.float()
        self.frozen_bank = frozen_bank
        self.bank = nn.Parameter(bank.to(device), requires_grad=frozen_bank is None)
        self.logits = nn.Parameter(logits.to(device))
        # One single-module config per module, for `split_lora_matrices` (see `matrices`).
        self._module_configs = [
            AdapterConfig((sl.module,), r=config.r, vector_length=config.vector_length, num_vectors=h, topk=config.topk)
            for sl in config.layout
        ]

    def matrices(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module name: (A (r, in), B (out, r))}, differentiable in logits and bank.

        The composed `(S, b)` sub-vectors are cut per module with one `split` before
        `split_lora_matrices` views each module's part: slicing all modules out of the
        whole tensor would make autograd zero-fill a full `(S, b)` gradient per slice in
        the backward (420 of them on SmolLM2 with all linear layers: 6x slower), while
        `split` gathers the gradients with one concatenation."""
        top, idx = self.logits.topk(self.config.topk, dim=-1)
        subvectors = compose_subvectors(self.bank[None], idx[None], torch.softmax(top, dim=-1)[None])
        parts = subvectors.split([sl.end - sl.a_start for sl in self.config.layout], dim=1)
        out = {}
        for module_config, part in zip(self._module_configs, parts, strict=True):
            [(name, (a, b))] = split_lora_matrices(module_config, part).items()
            out[name] = (a[0], b[0])
        return out

    def to_adapter(self, dtype: torch.dtype = torch.float16) -> VBLoRAAdapter:
        """The adapter as it stands: top-k of the logits, weights (and an own bank) in `dtype`;
        a frozen bank is kept exactly as given, whatever `dtype`."""
        adapter = VBLoRAAdapter.from_logits(self.config, self.bank.float().cpu(), self.logits.float().cpu()).to(dtype)
        if self.frozen_bank is None:
            return adapter
        return VBLoRAAdapter(self.config, self.frozen_bank, adapter.indices, adapter.weights)

    @torch.no_grad()
    def copy_into_peft(self, peft_model: nn.Module, adapter_name: str = "default") -> None:
        """Write these logits and bank into a PEFT VB-LoRA model of the same shape
        (`logits_A (r, in/b, h)`, `logits_B (out/b, r, h)`), so PEFT can start from the
        same initialization: the parity tests and the training benchmark compare the two."""
        r, b, h = self.config.r, self.config.vector_length, self.config.num_vectors
        base = peft_model.get_base_model()
        for sl in self.config.layout:
            layer = base.get_submodule(sl.module.name)
            a_shape = (r, sl.module.in_features // b, h)
            layer.vblora_logits_A[adapter_name].copy_(self.logits[sl.a_start : sl.b_start].view(a_shape))
            b_shape = (sl.module.out_features // b, r, h)
            layer.vblora_logits_B[adapter_name].copy_(self.logits[sl.b_start : sl.end].view(b_shape))
            layer.vblora_vector_bank[adapter_name].copy_(self.bank)


@contextmanager
def lora_hooks(model: nn.Module, params: VBLoRAParameters) -> Iterator[Callable[[], None]]:
    """Add `B (A x)` to every targeted linear of `model` while inside.

    Yields `refresh()`: call it before each forward to compose A and B from the current
    parameters (once per forward for all modules, not once per module)."""
    current: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def refresh() -> None:
        current.clear()
        current.update(params.matrices())

    with matrices_added(model, [m.name for m in params.config.modules], current):
        yield refresh


@contextmanager
def matrices_added(
    model: nn.Module, names: Sequence[str], matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[None]:
    """Add `B (A x)` to the output of each linear in `names` while inside, `(A, B)` read
    from `matrices` at every forward (so the caller may replace them between forwards)."""

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            a, b = matrices[name]
            x = args[0]
            return output + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)).to(output.dtype)

        return hook

    handles = [model.get_submodule(name).register_forward_hook(make_hook(name)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def plan_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each batch of one epoch: shuffled, then grouped by length within
    windows so that a batch pads little; the batches themselves come in random order.
    Deterministic for (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    window = batch_size * SORT_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def micro_batches(batch: Sequence[Example], max_tokens: int | None) -> list[list[Example]]:
    """`batch` cut, in order, into runs whose padded size (rows x longest row) is at most
    `max_tokens`; one run when `max_tokens` is None. A row longer than `max_tokens` gets a
    run of its own (`check_fits` refuses a `max_seq_len` above the budget, so a job's rows
    never are)."""
    if max_tokens is None:
        return [list(batch)]
    runs: list[list[Example]] = []
    current: list[Example] = []
    width = 0
    for example in batch:
        row_width = max(width, len(example.input_ids))
        if current and (len(current) + 1) * row_width > max_tokens:
            runs.append(current)
            current, row_width = [], len(example.input_ids)
        current.append(example)
        width = row_width
    if current:
        runs.append(current)
    return runs


def collate(
    examples: Sequence[Example], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each `(B, longest)`, right-padded: padding is
    masked from attention and labelled -100."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return ids.to(device), mask.to(device), labels.to(device)


def target_count(examples: Sequence[Example]) -> int:
    """Tokens the loss is taken on: labels after the one-position shift."""
    return sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples)


def loss_sum(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (float32).

    The LM head runs only where a label follows (`logits_to_keep` with a boolean mask,
    which transformers 5 causal LMs accept): prompt and padding positions need no
    vocabulary-sized logits, and on a small model with a large vocabulary (SmolLM2:
    49k x 576) the head is a good part of each step. Models without that argument get
    the full logits, then the same loss."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    keep = targets != IGNORE_INDEX
    if _accepts_logits_to_keep(model):
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # (kept, V)
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[keep]
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def train_adapter(
    model: nn.Module,
    examples: Sequence[Example],
    hp: TrainingHyperparameters,
    config: AdapterConfig,
    *,
    val_examples: Sequence[Example] | None = None,
    pad_token_id: int = 0,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_batch_tokens: int | None = None,
    frozen_bank: torch.Tensor | None = None,
) -> TrainingResult:
    """Train a VB-LoRA adapter of shape `config` (from `hp.check_fits`) on `examples`.

    Deterministic for `hp.seed` on one device: initialization and data order come from
    generators seeded by it, and the global RNG (dropout, if the model has any) is
    seeded inside a forked RNG state so the caller's is left as it was.
    val_examples: validated every `hp.eval_steps` steps (None: after every epoch) and at
    the last step; the result is the checkpoint with the lowest validation loss, and
    `hp.early_stopping_patience` validations without a lower one end training early.
    should_stop: checked before every micro-batch; when it answers True,
    `TrainingCancelled` is raised and no adapter is produced.
    max_batch_tokens: the most padded tokens one forward may take (`micro_batches`);
    None: each batch of `batch_size` rows in one forward. The result is the same either
    way, to float rounding.
    frozen_bank: train only the logits against this `(h, b)` bank (see `VBLoRAParameters`).
    """
    if not examples or target_count(examples) == 0:
        raise ValueError("train_adapter needs examples with at least one target token")
    device = next(model.parameters()).device
    params = VBLoRAParameters(config, seed=hp.seed, device=device, frozen_bank=frozen_bank)
    groups = [{"params": [params.logits], "lr": hp.lr_logits, "weight_decay": hp.weight_decay}]
    if frozen_bank is None:
        groups.append({"params": [params.bank], "lr": hp.lr_bank, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    lengths = [len(e.input_ids) for e in examples]
    total = hp.total_steps(len(examples))
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(hp.warmup_ratio * total), total)
    stop = should_stop or (lambda: False)
    best = _BestCheckpoint(hp.early_stopping_patience)

    step, epoch, tokens, loss = 0, 0, 0, float("nan")
    started = time.perf_counter()
    with _frozen(model), lora_hooks(model, params) as refresh, torch.random.fork_rng(devices=[]):
        torch.manual_seed(hp.seed)
        while step < total and not best.exhausted:
            batches = plan_batches(lengths, hp.batch_size, seed=hp.seed, epoch=epoch)
            for start in range(0, len(batches), hp.grad_accum_steps):
                group = [[examples[i] for i in batch] for batch in batches[start : start + hp.grad_accum_steps]]
                denominator = max(1, sum(target_count(b) for b in group))
                step_loss = 0.0
                for micro_batch in (m for batch in group for m in micro_batches(batch, max_batch_tokens)):
                    if stop():
                        raise TrainingCancelled()
                    ids, mask, labels = collate(micro_batch, pad_token_id, device)
                    refresh()
                    part = loss_sum(model, ids, mask, labels) / denominator
                    part.backward()
                    step_loss += float(part.detach())
                    tokens += int(mask.sum())
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step, loss = step + 1, step_loss
                epoch_done = start + hp.grad_accum_steps >= len(batches)
                due = step % hp.eval_steps == 0 if hp.eval_steps else epoch_done
                progress = Progress(step, total, loss, tokens / (time.perf_counter() - started))
                if val_examples and (due or step == total):
                    val_loss = evaluate(model, refresh, val_examples, hp.batch_size, pad_token_id, max_batch_tokens)
                    matched = None
                    if hp.eval_exact_match_rows:
                        matched = exact_match(model, refresh, val_examples[: hp.eval_exact_match_rows], pad_token_id)
                    best.offer(step, val_loss, lambda: params.to_adapter(hp.torch_save_dtype))
                    progress = replace(
                        progress,
                        val_loss=val_loss,
                        val_exact_match=matched,
                        best_step=best.step,
                        best_val_loss=best.val_loss,
                    )
                if on_progress is not None:
                    on_progress(progress)
                if step == total or best.exhausted:
                    break
            epoch += 1
    elapsed = time.perf_counter() - started
    if best.adapter is None:  # no validation rows: the last step is the result
        return TrainingResult(params.to_adapter(hp.torch_save_dtype), step, loss, None, tokens / elapsed, step)
    return TrainingResult(
        best.adapter, step, loss, best.val_loss, tokens / elapsed, best.step, stopped_early=best.exhausted
    )


class _BestCheckpoint:
    """The checkpoint with the lowest validation loss so far, and early stopping: after
    `patience` validations in a row without a lower loss, `exhausted`. Only the adapter
    as it would be published is kept (top-k indices and weights, and the bank): a few
    hundred KB, not the `(S, h)` logits and optimizer state."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.adapter: VBLoRAAdapter | None = None
        self.step = 0
        self.val_loss: float | None = None
        self.since_best = 0

    def offer(self, step: int, val_loss: float, snapshot: Callable[[], VBLoRAAdapter]) -> None:
        if self.val_loss is None or val_loss < self.val_loss:
            self.adapter, self.step, self.val_loss, self.since_best = snapshot(), step, val_loss, 0
        else:
            self.since_best += 1

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience


@torch.no_grad()
def evaluate(
    model: nn.Module,
    refresh: Callable[[], None],
    examples: Sequence[Example],
    batch_size: int,
    pad_token_id: int,
    max_batch_tokens: int | None = None,
) -> float:
    """Token-level mean loss on `examples` with the adapter as it is now, in batches of
    `batch_size` rows cut to `max_batch_tokens` like the training batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    refresh()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        batch = [examples[i] for i in order[start : start + batch_size]]
        for micro_batch in micro_batches(batch, max_batch_tokens):
            total += loss_sum(model, *collate(micro_batch, pad_token_id, device)).double().cpu()
    model.train(was_training)
    return float(total) / max(1, target_count(examples))


@torch.no_grad()
def exact_match(model: nn.Module, refresh: Callable[[], None], examples: Sequence[Example], pad_token_id: int) -> float:
    """The share of `examples` whose completion (the labelled tokens, EOS included) greedy
    decoding from the prompt reproduces token for token, with the adapter as it is now.

    One row at a time: rows need no padding, and the count is bounded by
    `eval_exact_match_rows`. The row's own completion length bounds the generation, so a
    row costs one forward per completion token at most."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    refresh()
    hits = 0
    for example in examples:
        split = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        prompt = torch.tensor([example.input_ids[:split]], device=device)
        target = example.input_ids[split:]
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=len(target),  # an early EOS ends generation short: a miss
            do_sample=False,
            pad_token_id=pad_token_id,
        )
        hits += out[0, split:].tolist() == target
    model.train(was_training)
    return hits / len(examples)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Base weights get no gradient; train mode while inside; both restored after."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.requires_grad_(False)
    model.train()
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
