"""No request can hurt another in the engine (issue #12, findings 1 and 2): sampling values
the float32 sampler cannot hold are refused at submit, a request that breaks while it is
sampled or detokenized ends alone while the rest of its batch goes on, and an adapter a
waiting request needs is never lost from the cache."""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import httpx
import pytest
import torch

from tests.conftest import byte_tokenizer, engine_over, tiny_llama
from tests.test_api import api_settings, chat_tokenizer
from tests.test_engine import TENANT, engine_with_adapters, greedy, prompts, random_adapter, run
from vbserve.app import create_app
from vbserve.engine import (
    AdapterRef,
    AdapterUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    RequestFailedError,
    SamplingParams,
)
from vbserve.engine.adapters import compose, composed_nbytes
from vbserve.engine.contract import MAX_REPETITION_PENALTY, MIN_POSITIVE_SETTING, MIN_REPETITION_PENALTY
from vbserve.engine.sampling import NO_TOKEN, sample_next_tokens
from vbserve.settings import Settings
from vbserve_store.store import SQLiteAdapterStore

VOCAB = 256  # tiny_llama's


@pytest.fixture
def engine(tmp_path):
    engine, store = engine_with_adapters(
        tmp_path / "a.db", count=4, first_seed=100, max_batch_size=8, max_queue=32, max_adapter_slots=8
    )
    yield engine
    engine.shutdown()
    store.close()


# -- finding 1: bounds ---------------------------------------------------------------------

TOO_SMALL = [1e-300, 1e-50, MIN_POSITIVE_SETTING / 2]


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        *[(dict(temperature=t), "temperature") for t in TOO_SMALL],
        *[(dict(temperature=1.0, top_p=p), "top_p") for p in TOO_SMALL],
        *[(dict(repetition_penalty=p), "repetition_penalty") for p in [*TOO_SMALL, MIN_REPETITION_PENALTY / 2]],
        (dict(repetition_penalty=MAX_REPETITION_PENALTY * 1.01), "repetition_penalty"),
        (dict(temperature=1.0, top_k=10**30), "top_k"),
        (dict(temperature=1.0, top_k=VOCAB + 1), "top_k"),
    ],
)
async def test_sampling_values_the_sampler_cannot_hold_are_refused(engine, sampling, field):
    running = asyncio.ensure_future(run(engine, greedy(prompts(1)[0], "ad1", n=60)))
    await asyncio.sleep(0.05)
    with pytest.raises(InvalidRequestError) as info:
        await engine.submit(GenerationRequest([1, 2, 3], SamplingParams(**sampling)))
    assert info.value.field == field
    result = await running
    assert result.finish_reason == "length" and len(result.token_ids) == 60


async def test_sampling_values_at_the_bounds_work(engine):
    """The smallest temperature and top_p the bounds allow leave one candidate: greedy."""
    p = prompts(1, seed=2)[0]
    expected = (await run(engine, greedy(p, "ad0", n=30))).token_ids
    for sampling in (
        dict(temperature=MIN_POSITIVE_SETTING, seed=1),
        dict(temperature=1.0, top_p=MIN_POSITIVE_SETTING, seed=1),
        dict(temperature=1.0, top_k=1, seed=1),
    ):
        result = await run(engine, greedy(p, "ad0", n=30, **sampling))
        assert result.token_ids == expected, sampling
    for sampling in (
        dict(temperature=100.0, top_k=VOCAB, seed=3),
        dict(repetition_penalty=MIN_REPETITION_PENALTY),
        dict(repetition_penalty=MAX_REPETITION_PENALTY, temperature=0.5, seed=4),
    ):
        result = await run(engine, greedy(p, "ad0", n=30, ignore_eos=True, **sampling))
        assert result.finish_reason == "length" and len(result.token_ids) == 30, sampling


