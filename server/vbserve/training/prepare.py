"""From an uploaded job to what the trainer needs: checked hyperparameters, the adapter
config they give on the loaded model, and the tokenized files.

Both sides call it: the HTTP layer before queueing (so a bad file is refused at upload,
with its line number, not minutes later by a worker) and the worker before training
(the queue may hold jobs queued under other limits or by an older server).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from vbserve.model import BaseModelSpec
from vbserve.settings import Settings
from vbserve_store import (
    AdapterConfig,
    BankNotFoundError,
    LoRAAdapter,
    VBLoRAAdapter,
    decode_bank,
    encode_adapter,
    encode_bank,
    index_dtype_for,
)
from vbserve_store.store import AdapterStore

from .data import DatasetLimits, Example, parse_jsonl
from .errors import HyperparameterError
from .hyperparams import FIT_STEPS, TrainingHyperparameters


@dataclass(frozen=True)
class TrainingLimits:
    """Server-side limits a job must fit in (the rank limit is the base model's
    `BaseModelSpec.max_rank`: a trained adapter must be servable)."""

    max_num_vectors: int = 4096
    # Padded tokens per forward of the trainer (see `Settings.training_max_batch_tokens`).
    max_batch_tokens: int = 1024
    dataset: DatasetLimits = field(default_factory=DatasetLimits)

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainingLimits:
        return cls(
            max_num_vectors=settings.training_max_num_vectors,
            max_batch_tokens=settings.training_max_batch_tokens,
            dataset=DatasetLimits(max_bytes=settings.training_max_file_bytes, max_rows=settings.training_max_rows),
        )


@dataclass(frozen=True)
class PreparedJob:
    config: AdapterConfig
    train: list[Example]
    validation: list[Example] | None

    def trained_tokens(self, hp: TrainingHyperparameters) -> int | None:
        """The tokens a job trains on (OpenAI's `trained_tokens`): every training row's
        tokens, once per epoch. None with `max_steps`, which need not end on an epoch."""
        if hp.max_steps is not None:
            return None
        return hp.epochs_for(len(self.train)) * sum(len(example.input_ids) for example in self.train)


def published_bytes(config: AdapterConfig, dtype: torch.dtype) -> int:
    """The bytes the adapter a job trains will take in the store (its `stored_bytes`),
    known before training: the encoded sizes depend only on the config and the dtype, so
    a placeholder adapter of that shape encodes to the same size. For the quota check at
    job creation."""
    s, k = config.num_subvectors, config.topk
    placeholder = VBLoRAAdapter(
        config,
        torch.zeros(config.num_vectors, config.vector_length, dtype=dtype),
        torch.arange(k, dtype=index_dtype_for(config.num_vectors)).repeat(s, 1),
        torch.full((s, k), 1 / k, dtype=dtype),
    )
    return len(encode_adapter(placeholder, include_bank=False)) + len(encode_bank(placeholder.bank))


def load_frozen_bank(store: AdapterStore, bank_id: str) -> torch.Tensor:
    """The stored bank a shared-bank job trains against (`hyperparameters.bank_id`). Whether
    the tenant may use it is checked when the job is created (`vbserve.api.routers.jobs`); a
    bank released since (every adapter using it deleted) fails the job, naming the field."""
    try:
        return decode_bank(store.get_bank(bank_id))
    except BankNotFoundError:
        raise BankNotFoundError("hyperparameters.bank_id", f"bank {bank_id!r} is no longer stored") from None


def fit_to_bank(hp: TrainingHyperparameters, bank: torch.Tensor) -> TrainingHyperparameters:
    """`hp` with the frozen bank's shape `(h, b)` as `num_vectors` and `vector_length`,
    where the job left them unset; set, they must match it."""
    shape = {"num_vectors": bank.shape[0], "vector_length": bank.shape[1]}
    for name, value in shape.items():
        if name in hp.model_fields_set and getattr(hp, name) != value:
            raise HyperparameterError(
                f"hyperparameters.{name}", f"{getattr(hp, name)} does not match the frozen bank's {value}"
            )
    return TrainingHyperparameters.parse({**hp.model_dump(exclude_unset=True), **shape})


def checked_config(
    base_model: BaseModelSpec,
    hp: TrainingHyperparameters,
    limits: TrainingLimits,
    frozen_bank: torch.Tensor | None,
    **sequence_limits: int | None,
) -> AdapterConfig:
    """The adapter config `hp` asks for, checked against the model, the server's limits and
    the frozen bank (whose shape it takes, `fit_to_bank`): what a training job and a fit job
    both must fit. `sequence_limits`: a training job's `max_positions`, `max_batch_tokens`."""
    if frozen_bank is not None:
        fit_to_bank(hp, frozen_bank)
    return hp.check_fits(
        base_model.module_shapes,
        max_rank=base_model.max_rank,
        max_num_vectors=limits.max_num_vectors,
        base_model=base_model.name,
        **sequence_limits,
    )


def prepare_job(
    base_model: BaseModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    hp: TrainingHyperparameters,
    training_file: bytes,
    validation_file: bytes | None = None,
    *,
    limits: TrainingLimits | None = None,
    frozen_bank: torch.Tensor | None = None,
) -> PreparedJob:
    """Raise `HyperparameterError` / `DatasetError` (naming the field) or return the job
    ready to train. Hyperparameters are checked first: they are cheap and a wrong
    `max_seq_len` would otherwise be reported as a dataset error.

    base_model: what the job trains on: the modules it may target, the context its
    sequences must fit, the rank a servable adapter may have, the name the adapter records.
    frozen_bank: the bank of a shared-bank job (`load_frozen_bank`), whose shape the
    hyperparameters must match (`fit_to_bank` makes them).
    """
    limits = limits or TrainingLimits()
    hp.check_validation(validation_file is not None)
    config = checked_config(
        base_model,
        hp,
        limits,
        frozen_bank,
        max_positions=base_model.context_length,
        max_batch_tokens=limits.max_batch_tokens,
    )

    def parse(data: bytes, field: str) -> list[Example]:
        return parse_jsonl(
            data, tokenizer, max_seq_len=hp.max_seq_len, truncation=hp.truncation, limits=limits.dataset, field=field
        )

    train = parse(training_file, "training_file")
    validation = parse(validation_file, "validation_file") if validation_file is not None else None
    return PreparedJob(config, train, validation)


def prepare_fit(
    base_model: BaseModelSpec,
    hp: TrainingHyperparameters,
    source: LoRAAdapter,
    *,
    limits: TrainingLimits | None = None,
    frozen_bank: torch.Tensor | None = None,
) -> AdapterConfig:
    """The adapter config of a fit_lora job (`fit.fit_vblora`), or `HyperparameterError`
    naming the field: the hyperparameters must fit the model, the server's limits and the
    frozen bank as a training job's do, and target exactly the source adapter's modules
    (the API fills `target_modules` and `r` from the source where the job left them
    unset). Both sides call it, as `prepare_job`."""
    limits = limits or TrainingLimits()
    config = checked_config(base_model, hp, limits, frozen_bank)
    wanted = {(m.name, m.in_features, m.out_features) for m in source.config.modules}
    if {(m.name, m.in_features, m.out_features) for m in config.modules} != wanted:
        names = sorted(m.name for m in source.config.modules)
        raise HyperparameterError(
            "hyperparameters.target_modules",
            f"must select the source adapter's {len(names)} modules ({', '.join(names[:3])}...) and no others",
        )
    return config


def with_fit_defaults(
    hp: TrainingHyperparameters, source: LoRAAdapter, base_model: BaseModelSpec
) -> TrainingHyperparameters:
    """A fit_lora job's hyperparameters with what it left unset taken from its source:
    `target_modules` the source's modules (by their short names, `q_proj`, when those
    select exactly them, else by full name), `r` the source's rank, and `max_steps`
    `FIT_STEPS`. Call it when the job is created: the queue keeps every field set."""
    data = hp.model_dump(exclude_unset=True)
    names = {m.name for m in source.config.modules}
    short = sorted({name.rsplit(".", 1)[-1] for name in names})
    selected = {n for n in base_model.module_shapes if any(n == t or n.endswith("." + t) for t in short)}
    data.setdefault("target_modules", short if selected == names else sorted(names))
    data.setdefault("r", source.config.r)
    data.setdefault("max_steps", FIT_STEPS)
    return TrainingHyperparameters.parse(data)
