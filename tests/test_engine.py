"""The engine on a tiny random Llama: batch invariance across adapters, sampling,
streaming, overload, cancellation and bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from tests.conftest import byte_tokenizer, engine_over, tiny_llama
from vbserve.engine import (
    AdapterRef,
    AdapterUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    OverloadedError,
    SamplingParams,
)
from vbserve.engine.engine import Engine
from vbserve.engine.sampling import sample_next_tokens
from vbserve.settings import Settings
from vbserve_store import AdapterConfig, ModuleSpec, VBLoRAAdapter
from vbserve_store.store import SQLiteAdapterStore

TENANT = "t1"


def random_adapter(model, seed: int, targets=("q_proj", "v_proj"), r=4, b=16, h=32, k=2, bank_scale=1.0):
    shapes = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(targets)}
    modules = tuple(ModuleSpec(n, m.in_features, m.out_features) for n, m in shapes.items())
    cfg = AdapterConfig(modules, r=r, vector_length=b, num_vectors=h, topk=k)
    gen = torch.Generator().manual_seed(seed)
    bank = (torch.rand(h, b, generator=gen) - 0.5) * bank_scale
    return VBLoRAAdapter.from_logits(cfg, bank, torch.randn(cfg.num_subvectors, h, generator=gen))


def engine_with_adapters(db: Path, *, count: int, first_seed: int, **limits: int) -> tuple[Engine, SQLiteAdapterStore]:
    """An engine on the tiny model (seed 7) whose store holds `count` random q,v adapters
    `ad0`.. (seeds from `first_seed`); `limits` are Settings fields. Shut down and close both."""
    model = tiny_llama(seed=7)
    store = SQLiteAdapterStore(db)
    for i in range(count):
        store.put(TENANT, f"ad{i}", random_adapter(model, seed=first_seed + i))
    settings = Settings(max_lora_rank=8, max_model_len=128, **limits)
    return engine_over(model, byte_tokenizer(), store, settings), store


@pytest.fixture
def setup(tmp_path):
    model = tiny_llama(seed=7)
    store = SQLiteAdapterStore(tmp_path / "a.db")
    for i in range(16):
        targets = ("q_proj", "v_proj") if i % 2 else ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
        store.put(TENANT, f"ad{i}", random_adapter(model, seed=100 + i, targets=targets, r=2 + i % 3))
    settings = Settings(max_batch_size=24, max_queue=64, max_adapter_slots=20, max_lora_rank=8, max_model_len=128)
    engine = engine_over(model, byte_tokenizer(), store, settings)
    yield engine, store, model
    engine.shutdown()
    store.close()


def greedy(prompt, adapter=None, n=20, **kw):
    return GenerationRequest(
        prompt_ids=prompt,
        adapter=AdapterRef(TENANT, adapter) if adapter else None,
        sampling=SamplingParams(max_new_tokens=n, **kw),
    )


async def run(engine, request):
    handle = await engine.submit(request)
    return await handle.result()


def prompts(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (int(torch.randint(3, 20, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(count)
    ]


async def test_batch_invariance_mixed_adapters(setup):
    engine, _, _ = setup
    ps = prompts(20)
    jobs = [(ps[i], f"ad{i}" if i < 16 else None) for i in range(20)]
    alone = [(await run(engine, greedy(p, a))).token_ids for p, a in jobs]

    async def staggered(i, p, a):
        await asyncio.sleep(0.01 * (i % 5))  # join at different times, mid-decode of others
        return await run(engine, greedy(p, a))

    together = await asyncio.gather(*(staggered(i, p, a) for i, (p, a) in enumerate(jobs)))
    assert [r.token_ids for r in together] == alone
    # The adapters really act: with the same prompt, outputs differ from the base model's.
    base = (await run(engine, greedy(ps[0]))).token_ids
    with_adapters = [(await run(engine, greedy(ps[0], f"ad{i}"))).token_ids for i in range(16)]
    assert sum(t != base for t in with_adapters) >= 12


async def test_sampling_seed_reproducible_and_varied(setup):
    engine, _, _ = setup
    p = prompts(1, seed=3)[0]
    sampled = dict(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a = await run(engine, greedy(p, "ad1", n=30, **sampled))
    b = await run(engine, greedy(p, "ad1", n=30, **sampled))
    assert a.token_ids == b.token_ids
    c = await run(engine, greedy(p, "ad1", n=30, **{**sampled, "seed": 99}))
    assert c.token_ids != a.token_ids


async def test_top_k_one_is_greedy_and_repetition_penalty_changes_output(setup):
    engine, _, _ = setup
    p = prompts(1, seed=4)[0]
    g = await run(engine, greedy(p, n=30))
    k1 = await run(engine, greedy(p, n=30, temperature=0.7, top_k=1, seed=5))
    assert k1.token_ids == g.token_ids
    rp = await run(engine, greedy(p, n=30, repetition_penalty=5.0))
    assert rp.token_ids != g.token_ids
    assert len(set(rp.token_ids)) >= len(set(g.token_ids))


async def test_stream_matches_final_text_with_multibyte_and_stop(setup):
    engine, _, _ = setup
    p = prompts(1, seed=5)[0]
    full = await run(engine, greedy(p, n=40))
    handle = await engine.submit(greedy(p, n=40))
    pieces = [e.text async for e in handle if hasattr(e, "token_id")]
    assert "".join(pieces) == full.text
    assert "\ufffd" not in "".join(pieces) or "\ufffd" in full.text
    assert full.finish_reason == "length" and full.usage.completion_tokens == 40
    # A stop string taken from the middle of the output ends generation there.
    text = full.text
    assert len(text) >= 6, text
    stop = text[3:6]
    stopped = await run(engine, greedy(p, n=40, stop=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.find(stop)]
    # Stop token ids end generation at that token.
    tok = full.token_ids[5]
    by_id = await run(engine, greedy(p, n=40, stop_token_ids=[tok]))
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[: full.token_ids.index(tok) + 1]


async def test_logprobs(setup):
    engine, _, _ = setup
    handle = await engine.submit(greedy(prompts(1)[0], n=5, logprobs=True, top_logprobs=3))
    events = [e async for e in handle if hasattr(e, "token_id") and e.token_id >= 0]
    for e in events:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        # greedy picks the most likely token
        assert max(e.top_logprobs, key=e.top_logprobs.get) == e.token_id


async def test_overload_refuses_immediately_and_serves_the_rest(setup):
    engine, _, _ = setup
    ps = prompts(200, seed=9)

    async def one(i):
        try:
            return await asyncio.wait_for(run(engine, greedy(ps[i], f"ad{i % 16}", n=4)), timeout=120)
        except OverloadedError:
            return "overloaded"

    results = await asyncio.gather(*(one(i) for i in range(200)))
    refused = sum(r == "overloaded" for r in results)
    served = [r for r in results if r != "overloaded"]
    assert refused > 0 and len(served) >= 64
    assert all(r.finish_reason == "length" and len(r.token_ids) == 4 for r in served)
    assert engine.queue_length == 0 and engine.running_count == 0


async def test_a_failing_forward_fails_its_requests_and_the_engine_serves_on(setup, monkeypatch):
    """A model error (a bug, a library change) in prefill or in decode ends the requests
    in that step with an error, instead of leaving them waiting forever."""
    engine, _, _ = setup
    p = prompts(1, seed=8)[0]
    expected = (await run(engine, greedy(p, "ad2"))).token_ids
    forward, decode = engine.runner.forward, engine.runner.decode
    for failing_call in (1, 4):  # the prefill, a decode step
        calls = 0

        def flaky(step, failing_call=failing_call):
            def call(*args):
                nonlocal calls
                calls += 1
                if calls == failing_call:
                    raise RuntimeError("boom")
                return step(*args)

            return call

        monkeypatch.setattr(engine.runner, "forward", flaky(forward))
        monkeypatch.setattr(engine.runner, "decode", flaky(decode))
        result = await asyncio.wait_for(run(engine, greedy(p, "ad2")), timeout=30)
        assert result.finish_reason == "error" and result.error.field == "engine", failing_call
        assert len(result.token_ids) == failing_call - 1  # the tokens emitted before the failure
        monkeypatch.setattr(engine.runner, "forward", forward)
        monkeypatch.setattr(engine.runner, "decode", decode)
        assert (await run(engine, greedy(p, "ad2"))).token_ids == expected  # slot and row were freed


async def test_a_failing_step_observer_fails_no_request(setup, monkeypatch):
    """The metrics callback runs after every step; its bug is logged, the requests finish."""
    engine, _, _ = setup
    p = prompts(1, seed=9)[0]
    expected = (await run(engine, greedy(p, "ad3"))).token_ids

    def broken(stats):
        raise RuntimeError("observer bug")

    monkeypatch.setattr(engine, "on_step", broken)
    result = await asyncio.wait_for(run(engine, greedy(p, "ad3")), timeout=30)
    assert result.finish_reason == "length" and result.token_ids == expected


async def test_cancel_frees_slot_and_timeout(setup):
    engine, _, _ = setup
    handle = await engine.submit(greedy(prompts(1)[0], "ad2", n=100))
    async for _ in handle:
        handle.cancel()
        break
    result = await handle.result()
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 100
    timed = await run(engine, GenerationRequest(prompts(1)[0], SamplingParams(max_new_tokens=100), timeout_s=1e-3))
    assert timed.finish_reason == "timeout"
    assert engine.running_count == 0


async def test_new_version_served_after_publish(setup):
    engine, store, _ = setup
    p = prompts(1, seed=11)[0]
    before = await run(engine, greedy(p, "ad3"))
    store.put(TENANT, "ad3", random_adapter(tiny_llama(), seed=999))
    after = await run(engine, greedy(p, "ad3"))
    assert after.adapter_version == before.adapter_version + 1
    assert after.token_ids != before.token_ids


@pytest.mark.parametrize(
    ("request_kwargs", "error", "field"),
    [
        (dict(prompt_ids=[]), InvalidRequestError, "prompt"),
        (dict(prompt_ids=[1, 999]), InvalidRequestError, "prompt"),
        (dict(prompt_ids=[1] * 200), InvalidRequestError, "prompt"),
        (dict(sampling=SamplingParams(max_new_tokens=0)), InvalidRequestError, "max_new_tokens"),
        (dict(sampling=SamplingParams(max_new_tokens=10**6)), InvalidRequestError, "max_new_tokens"),
        (dict(sampling=SamplingParams(max_new_tokens=126)), InvalidRequestError, "max_new_tokens"),
        (dict(sampling=SamplingParams(temperature=-1)), InvalidRequestError, "temperature"),
        (dict(sampling=SamplingParams(temperature=float("nan"))), InvalidRequestError, "temperature"),
        (dict(sampling=SamplingParams(top_p=0)), InvalidRequestError, "top_p"),
        (dict(sampling=SamplingParams(top_k=-3)), InvalidRequestError, "top_k"),
        (dict(sampling=SamplingParams(repetition_penalty=0)), InvalidRequestError, "repetition_penalty"),
        (dict(sampling=SamplingParams(stop=[""])), InvalidRequestError, "stop"),
        (dict(sampling=SamplingParams(stop=["x"] * 100)), InvalidRequestError, "stop"),
        (dict(sampling=SamplingParams(stop="abc")), InvalidRequestError, "stop"),
        (dict(sampling=SamplingParams(stop_token_ids=[10**9])), InvalidRequestError, "stop_token_ids"),
        (dict(sampling=SamplingParams(seed=-1)), InvalidRequestError, "seed"),
        (dict(adapter=AdapterRef(TENANT, "missing")), AdapterUnavailableError, "model"),
        (dict(adapter=AdapterRef("other-tenant", "ad1")), AdapterUnavailableError, "model"),
        (dict(adapter=AdapterRef(TENANT, "foreign")), AdapterUnavailableError, "model"),
    ],
)
async def test_bad_input_typed_error_before_compute(setup, request_kwargs, error, field):
    engine, store, _ = setup
    # An adapter for another base model (different hidden size) lives in the store.
    store.put(TENANT, "foreign", random_adapter(tiny_llama(hidden=32), seed=1))
    running = asyncio.ensure_future(run(engine, greedy(prompts(1)[0], "ad5", n=60)))
    await asyncio.sleep(0.05)
    kwargs = {"prompt_ids": [1, 2, 3], **request_kwargs}
    with pytest.raises(error) as info:
        await engine.submit(GenerationRequest(**kwargs))
    assert info.value.field == field
    if error is AdapterUnavailableError and "foreign" in str(kwargs.get("adapter")):
        assert info.value.kind == "incompatible"
    result = await running  # the batch is unaffected
    assert result.finish_reason == "length" and len(result.token_ids) == 60


class RacingStore:
    """A store proxy that runs `before_get` once, just before the adapter loader's read: the
    window between a request's resolve and its cold load, where a publish may land."""

    def __init__(self, store: SQLiteAdapterStore) -> None:
        self._store = store
        self.before_get = None

    def __getattr__(self, name):
        return getattr(self._store, name)

    def get(self, tenant, name):
        if self.before_get is not None:
            action, self.before_get = self.before_get, None
            action()
        return self._store.get(tenant, name)


