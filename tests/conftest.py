"""Shared fixtures: a tiny random Llama built in the test, the real SmolLM2 from the wheel,
and PEFT VB-LoRA models with random logits and bank (the oracle)."""

from __future__ import annotations

import copy
import itertools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import torch

# The Triton kernels are tested on CPU tensors under Triton's interpreter, which has to be
# chosen before triton is first imported (the engine's imports do, through peft): here,
# before any of them. Ignored by everything that runs the torch kernels (all of CPU serving).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM

from vbserve.engine import Engine, build_engine
from vbserve.model import BaseModelSpec, describe_model
from vbserve.model.loader import load_model
from vbserve.settings import Settings


def tiny_llama(seed: int = 0, vocab: int = 256, hidden: int = 64) -> LlamaForCausalLM:
    """2 layers, hidden 64, MLP 128 by default: every dimension divisible by 16 and 32."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def random_peft_vblora(base, *, r, b, h, k, targets, seed=0, save_only_topk_weights=False, bank_scale=1.0):
    """A PEFT VB-LoRA model over a deep copy of `base`, with logits ~ N(0, 1) and a bank
    ~ U(-bank_scale/2, bank_scale/2), large enough that the adapter visibly moves the logits."""
    from peft import VBLoRAConfig, get_peft_model

    cfg = VBLoRAConfig(
        r=r,
        vector_length=b,
        num_vectors=h,
        topk=k,
        target_modules=targets,
        save_only_topk_weights=save_only_topk_weights,
    )
    model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vblora_logits" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "vblora_vector_bank" in name:
                p.copy_((torch.rand(p.shape, generator=gen) - 0.5) * bank_scale)
    return model.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="session")
def smollm2():
    cache = Path(os.environ.get("VBSERVE_MODEL_CACHE_DIR", Path.home() / ".cache" / "vbserve" / "models"))
    return load_model(cache_dir=cache)


def byte_tokenizer():
    """A byte-level tokenizer with exactly 256 tokens (no merges), built in the test: every
    non-ASCII character spans several tokens, which exercises incremental detokenization."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=None)


def described(model, tokenizer=None, settings: Settings | None = None) -> BaseModelSpec:
    """A plain (not yet engine-wrapped) model as the server describes it where it loads one;
    with the byte tokenizer and the default settings unless given."""
    return describe_model(model, tokenizer or byte_tokenizer(), settings or Settings())


def engine_over(model, tokenizer, store, settings: Settings, **hooks) -> Engine:
    """`build_engine` over `model` and its description, as the app's start-up builds it."""
    return build_engine(model, tokenizer, describe_model(model, tokenizer, settings), store, settings, **hooks)


REDIS_URL = os.environ.get("VBSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@contextmanager
def redis_test_prefix() -> Iterator[tuple[redis.Redis, str]]:
    """A real Redis client and a fresh key prefix whose keys are deleted afterwards.
    Skips the test, saying why, when no server answers at REDIS_URL."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        client.close()
        pytest.skip(f"no Redis server at {REDIS_URL} (set VBSERVE_TEST_REDIS_URL): {exc}")
    prefix = f"vbstest-{uuid.uuid4().hex[:12]}"
    try:
        yield client, prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@contextmanager
def failing_forward_pass(runner, n: int) -> Iterator[None]:
    """The `n`-th forward pass of `runner` (a ModelRunner: a prefill or a decode step) from
    now raises, as a fault in the model would; the runner is restored on exit."""
    forward, decode, calls = runner.forward, runner.decode, itertools.count(1)

    def failing(step):
        def call(*args, **kwargs):
            if next(calls) == n:
                raise RuntimeError("injected fault")
            return step(*args, **kwargs)

        return call

    runner.forward, runner.decode = failing(forward), failing(decode)
    try:
        yield
    finally:
        runner.forward, runner.decode = forward, decode


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run an ASGI app in a real uvicorn server on a free loopback port, in a background
    thread; yields its base URL and stops it on exit."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves on this socket
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    try:
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
