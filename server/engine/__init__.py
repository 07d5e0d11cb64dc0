"""The serving engine: model runner, continuous batcher, sampling, adapter manager."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapter_store.store import AdapterStore
from server.settings import Settings
from server.vblora.ops import use_kernels

from .adapter_manager import AdapterManager
from .batcher import Engine, RequestHandle, eos_token_ids
from .grammar import Grammars, ResponseFormat
from .model_runner import ModelRunner
from .types import (
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

__all__ = [
    "AdapterManager",
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
    store: AdapterStore | None,
    settings: Settings,
    *,
    on_adapter_event: Callable[[str, float], None] | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> Engine:
    """Wrap `model` for multi-adapter batches and start the engine thread."""
    use_kernels(settings.kernels)
    runner = ModelRunner(
        model,
        max_rows=settings.max_batch_size,
        max_len=settings.max_model_len,
        num_adapter_slots=settings.max_adapter_slots,
        max_rank=settings.max_lora_rank,
        fast_path=settings.fast_path,
        cuda_graphs=settings.cuda_graphs,
    )
    manager = None
    if store is not None:
        manager = AdapterManager(
            store,
            runner.layers,
            max_rank=settings.max_lora_rank,
            cache_bytes=settings.adapter_cache_bytes,
            device=runner.device,
            dtype=runner.dtype,
            on_event=on_adapter_event,
        )
    grammars = Grammars(
        tokenizer,
        runner.vocab_size,
        eos_token_ids(tokenizer, model),
        max_schema_chars=settings.response_format_max_schema_chars,
        max_schema_depth=settings.response_format_max_schema_depth,
        compile_timeout_s=settings.response_format_compile_timeout_s,
        cache_bytes=settings.response_format_cache_bytes,
    )
    return Engine(
        runner,
        tokenizer,
        manager,
        grammars,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_new_tokens_limit=settings.max_new_tokens_limit,
        prefill_token_budget=settings.prefill_chunk_tokens,
        max_n=settings.max_n,
        on_step=on_step,
    )
