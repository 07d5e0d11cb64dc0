"""OpenAI's and vLLM's sampling settings in the engine (issue #13): each one's effect on the
tiny random Llama, and `n` samples of one request."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.conftest import byte_tokenizer, engine_over, tiny_llama
from tests.test_engine import greedy, prompts, run
from vbserve.engine import GenerationRequest, InvalidRequestError, OverloadedError, SamplingParams
from vbserve.engine.sampling import sample_next_tokens
from vbserve.settings import Settings

EOS = 2  # LlamaConfig's default eos_token_id, which the tiny model's generation config keeps
MAX_N = 4


@pytest.fixture(scope="module")
def engine():
    settings = Settings(max_batch_size=16, max_queue=8, max_model_len=128, max_n=MAX_N)
    engine = engine_over(tiny_llama(seed=7), byte_tokenizer(), None, settings)
    assert engine.base_model.eos_ids == {EOS}
    yield engine
    engine.shutdown()


def sampled(prompt: list[int], seed: int, n: int = 48, **kw) -> GenerationRequest:
    return greedy(prompt, n=n, temperature=1.0, seed=seed, ignore_eos=True, **kw)


def repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


async def test_logit_bias_forces_and_bans_tokens(engine):
    p = prompts(1, seed=3)[0]
    plain = (await run(engine, greedy(p, n=16, ignore_eos=True))).token_ids
    forced = await run(engine, sampled(p, seed=1, n=16, logit_bias={42: 100.0}))
    assert forced.token_ids == [42] * 16
    banned = await run(engine, greedy(p, n=16, ignore_eos=True, logit_bias=dict.fromkeys(plain, -100.0)))
    assert not set(banned.token_ids) & set(plain), (plain, banned.token_ids)


async def test_presence_and_frequency_penalties_reduce_repeats(engine):
    p = prompts(1, seed=3)[0]
    plain = (await run(engine, greedy(p, n=48, ignore_eos=True))).token_ids
    assert repeats(plain) > 10  # the tiny model loops when greedy
    for penalty in ("presence_penalty", "frequency_penalty"):
        penalized = (await run(engine, greedy(p, n=48, ignore_eos=True, **{penalty: 2.0}))).token_ids
        assert repeats(penalized) < repeats(plain) // 4, penalty
    # Sampled with the same seeds: the penalty's only difference is fewer repeats.
    ps = prompts(8, seed=4)
    unpenalized = [repeats((await run(engine, sampled(q, seed=i))).token_ids) for i, q in enumerate(ps)]
    penalized = [
        repeats((await run(engine, sampled(q, seed=i, frequency_penalty=2.0))).token_ids) for i, q in enumerate(ps)
    ]
    assert sum(penalized) < sum(unpenalized) / 2, (penalized, unpenalized)


def test_penalties_count_generated_tokens_only():
    """OpenAI's presence and frequency penalties ignore the prompt (the repetition penalty
    does not); a negative penalty favours tokens already generated."""
    logits = torch.tensor([[1.0, 0.9, 0.0, 0.0]])
    params = [SamplingParams(presence_penalty=2.0)]
    assert sample_next_tokens(logits, params, [None], [[0]], [[]]).tolist() == [0]
    assert sample_next_tokens(logits, params, [None], [[]], [[0]]).tolist() == [1]
    assert sample_next_tokens(logits, [SamplingParams(repetition_penalty=10.0)], [None], [[0]], [[]]).tolist() == [1]
    params = [SamplingParams(frequency_penalty=0.06)]
    assert sample_next_tokens(logits, params, [None], [[]], [[0]]).tolist() == [0]  # 1 - 0.06 > 0.9
    assert sample_next_tokens(logits, params, [None], [[]], [[0, 0]]).tolist() == [1]  # 1 - 0.12 < 0.9
    params = [SamplingParams(frequency_penalty=-2.0)]
    assert sample_next_tokens(logits, params, [None], [[]], [[3]]).tolist() == [3]


async def test_min_tokens_delays_eos_and_stop_tokens(engine):
    p = prompts(1, seed=5)[0]
    eager = await run(engine, greedy(p, n=20, logit_bias={EOS: 100.0}))
    assert eager.token_ids == [EOS] and eager.finish_reason == "stop"
    held = await run(engine, greedy(p, n=20, logit_bias={EOS: 100.0}, min_tokens=5))
    assert len(held.token_ids) == 6 and held.token_ids[-1] == EOS and EOS not in held.token_ids[:5]
    assert held.finish_reason == "stop"
    stopped = await run(engine, sampled(p, seed=0, n=20, stop_token_ids=[7], logit_bias={7: 100.0}, min_tokens=3))
    assert len(stopped.token_ids) == 4 and stopped.token_ids[-1] == 7 and stopped.finish_reason == "stop"


async def test_min_p_of_one_keeps_only_the_top_token(engine):
    p = prompts(1, seed=6)[0]
    top = (await run(engine, greedy(p, n=24, ignore_eos=True))).token_ids
    assert (await run(engine, sampled(p, seed=9, n=24, min_p=1.0))).token_ids == top
    assert (await run(engine, sampled(p, seed=9, n=24))).token_ids != top  # without it, it samples


async def test_n_samples_are_independent_batched_and_seeded(engine):
    p = prompts(1, seed=7)[0]

    async def samples(request: GenerationRequest, n: int) -> list[list[int]]:
        handles = await engine.submit_n(request, n)
        return [r.token_ids for r in await asyncio.gather(*(h.result() for h in handles))]

    three = await samples(sampled(p, seed=11, n=16), 3)
    assert len({tuple(t) for t in three}) == 3
    assert await samples(sampled(p, seed=11, n=16), 3) == three  # reproducible
    # Sample i is seeded seed + i (vLLM's derivation): the same tokens as that seed alone.
    assert [(await run(engine, sampled(p, seed=11 + i, n=16))).token_ids for i in range(3)] == three
    # Greedy: n identical outputs, as OpenAI gives.
    assert len({tuple(t) for t in await samples(greedy(p, n=16, ignore_eos=True), 3)}) == 1


async def test_n_is_bounded_and_queued_all_or_nothing(engine):
    p = prompts(1, seed=8)[0]
    for n in (0, MAX_N + 1, True):
        with pytest.raises(InvalidRequestError) as refused:
            await engine.submit_n(greedy(p), n)
        assert refused.value.field == "n"
    # A queue with room for fewer than n takes none of them. Every row busy (16 long
    # requests, about 0.3 s), then 6 of the queue's 8 places taken:
    running = []
    while len(running) < engine.max_batch_size:
        running += await engine.submit_n(greedy(p, n=110, ignore_eos=True), MAX_N)
        while engine.queue_length:
            await asyncio.sleep(0.001)
    waiting = await engine.submit_n(greedy(p, n=4), MAX_N) + await engine.submit_n(greedy(p, n=4), 2)
    assert engine.queue_length == 6
    with pytest.raises(OverloadedError):
        await engine.submit_n(greedy(p), 3)
    assert engine.queue_length == 6
    for handle in running:
        handle.cancel()
    results = await asyncio.gather(*(h.result() for h in running + waiting))
    assert [r.finish_reason for r in results[len(running) :]] == ["length"] * 6
