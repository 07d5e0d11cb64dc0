"""The engine on the real SmolLM2-135M: batch invariance and greedy parity with PEFT."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from tests.conftest import engine_over, random_peft_vblora
from vbserve.engine import AdapterRef, GenerationRequest, SamplingParams
from vbserve.settings import Settings
from vbserve.vblora.layer import targetable_linears
from vbserve_store import AdapterConfig, ModuleSpec, VBLoRAAdapter
from vbserve_store.peft_io import load_peft_dir
from vbserve_store.store import SQLiteAdapterStore

pytestmark = pytest.mark.smollm2
TENANT = "acme"


def smollm2_adapter(model, seed: int) -> VBLoRAAdapter:
    linears = targetable_linears(model)
    modules = tuple(
        ModuleSpec(n, m.in_features, m.out_features) for n, m in linears.items() if n.endswith(("q_proj", "v_proj"))
    )
    cfg = AdapterConfig(modules, r=4, vector_length=64, num_vectors=256, topk=2)
    gen = torch.Generator().manual_seed(seed)
    bank = (torch.rand(256, 64, generator=gen) - 0.5) * 0.2
    return VBLoRAAdapter.from_logits(cfg, bank, torch.randn(cfg.num_subvectors, 256, generator=gen))


@pytest.fixture(scope="module")
def engine_and_store(smollm2, tmp_path_factory):
    base = smollm2.model
    store = SQLiteAdapterStore(tmp_path_factory.mktemp("store") / "a.db")
    for i in range(16):
        store.put(TENANT, f"user{i}", smollm2_adapter(base, seed=i))
    settings = Settings(max_batch_size=32, max_adapter_slots=32, max_lora_rank=8, max_model_len=512)
    # The engine wraps layers in place; keep the session's model pristine for other tests.
    engine = engine_over(copy.deepcopy(base), smollm2.tokenizer, store, settings)
    yield engine, store
    engine.shutdown()
    store.close()


def chat_ids(tokenizer, text: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


async def generate(engine, ids, adapter=None, n=24):
    ref = AdapterRef(TENANT, adapter) if adapter else None
    handle = await engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=n), adapter=ref))
    return await handle.result()


QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Why is the sky blue?",
    "Translate 'good morning' to Spanish.",
]


async def test_batch_invariance_smollm2(engine_and_store, smollm2):
    engine, _ = engine_and_store
    jobs = [(chat_ids(smollm2.tokenizer, QUESTIONS[i % 5]), f"user{i}" if i < 16 else None) for i in range(20)]
    alone = [(await generate(engine, ids, a)).token_ids for ids, a in jobs]

    async def staggered(i, ids, a):
        await asyncio.sleep(0.05 * (i % 4))
        return await generate(engine, ids, a)

    together = await asyncio.gather(*(staggered(i, ids, a) for i, (ids, a) in enumerate(jobs)))
    assert [r.token_ids for r in together] == alone
    base = alone[16]  # same question as user0/user5/...: the adapters change the answer
    assert sum(alone[i] != base for i in range(0, 16, 5)) >= 2


async def test_engine_matches_peft_greedy_64_tokens(engine_and_store, smollm2, tmp_path):
    engine, store = engine_and_store
    peft_model = random_peft_vblora(
        smollm2.model, r=4, b=64, h=256, k=2, targets=["q_proj", "v_proj"], seed=21, bank_scale=0.2,
        save_only_topk_weights=True,
    )  # fmt: skip
    peft_model.save_pretrained(tmp_path / "ckpt")
    store.put(TENANT, "from-peft", load_peft_dir(tmp_path / "ckpt"))
    ids = chat_ids(smollm2.tokenizer, "Tell me a short story about a robot.")
    with torch.no_grad():
        ref = peft_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, min_new_tokens=64)
    ref_tokens = ref[0, len(ids) :].tolist()
    handle = await engine.submit(
        GenerationRequest(
            ids, SamplingParams(max_new_tokens=64, ignore_eos=True), adapter=AdapterRef(TENANT, "from-peft")
        )
    )
    ours = await handle.result()
    base = await generate(engine, ids, None, n=64)
    assert ours.token_ids == ref_tokens
    assert ours.token_ids != base.token_ids  # the adapter changes the output


async def test_chunked_prefill_same_tokens_smollm2(engine_and_store, smollm2):
    """Prompts prefilled in chunks of 16 tokens (several iterations each) give the greedy
    tokens of a whole-prompt prefill, with and without an adapter."""
    engine, store = engine_and_store
    settings = Settings(
        max_batch_size=4, max_adapter_slots=4, max_lora_rank=8, max_model_len=512, prefill_chunk_tokens=16
    )
    chunked = engine_over(copy.deepcopy(smollm2.model), smollm2.tokenizer, store, settings)
    try:
        jobs = [
            (chat_ids(smollm2.tokenizer, q), a) for q, a in zip(QUESTIONS[:3], ["user1", None, "user2"], strict=True)
        ]
        assert all(len(ids) > 2 * 16 for ids, _ in jobs)
        whole = [(await generate(engine, ids, a)).token_ids for ids, a in jobs]
        together = await asyncio.gather(*(generate(chunked, ids, a) for ids, a in jobs))
        assert [r.token_ids for r in together] == whole
    finally:
        chunked.shutdown()