@pytest.fixture
async def api(tmp_path):
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    app = create_app(api_settings(), model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        yield client
    store.close()


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {"prompt": "x", "temperature": 1e-50}, "temperature"),
        ("/v1/completions", {"prompt": "x", "temperature": 1e-300}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 1e-50}, "top_p"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 1e-50}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "top_k": 10**30}, "top_k"),
        ("/v1/chat/completions", {**CHAT, "temperature": 1e-300}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "top_k": VOCAB + 1}, "top_k"),
        ("/generate", {"inputs": "x", "parameters": {"temperature": 1e-50}}, "parameters.temperature"),
        ("/generate_stream", {"inputs": "x", "parameters": {"top_p": 1e-300}}, "parameters.top_p"),
        ("/generate", {"inputs": "x", "parameters": {"top_k": 10**30}}, "parameters.top_k"),
    ],
)
async def test_api_refuses_what_the_sampler_cannot_hold_while_others_generate(api, path, body, field):
    """A 400 naming the field, and a greedy request running beside it is unaffected."""
    beside = asyncio.ensure_future(
        api.post("/v1/completions", json={"prompt": "abc", "temperature": 0, "max_tokens": 120})
    )
    await asyncio.sleep(0.01)
    r = await api.post(path, json=body)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["type"], r.json()["error"]["field"]) == ("invalid_request", field)
    done = await beside
    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] in ("length", "stop"), done.text


# -- finding 1: a row that breaks ends alone ----------------------------------------------


class ExplodingStops(list):
    """A stop list that raises when the detokenizer reads it once `armed`: a failure in
    one request's detokenizing, injected through that request's own object."""

    armed = False

    def __iter__(self):
        if self.armed:
            raise RuntimeError("injected detokenizer failure")
        return super().__iter__()


def _break_top_k(sampling: SamplingParams) -> None:
    sampling.top_k = 10**30  # past validation: the batched tensor of top-k values overflows


def _break_temperature(sampling: SamplingParams) -> None:
    sampling.temperature = 1e-50  # past validation: 0 in float32, the row's probabilities NaN


def _break_detokenizer(sampling: SamplingParams) -> None:
    sampling.stop.armed = True


# Beside the victim: base and adapter rows, greedy and seeded-sampled, all running.
NEIGHBOURS = [
    (None, {}),
    ("ad0", {}),
    ("ad1", {}),
    ("ad2", dict(temperature=0.8, top_k=40, seed=7)),
    (None, dict(temperature=1.2, seed=8)),
]


@pytest.mark.parametrize("inject", [_break_top_k, _break_temperature, _break_detokenizer])
async def test_a_request_that_breaks_mid_batch_fails_alone(engine, inject, caplog):
    ps = prompts(len(NEIGHBOURS) + 1, seed=21)

    def neighbour(i: int) -> GenerationRequest:
        adapter, sampling = NEIGHBOURS[i]
        return greedy(ps[i], adapter, n=100, ignore_eos=True, **sampling)

    alone = [(await run(engine, neighbour(i))).token_ids for i in range(len(NEIGHBOURS))]
    caplog.set_level(logging.ERROR, logger="vbserve.engine.engine")
    handles = [await engine.submit(neighbour(i)) for i in range(len(NEIGHBOURS))]
    for handle in handles:  # all of them are running
        await anext(aiter(handle))
    victim = await engine.submit(
        greedy(ps[-1], "ad3", n=100, temperature=1.0, seed=5, stop=ExplodingStops(["\x00never"]))
    )
    await anext(aiter(victim))  # it is running too
    inject(victim.request.sampling)
    failed = await asyncio.wait_for(victim.result(), timeout=30)
    assert failed.finish_reason == "error" and isinstance(failed.error, RequestFailedError)
    assert failed.error.field == "engine" and 1 <= len(failed.token_ids) < 100
    results = [await asyncio.wait_for(h.result(), timeout=60) for h in handles]
    assert [r.finish_reason for r in results] == ["length"] * len(NEIGHBOURS)
    assert [r.token_ids for r in results] == alone
    assert "engine step failed" not in caplog.text
    assert engine._thread.is_alive()
    assert (await run(engine, neighbour(1))).token_ids == alone[1]  # and it serves on


