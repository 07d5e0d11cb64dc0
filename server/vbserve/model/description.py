"""The one description of the base model that every part of the server reads.

The engine (KV cache length, vocabulary, EOS, which adapters fit), the HTTP API (the
checks at upload, the room left for output, LoRAX's finish reason) and the trainer (which
modules a job may target, the context its sequences must fit) used to read these off the
model, the engine's runner or the settings each in its own way. `describe_model` computes
them once, where the model is loaded (`vbserve.services.open_services`), from the plain
model, before the engine wraps its layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vbserve.settings import Settings
from vbserve.vblora.layer import targetable_linears
from vbserve_store import AdapterValidationError


@dataclass(frozen=True)
class BaseModelSpec:
    """The base model as this server serves and trains on it."""

    name: str  # what clients pass as `model` for the base model; trained adapters record it
    # {dotted name: (in_features, out_features)} of every linear an adapter may target.
    module_shapes: Mapping[str, tuple[int, int]]
    # The model's own context (`max_position_embeddings`), which bounds a training job's
    # `max_seq_len`; None when the config does not say.
    context_length: int | None
    # Tokens one request may span (prompt and output): `max_model_len` capped by
    # `context_length`. It sizes the engine's KV cache.
    max_len: int
    vocab_size: int  # rows of the LM head: every token id is in [0, vocab_size)
    eos_ids: frozenset[int]  # the tokenizer's EOS and the generation config's
    max_rank: int  # the largest LoRA rank the engine's slots hold (`max_lora_rank`)

    def check_rank(self, rank: int, field: str, *, subject: str | None = None) -> None:
        """The rule for which ranks this server serves, for an upload, a request's adapter
        and a mixture alike. Raises `AdapterValidationError` naming `field`; `subject` says
        what has the rank (default: `rank {rank}`)."""
        if rank > self.max_rank:
            raise AdapterValidationError(field, f"{subject or f'rank {rank}'} exceeds this server's max {self.max_rank}")


def describe_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: Settings, *, name: str = ""
) -> BaseModelSpec:
    """Describe a plain (not engine-wrapped) model. Its name is `settings.served_model_name`
    when set, else `name`, else the model's `name_or_path`."""
    context = getattr(model.config, "max_position_embeddings", None)
    return BaseModelSpec(
        name=settings.served_model_name or name or model.name_or_path or "base",
        module_shapes=MappingProxyType(module_shapes(model)),
        context_length=context,
        max_len=settings.max_model_len if context is None else min(settings.max_model_len, context),
        vocab_size=model.get_output_embeddings().weight.shape[0],
        eos_ids=eos_token_ids(tokenizer, model),
        max_rank=settings.max_lora_rank,
    )


def module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{dotted name: (in_features, out_features)} of every linear an adapter may target
    in a plain (not engine-wrapped) model."""
    return {name: (m.in_features, m.out_features) for name, m in targetable_linears(model).items()}


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> frozenset[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return frozenset(ids)