@pytest.mark.parametrize("race", ["republish", "delete"])
async def test_adapter_replaced_while_loading(tmp_path, race):
    model = tiny_llama(seed=7)
    store = SQLiteAdapterStore(tmp_path / "a.db")
    first = store.put(TENANT, "ad", random_adapter(model, seed=1)).version
    racing = RacingStore(store)
    engine = engine_over(model, byte_tokenizer(), racing, Settings(max_batch_size=4, max_model_len=128))
    try:
        newer = random_adapter(tiny_llama(seed=7), seed=2)
        racing.before_get = {
            "republish": lambda: store.put(TENANT, "ad", newer),
            "delete": lambda: store.delete(TENANT, "ad"),
        }[race]
        p = prompts(1, seed=12)[0]
        raced = await run(engine, greedy(p, "ad"))
        if race == "delete":
            assert raced.finish_reason == "error" and raced.error.kind == "not_found"
            return
        # Served the version published during its load, not a conflict error.
        assert raced.finish_reason == "length" and raced.adapter_version == first + 1
        again = await run(engine, greedy(p, "ad"))  # resolves the new version directly
        assert again.adapter_version == first + 1 and again.token_ids == raced.token_ids
    finally:
        engine.shutdown()
        store.close()


async def test_chunked_prefill_interleaves_decode_and_is_batch_invariant(tmp_path):
    """A prompt longer than the prefill budget is prefilled over several iterations, each
    followed by a decode step of the running requests, and every request's greedy tokens
    are those it gets with the whole prompt prefilled at once."""
    store = SQLiteAdapterStore(tmp_path / "a.db")
    for i in range(3):
        store.put(TENANT, f"ad{i}", random_adapter(tiny_llama(seed=7), seed=200 + i))
    chunk = 16
    engines = {
        budget: engine_over(
            tiny_llama(seed=7),
            byte_tokenizer(),
            store,
            Settings(max_batch_size=8, max_model_len=128, prefill_chunk_tokens=budget),
        )
        for budget in (chunk, 512)
    }
    try:
        gen = torch.Generator().manual_seed(13)
        long_prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (100, 37, 64)]
        jobs = [(long_prompts[0], "ad0"), (prompts(1, seed=14)[0], "ad1"), (long_prompts[1], None)]
        jobs += [(long_prompts[2], "ad2"), (prompts(1, seed=15)[0], None)]
        whole = engines[512]
        alone = [(await run(whole, greedy(p, a, n=20))).token_ids for p, a in jobs]

        chunked = engines[chunk]
        forwards = []  # (first row, tokens per row) of every forward: prefills, and decode steps (row 0)
        forward, decode = chunked.runner.forward, chunked.runner.decode

        def spy(first_row, input_ids, *args):
            forwards.append((first_row, input_ids.shape[1]))
            return forward(first_row, input_ids, *args)

        def spy_decode(input_ids, *args):
            forwards.append((0, input_ids.shape[1]))
            return decode(input_ids, *args)

        chunked.runner.forward, chunked.runner.decode = spy, spy_decode
        # A short request decodes while the long prompts arrive behind it.
        handle = await chunked.submit(greedy(prompts(1, seed=16)[0], n=60))
        async for _ in handle:
            break

        async def staggered(i, p, a):
            await asyncio.sleep(0.01 * i)
            return await run(chunked, greedy(p, a, n=20))

        together = await asyncio.gather(*(staggered(i, p, a) for i, (p, a) in enumerate(jobs)))
        await handle.result()
        assert [r.token_ids for r in together] == alone
        assert max(width for _, width in forwards) <= chunk
        last_row = 8 - 1  # where chunks are prefilled
        chunk_steps = [i for i, (row, _) in enumerate(forwards) if row == last_row]
        assert len(chunk_steps) >= 100 // chunk + 37 // chunk + 64 // chunk
        # Every chunk is followed by a decode step of the running requests.
        assert all(forwards[i + 1][1] == 1 for i in chunk_steps)
    finally:
        for engine in engines.values():
            engine.shutdown()
        store.close()


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token() -> None:
    """top_p=1e-300 is 0 in float32: it masked every token, and the NaN softmax failed the
    engine step of every request in the batch (a 500; schemathesis found it with
    top_p=4e-249). The API now refuses such values; the sampler still keeps the top token."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=1.0, top_p=1e-300), SamplingParams(temperature=1.0, top_p=4e-249, top_k=2)]
    tokens = sample_next_tokens(logits, params, [torch.Generator().manual_seed(0)] * 2, [[], []], [[], []])
    assert tokens.tolist() == [1, 0]