def test_the_sampler_holds_its_bounds_with_large_logits():
    """Real models' logits reach tens: at the smallest temperature and top_p the sampler
    still draws the top token (an unshifted logit / temperature overflows float32 to inf)."""
    logits = torch.tensor([[30.0, 29.5, -40.0, 0.0], [-1.0, 2.0, 1.0, 0.5]])
    for sampling in (
        SamplingParams(temperature=MIN_POSITIVE_SETTING),
        SamplingParams(temperature=1.0, top_p=MIN_POSITIVE_SETTING),
        SamplingParams(temperature=MIN_POSITIVE_SETTING, repetition_penalty=MIN_REPETITION_PENALTY),
    ):
        generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
        tokens = sample_next_tokens(logits, [sampling, sampling], generators, [[2], [0]], [[], []])
        assert tokens.tolist() == [0, 1], sampling


# -- finding 2: an adapter a waiting request needs is never lost ---------------------------

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def thrash_engine(tmp_path, *, adapters: int, cached: int, on_adapter_event=None, **settings):
    """An engine whose composed-adapter cache holds `cached` of the store's `adapters`
    (all r=8 on every linear module, so all of one size). Returns (engine, store, bytes of one)."""
    model = tiny_llama(seed=7)
    store = SQLiteAdapterStore(tmp_path / "thrash.db")
    for i in range(adapters):
        store.put(TENANT, f"ad{i}", random_adapter(model, seed=300 + i, targets=ALL_LINEAR, r=8))
    one = composed_nbytes(store.get(TENANT, "ad0")[1].config, torch.float32)
    settings = Settings(max_lora_rank=8, max_model_len=128, adapter_cache_bytes=cached * one, **settings)
    return engine_over(model, byte_tokenizer(), store, settings, on_adapter_event=on_adapter_event), store, one


async def test_adapters_evicted_while_their_requests_wait_are_still_served(tmp_path):
    """The batch is full of base rows, so two adapter requests wait; the cache holds one of
    their adapters, so the second load evicted the first (before: that request waited
    'loading' forever). Now the second is composed in turn, once the first is admitted."""
    engine, store, _ = thrash_engine(tmp_path, adapters=2, cached=1, max_batch_size=2, max_adapter_slots=2)
    try:
        base = [await engine.submit(greedy(p, n=80, ignore_eos=True)) for p in prompts(2, seed=31)]
        for handle in base:
            await anext(aiter(handle))
        waiting = [await engine.submit(greedy(p, f"ad{i}", n=5)) for i, p in enumerate(prompts(2, seed=32))]
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in [*base, *waiting])), timeout=60)
        assert all(r.error is None and r.token_ids for r in results)
    finally:
        engine.shutdown()
        store.close()


async def test_an_adapter_evicted_between_resolve_and_queueing_is_loaded_again(tmp_path, monkeypatch):
    """A hook evicts the adapter right after the request's resolve, before the engine sees
    the request: it is loaded again (before: the request waited 'loading' forever)."""
    engine, store, _ = thrash_engine(tmp_path, adapters=2, cached=1, max_batch_size=4, max_adapter_slots=4)
    manager = engine.adapters
    resolve = manager.resolve

    def resolve_then_evict(ref):
        key = resolve(ref)  # cached: the request before used it
        resolve(AdapterRef(TENANT, "ad1"))  # its load evicts `key`: the cache holds one
        while key in manager._cache:
            time.sleep(0.001)
        return key

    try:
        p = prompts(1, seed=33)[0]
        expected = (await run(engine, greedy(p, "ad0", n=10))).token_ids
        monkeypatch.setattr(manager, "resolve", resolve_then_evict)
        result = await asyncio.wait_for(run(engine, greedy(p, "ad0", n=10)), timeout=30)
        assert result.error is None and result.token_ids == expected
    finally:
        engine.shutdown()
        store.close()


