"""What a fine-tuning job may ask for, with bounds, and whether it fits the base model.

Defaults: the paper's method (VB-LoRA, Appendix A.1: AdamW, linear schedule with warmup,
top-k 2, q,v, r=4, b=64, h=256), with learning rates ten times the paper's (bank 1e-2,
logits 1e-1), and steps from the data size (`MIN_AUTO_STEPS`). The paper's rates are tuned
for runs of many epochs, and a job of a few dozen steps barely moves with them. Chosen with
`benchmarks/quality.py` on its validation splits (SmolLM2-135M, 60 steps of batch 4):
exact match 1.0 / 1.0 / 0.91 (record / date / verdict) at 10x, against 1.0 / 0.96 / 0.91 at
7x, 1.0 / 0.92 / 0.75 at 5x and PEFT LoRA r=8's 1.0 / 0.95 / 0.90; PEFT's VB-LoRA at the
paper's rates reached 0.58 on date and 0.02 on verdict (test split). See
benchmarks/RESULTS.md for the test-split scores. Bounds keep one job from asking for hours of
compute or gigabytes of logits; `check_fits` then checks the request against the loaded
model and the server's limits and returns the adapter config the trainer fills in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vbserve.backends import BackendInputError, validate_key
from vbserve_store import AdapterConfig, AdapterValidationError, ModuleSpec
from vbserve_store.config import MAX_NUM_VECTORS, MAX_RANK, MAX_TOPK, MAX_VECTOR_LENGTH

from .errors import HyperparameterError

# One (S, h) float32 logits tensor plus its gradient and two AdamW moments: 2^27 elements
# is 2 GiB in all, the most a job may hold beside the model.
MAX_LOGITS = 1 << 27
MAX_SEQ_LEN = 32768
# Steps from the data size: without `epochs` or `max_steps`, a job makes as many passes
# over its rows as give it at least this many optimizer steps (a small file is repeated; a
# large one is read once). VB-LoRA's bank and top-k choice need a few dozen steps to move:
# in `benchmarks/quality.py`, after 30 steps of batch 4 a job was under PEFT LoRA r=8 on
# two of three tasks at 5x the paper's rates, and 0.075 under on one at 10x; after 60 (one
# epoch of its 240 rows) it matched or beat LoRA on all three (benchmarks/RESULTS.md).
MIN_AUTO_STEPS = 60
# Greedy generation of one validation row costs a forward per completion token: this
# bounds what the exact-match metric adds to each validation.
MAX_EXACT_MATCH_ROWS = 256
# Gradient steps of a fit_lora job that leaves `max_steps` unset: the sparse-coding start
# does most of the work (`fit.py`), and a step costs milliseconds.
FIT_STEPS = 200
SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MODULE_NAME = re.compile(r"[A-Za-z0-9_.]+")


class TrainingHyperparameters(BaseModel):
    """A job's hyperparameters. `max_steps`, when set, replaces `epochs` (as in Hugging
    Face's Trainer): training cycles through the data until that many optimizer steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A plain default (not a factory) so the OpenAPI schema shows it: the console's job form
    # fills its fields from the schema's defaults. Pydantic copies a list default per model.
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1, max_length=64)
    r: int = Field(4, ge=1, le=MAX_RANK)
    vector_length: int = Field(64, ge=1, le=MAX_VECTOR_LENGTH, description="b: length of each bank vector")
    num_vectors: int = Field(256, ge=1, le=MAX_NUM_VECTORS, description="h: vectors in the bank")
    topk: int = Field(2, ge=1, le=MAX_TOPK, description="k: bank vectors mixed into each sub-vector")
    epochs: int | None = Field(
        None,
        ge=1,
        le=100,
        description="Passes over the training rows; unset: as many as give at least "
        f"{MIN_AUTO_STEPS} optimizer steps (one for a large file)",
    )
    max_steps: int | None = Field(None, ge=1, le=1_000_000)
    batch_size: int = Field(4, ge=1, le=256)
    grad_accum_steps: int = Field(1, ge=1, le=256)
    lr_bank: float = Field(1e-2, gt=0, le=1)
    lr_logits: float = Field(1e-1, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW decay of the logits (never of the bank)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_len: int = Field(512, ge=2, le=MAX_SEQ_LEN)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    save_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    truncation: Literal["refuse", "truncate"] = "refuse"
    # Evaluation inside the job (needs a validation file): validation loss every
    # `eval_steps` optimizer steps (None: after every epoch) and at the last step; the
    # adapter published is the checkpoint with the lowest validation loss.
    eval_steps: int | None = Field(None, ge=1, le=1_000_000)
    early_stopping_patience: int | None = Field(
        None, ge=1, le=1000, description="Stop after this many validations without a lower validation loss"
    )
    eval_exact_match_rows: int = Field(
        0,
        ge=0,
        le=MAX_EXACT_MATCH_ROWS,
        description="Validation rows generated greedily at each validation: the share whose completion comes "
        "out token for token is reported as exact match",
    )
    # A frozen shared bank: train only the logits (indices and weights) against a bank one
    # of the tenant's adapters already uses, so the published adapter shares that bank.
    bank_id: str | None = Field(None, pattern=r"^sha256-[0-9a-f]{40}$", description="Train against this bank, frozen")
    bank_of: str | None = Field(None, description="Train against the bank of this adapter of yours, frozen")
    # Bring your LoRA (`fit.py`): "fit_lora" reads no data; it fits a VB-LoRA adapter to the
    # delta weights of `source_adapter`, a plain LoRA adapter of the tenant's, in
    # `max_steps` steps (`FIT_STEPS` when unset; `epochs`, `batch_size` and the sequence
    # settings do not apply).
    method: Literal["supervised", "fit_lora"] = Field(
        "supervised", description="supervised: train on the files; fit_lora: convert source_adapter"
    )
    source_adapter: str | None = Field(None, description="fit_lora: the plain LoRA adapter of yours to convert")

    @field_validator("target_modules")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _MODULE_NAME.fullmatch(name) or len(name) > 512:
                raise ValueError(f"{name!r} is not a module name (letters, digits, '_' and '.')")
        if len(set(names)) != len(names):
            raise ValueError("names must be unique")
        return names

    @field_validator("bank_of", "source_adapter")
    @classmethod
    def _adapter_name(cls, name: str | None) -> str | None:
        if name is not None:
            try:
                validate_key("adapter", name)
            except BackendInputError as exc:
                raise ValueError(exc.reason) from None
        return name

    @model_validator(mode="after")
    def _topk_within_bank(self) -> TrainingHyperparameters:
        if self.topk > self.num_vectors:
            raise ValueError(f"topk {self.topk} exceeds num_vectors {self.num_vectors}")
        if self.bank_id is not None and self.bank_of is not None:
            raise HyperparameterError("hyperparameters.bank_of", "give bank_id or bank_of, not both")
        if (self.method == "fit_lora") != (self.source_adapter is not None):
            reason = "is required by method fit_lora" if self.method == "fit_lora" else "needs method fit_lora"
            raise HyperparameterError("hyperparameters.source_adapter", reason)
        return self

    def check_validation(self, has_validation_file: bool) -> None:
        """Evaluation settings need validation rows: refuse them without a validation file."""
        if has_validation_file:
            return
        for name in ("eval_steps", "early_stopping_patience", "eval_exact_match_rows"):
            if getattr(self, name):
                raise HyperparameterError(f"hyperparameters.{name}", "needs a validation_file")

    @classmethod
    def parse(cls, data: object) -> TrainingHyperparameters:
        """Validate untrusted input; the first violation becomes a `HyperparameterError`
        naming its field (`hyperparameters.lr_bank`)."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise HyperparameterError("hyperparameters", "must be an object")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            field = f"hyperparameters.{where}" if where else "hyperparameters"
            if error["type"] == "value_error" and not where:
                field = "hyperparameters.topk"  # the only cross-field rule
            raise HyperparameterError(field, error["msg"].removeprefix("Value error, ")) from None

    def steps_per_epoch(self, rows: int) -> int:
        return math.ceil(math.ceil(rows / self.batch_size) / self.grad_accum_steps)

    def epochs_for(self, rows: int) -> int:
        """The passes over `rows` training rows: `epochs`, else enough for `MIN_AUTO_STEPS`."""
        if self.epochs is not None:
            return self.epochs
        return math.ceil(MIN_AUTO_STEPS / self.steps_per_epoch(rows))

    def total_steps(self, rows: int) -> int:
        """The optimizer steps of a job on `rows` training rows: `max_steps` when set."""
        return self.max_steps or self.steps_per_epoch(rows) * self.epochs_for(rows)

    @property
    def torch_save_dtype(self) -> torch.dtype:
        return SAVE_DTYPES[self.save_dtype]

    def check_fits(
        self,
        model_shapes: Mapping[str, tuple[int, int]],
        *,
        max_rank: int = MAX_RANK,
        max_num_vectors: int = MAX_NUM_VECTORS,
        max_positions: int | None = None,
        max_batch_tokens: int | None = None,
        base_model: str = "",
    ) -> AdapterConfig:
        """The adapter config these hyperparameters give on a model whose targetable linear
        layers are `model_shapes` ({dotted name: (in_features, out_features)}).

        A target matches a layer by full dotted name or by its last components
        (`q_proj` matches every `...self_attn.q_proj`), as PEFT matches them.
        max_rank: the serving engine's LoRA rank limit (a trained adapter must be servable).
        max_positions: the model's context length, which bounds max_seq_len.
        max_batch_tokens: the most tokens one forward of the trainer may take (the
        server's memory bound for a job). Larger batches are cut into micro-batches of at
        most that many tokens; a single row of `max_seq_len` tokens cannot be, so
        `max_seq_len` must fit in it. `batch_size` needs no bound of its own.
        """
        matched: dict[str, tuple[int, int]] = {}
        for target in self.target_modules:
            names = [n for n in model_shapes if n == target or n.endswith("." + target)]
            if not names:
                known = sorted({n.rsplit(".", 1)[-1] for n in model_shapes})
                raise HyperparameterError(
                    "hyperparameters.target_modules",
                    f"the base model has no linear layer {target!r}; it has {', '.join(known)}",
                )
            matched.update((n, model_shapes[n]) for n in names)
        b = self.vector_length
        for name, dims in matched.items():
            for dim_name, dim in zip(("in_features", "out_features"), dims, strict=True):
                if dim % b:
                    common = math.gcd(*(d for ds in matched.values() for d in ds))
                    raise HyperparameterError(
                        "hyperparameters.vector_length",
                        f"{b} does not divide {name}.{dim_name}={dim}; "
                        f"it must divide {common} for these target modules",
                    )
        if self.r > max_rank:
            raise HyperparameterError("hyperparameters.r", f"{self.r} exceeds the server's LoRA rank limit {max_rank}")
        if self.num_vectors > max_num_vectors:
            raise HyperparameterError(
                "hyperparameters.num_vectors", f"{self.num_vectors} exceeds the limit {max_num_vectors}"
            )
        if max_positions is not None and self.max_seq_len > max_positions:
            raise HyperparameterError(
                "hyperparameters.max_seq_len", f"{self.max_seq_len} exceeds the model's context of {max_positions}"
            )
        if max_batch_tokens is not None and self.max_seq_len > max_batch_tokens:
            raise HyperparameterError(
                "hyperparameters.max_seq_len",
                f"{self.max_seq_len} exceeds the server's limit of {max_batch_tokens} tokens per training forward",
            )
        modules = tuple(ModuleSpec(n, i, o) for n, (i, o) in matched.items())
        try:
            config = AdapterConfig(
                modules, r=self.r, vector_length=b, num_vectors=self.num_vectors, topk=self.topk, base_model=base_model
            )
        except AdapterValidationError as exc:
            raise HyperparameterError(f"hyperparameters.{exc.field}", exc.reason) from None
        if config.num_subvectors * self.num_vectors > MAX_LOGITS:
            raise HyperparameterError(
                "hyperparameters.num_vectors",
                f"{config.num_subvectors} sub-vectors x {self.num_vectors} vectors = "
                f"{config.num_subvectors * self.num_vectors} logits exceed the limit {MAX_LOGITS}; "
                "use fewer vectors, a smaller rank, a longer vector_length or fewer target modules",
            )
        return config


# -- OpenAI's fine-tuning hyperparameters --------------------------------------------------

DEFAULT_LR_BANK: float = TrainingHyperparameters.model_fields["lr_bank"].default
DEFAULT_LR_LOGITS: float = TrainingHyperparameters.model_fields["lr_logits"].default


def from_openai(
    *,
    n_epochs: int | None,
    batch_size: int | None,
    learning_rate_multiplier: float | None,
    seed: int | None,
    vblora: Mapping[str, object],
    where: Mapping[str, str],
) -> tuple[TrainingHyperparameters, dict[str, str]]:
    """The trainer's hyperparameters for an OpenAI-style job request, and where in the
    request each one came from ({trainer field: request field}), to name the request's
    field in a later error (`check_fits`). None is "auto": the trainer's default.

    n_epochs -> epochs; batch_size -> batch_size; learning_rate_multiplier m -> both
    learning rates scaled: lr_bank = m x 1e-2, lr_logits = m x 1e-1 (the defaults, which
    "auto" keeps); seed -> seed; `vblora` sets any other trainer field by its own
    name (r, num_vectors, target_modules, max_steps...). A trainer field set two ways is
    refused rather than one silently winning. `where` names the request fields of the
    first four (`method.supervised.hyperparameters.n_epochs`)."""
    data: dict[str, object] = {}
    source: dict[str, str] = {}

    def put(name: str, value: object, field: str) -> None:
        if name in data:
            raise HyperparameterError(field, f"sets {name}, which {source[name]} sets already")
        data[name], source[name] = value, field

    if n_epochs is not None:
        put("epochs", n_epochs, where["n_epochs"])
    if batch_size is not None:
        put("batch_size", batch_size, where["batch_size"])
    if learning_rate_multiplier is not None:
        put("lr_bank", DEFAULT_LR_BANK * learning_rate_multiplier, where["learning_rate_multiplier"])
        put("lr_logits", DEFAULT_LR_LOGITS * learning_rate_multiplier, where["learning_rate_multiplier"])
    if seed is not None:
        put("seed", seed, where["seed"])
    for name, value in vblora.items():
        put(name, value, f"vblora.{name}")
    try:
        return TrainingHyperparameters.parse(data), source
    except HyperparameterError as exc:
        raise HyperparameterError(request_field(exc.field, source), exc.reason) from None


def request_field(field: str, source: Mapping[str, str]) -> str:
    """The request field behind a trainer's error field (`hyperparameters.lr_bank` ->
    `hyperparameters.learning_rate_multiplier`); a field left at its default is named as
    the `vblora` field that would set it."""
    if not field.startswith("hyperparameters."):
        return field
    name = field.removeprefix("hyperparameters.")
    return source.get(name.split(".")[0], f"vblora.{name}")


def openai_view(hyperparameters: Mapping[str, object]) -> dict[str, object]:
    """OpenAI's names for a job's hyperparameters, beside the trainer's own."""
    lr_bank = hyperparameters.get("lr_bank", DEFAULT_LR_BANK)
    return {
        "n_epochs": hyperparameters.get("epochs") or "auto",  # unset: from the data size
        "batch_size": hyperparameters.get("batch_size"),
        "learning_rate_multiplier": lr_bank / DEFAULT_LR_BANK if isinstance(lr_bank, int | float) else None,
    }
