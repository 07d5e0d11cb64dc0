"""The serving engine: model runner, continuous batcher, sampling, adapter cache and slot table."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vbserve.model import BaseModelSpec
from vbserve.settings import Settings
from vbserve.vblora.ops import use_kernels
from vbserve_store.store import AdapterStore

from .adapters import AdapterCache
from .contract import (
    AdapterRef,
    AdapterUnavailableError,
    EngineError,
    FinalResult,
    GenerationRequest,
    InvalidRequestError,
    MixtureComponent,
    MixtureRef,
    OverloadedError,
    RequestFailedError,
    SamplingParams,
    TokenEvent,
    Usage,
)
from .engine import Engine, RequestHandle
from .grammar import Grammars, ResponseFormat
from .model_runner import ModelRunner

__all__ = [
    "AdapterCache",
    "AdapterRef",
    "AdapterUnavailableError",
    "Engine",
    "EngineError",
    "FinalResult",
    "GenerationRequest",
    "InvalidRequestError",
    "MixtureComponent",
    "MixtureRef",
    "ModelRunner",
    "OverloadedError",
    "RequestFailedError",
    "RequestHandle",
    "ResponseFormat",
    "SamplingParams",
    "TokenEvent",
    "Usage",
    "build_engine",
]


def build_engine(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    base_model: BaseModelSpec,
    store: AdapterStore | None,
    settings: Settings,
    *,
    on_adapter_event: Callable[[str, float], None] | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> Engine:
    """Wrap `model` for multi-adapter batches and start the engine thread. `base_model`
    describes `model` as it was before (`describe_model`): the engine reads its context
    length, vocabulary, EOS ids, module shapes and rank limit from there."""
    use_kernels(settings.kernels)
    runner = ModelRunner(
        model,
        max_rows=settings.max_batch_size,
        max_len=base_model.max_len,
        num_adapter_slots=settings.max_adapter_slots,
        max_rank=base_model.max_rank,
        fast_path=settings.fast_path,
        cuda_graphs=settings.cuda_graphs,
    )
    adapters = None
    if store is not None:
        adapters = AdapterCache(
            store,
            base_model,
            cache_bytes=settings.adapter_cache_bytes,
            device=runner.device,
            dtype=runner.dtype,
            on_event=on_adapter_event,
        )
    grammars = Grammars(
        tokenizer,
        base_model.vocab_size,
        base_model.eos_ids,
        max_schema_chars=settings.response_format_max_schema_chars,
        max_schema_depth=settings.response_format_max_schema_depth,
        compile_timeout_s=settings.response_format_compile_timeout_s,
        cache_bytes=settings.response_format_cache_bytes,
    )
    return Engine(
        runner,
        base_model,
        tokenizer,
        adapters,
        grammars,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_new_tokens_limit=settings.max_new_tokens_limit,
        prefill_token_budget=settings.prefill_chunk_tokens,
        max_n=settings.max_n,
        on_step=on_step,
    )