async def test_adapter_cache_thrash_every_request_finishes_and_the_cache_stays_bounded(tmp_path):
    """The review's repro at its counts, on the tiny model (r=8): 32 base rows run while
    31 requests for 31 distinct all-linear adapters arrive, 3 of which fit in the cache.
    Every request finishes, in bounded time, and the composed adapters never take more than
    the cache's bytes plus one adapter (the one just composed)."""
    adapters = 31
    events = collections.Counter()
    engine, store, one = thrash_engine(
        tmp_path,
        adapters=adapters,
        cached=3,
        max_batch_size=40,
        max_adapter_slots=8,
        on_adapter_event=lambda kind, value: events.update({kind: value}),
    )
    manager = engine.adapters
    peak = 0
    insert = manager._insert

    def watch(key, item):
        nonlocal peak
        insert(key, item)
        peak = max(peak, manager.cached_bytes)

    manager._insert = watch
    try:
        base = [await engine.submit(greedy(p, n=80, ignore_eos=True)) for p in prompts(32, seed=34)]
        for handle in base:
            await anext(aiter(handle))
        start = time.monotonic()

        async def timed(i, p):
            result = await run(engine, greedy(p, f"ad{i}", n=8, ignore_eos=True))
            return result, time.monotonic() - start

        outcomes = await asyncio.wait_for(
            asyncio.gather(*(timed(i, p) for i, p in enumerate(prompts(adapters, seed=35)))), timeout=60
        )
        assert all(r.error is None and len(r.token_ids) == 8 for r, _ in outcomes)
        assert all(r.finish_reason == "length" for r in await asyncio.gather(*(h.result() for h in base)))
        latency = max(t for _, t in outcomes)
        print(f"thrash: {adapters} adapter requests, all finished; max latency {latency:.2f} s; {dict(events)}")
        assert events["eviction"] >= adapters - 3  # the cache did thrash
        assert peak <= 3 * one + one
        assert not manager._wanted and not manager._fetched  # nothing left waiting
    finally:
        engine.shutdown()
        store.close()


def test_the_sampler_gives_no_token_to_a_row_without_a_distribution_only():
    """A row whose logits hold a NaN (greedy or sampled) gets NO_TOKEN, the others their
    usual token, and the broken row's generator does not advance."""
    logits = torch.tensor([[0.0, 4.0, 1.0, 2.0]] * 4)
    logits[1, 2] = logits[3, 0] = float("nan")
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1e-3), SamplingParams(temperature=1.0)]
    generators = [None, None, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    tokens = sample_next_tokens(logits, params, generators, [[]] * 4, [[]] * 4)
    assert tokens.tolist() == [1, NO_TOKEN, 1, NO_TOKEN]
    assert torch.equal(generators[3].get_state(), torch.Generator().manual_seed(1).get_state())


async def test_adapters_larger_than_the_whole_cache_are_served_in_turns(tmp_path):
    """A cache smaller than one adapter: each waiting request's adapter is composed alone,
    in turn, and every request finishes."""
    engine, store, one = thrash_engine(tmp_path, adapters=4, cached=0, max_batch_size=4, max_adapter_slots=4)
    try:
        ps = prompts(4, seed=36)
        results = await asyncio.wait_for(
            asyncio.gather(*(run(engine, greedy(p, f"ad{i}", n=6, ignore_eos=True)) for i, p in enumerate(ps))), 30
        )
        assert all(r.error is None and len(r.token_ids) == 6 for r in results)
        assert engine.adapters.cached_bytes <= one
    finally:
        engine.shutdown()
        store.close()


# -- an adapter whose numbers overflow harms only its own requests --------------------------------
# Found by a hostile review: a finite adapter with a huge bank (accepted at upload) overflows in
# its own rows, and that inf/NaN reached other tenants' rows through memory they share with it.


def overflowing_engine(tmp_path, targets: tuple[str, ...], bank_scale: float):
    """A fresh engine whose store also holds `boom`, an adapter on `targets` with a bank of
    about `bank_scale` / 2 (finite, but its products overflow float32)."""
    engine, store = engine_with_adapters(
        tmp_path / "a.db", count=2, first_seed=100, max_batch_size=8, max_queue=32, max_adapter_slots=4
    )
    store.put(TENANT, "boom", random_adapter(tiny_llama(seed=7), seed=9, targets=targets, bank_scale=bank_scale))
    return engine, store


def long_prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


async def test_an_overflowing_adapter_leaves_no_nan_in_the_rows_others_reuse(tmp_path):
    """Its keys and values are inf/NaN in the rows its requests held. A later request in
    such a row attends (masked) over positions past its own length, up to the longest row's:
    weight 0 times NaN is NaN, so before rows were zeroed on release, a short base request
    beside a long one failed after the adapter's tenant had come and gone."""
    engine, store = overflowing_engine(tmp_path, ("k_proj", "v_proj"), bank_scale=2e30)
    try:
        short = greedy(long_prompt(1, 5), n=10, ignore_eos=True)
        expected = (await run(engine, short)).token_ids
        poisoned = await asyncio.gather(*(run(engine, greedy(long_prompt(10 + i, 40), "boom", n=1)) for i in range(8)))
        assert all(r.finish_reason == "error" for r in poisoned)  # its own requests fail, alone
        # The long request runs first: prefilled together, the short one would have been
        # padded to its width, overwriting the stale positions.
        long = await engine.submit(greedy(long_prompt(2, 60), n=30, ignore_eos=True))
        async for _ in long:
            break
        again = await run(engine, greedy(long_prompt(1, 5), n=10, ignore_eos=True))
        assert (await long.result()).finish_reason == "length"
        assert again.finish_reason == "length" and again.token_ids == expected
    finally:
        engine.shutdown()
        store.close()


async def test_a_base_row_is_untouched_by_the_adapter_left_in_slot_0(tmp_path):
    """Base-only rows share a forward with adapter rows; they used to go through slot 0's
    matrices and be multiplied by 0, and inf * 0 is NaN. `boom` (A x overflows) is the first
    adapter of a fresh engine, so it lands in slot 0 and stays there after its request."""
    engine, store = overflowing_engine(tmp_path, ("q_proj",), bank_scale=3e38)
    try:
        base = greedy(long_prompt(3, 12), n=30, ignore_eos=True)
        expected = (await run(engine, base)).token_ids
        await run(engine, greedy(long_prompt(4, 12), "boom", n=2))
        beside, alone = await asyncio.gather(
            run(engine, greedy(long_prompt(5, 12), "ad1", n=30, ignore_eos=True)),
            run(engine, greedy(long_prompt(3, 12), n=30, ignore_eos=True)),
        )
        assert beside.finish_reason == "length"
        assert alone.finish_reason == "length" and alone.token_ids == expected
    finally:
        engine.shutdown()
        store.close()


async def test_an_adapter_whose_load_raises_fails_alone_and_loads_again_later(tmp_path, monkeypatch):
    """A store error nobody mapped (a RuntimeError from `get`) and a compose that raises end
    only the requests for that adapter (a 503-kind error), and its next request loads it
    again. Before, either ended the loader thread: every later load, any tenant's, waited
    forever."""
    engine, store, _ = thrash_engine(tmp_path, adapters=3, cached=3, max_batch_size=8, max_adapter_slots=4)
    broken_get, poisoned_bank = {"ad0"}, store.get(TENANT, "ad2")[1].bank_id
    get, compose_adapters = store.get, compose.compose_adapters

    def flaky_get(tenant, name):
        if name in broken_get:
            raise RuntimeError("a store failure nobody mapped")
        return get(tenant, name)

    def flaky_compose(adapters, **kw):
        if any(a.bank_id == poisoned_bank for a in adapters):
            raise RuntimeError("a compose failure")
        return compose_adapters(adapters, **kw)

    monkeypatch.setattr(store, "get", flaky_get)
    monkeypatch.setattr(compose, "compose_adapters", flaky_compose)
    p = prompts(1, seed=41)[0]
    try:
        failed = await asyncio.wait_for(run(engine, greedy(p, "ad0", n=5)), timeout=30)
        assert isinstance(failed.error, AdapterUnavailableError) and failed.error.kind == "unavailable"
        # ad1 and ad2 arrive together, so they are composed in one batch: ad2 fails alone.
        both = await asyncio.wait_for(
            asyncio.gather(run(engine, greedy(p, "ad1", n=5)), run(engine, greedy(p, "ad2", n=5))), timeout=30
        )
        assert both[0].error is None and len(both[0].token_ids) == 5
        assert isinstance(both[1].error, AdapterUnavailableError) and both[1].error.kind == "unavailable"
        broken_get.clear()
        poisoned_bank = None
        again = await asyncio.wait_for(
            asyncio.gather(run(engine, greedy(p, "ad0", n=5)), run(engine, greedy(p, "ad2", n=5))), timeout=30
        )
        assert all(r.error is None and len(r.token_ids) == 5 for r in again)
    finally:
        engine.shutdown()
        store.close()
