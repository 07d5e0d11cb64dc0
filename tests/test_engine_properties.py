"""Property: whatever sampling values a request carries, no other request is affected.

Hypothesis draws batches of requests with random sampling values within and at the edges
of `SamplingParams.validate`'s bounds (with and without adapters, 1 to 3 samples each: `n`,
issue #13's settings included), beside fixed greedy
requests, plus values just outside the bounds, which must be refused at submit naming the
field. The greedy requests' tokens must equal their solo run, every valid request must
finish without error, and nothing may escape the engine loop (issue #12)."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_engine import engine_with_adapters, greedy, prompts
from vbserve.engine import GenerationRequest, InvalidRequestError, SamplingParams
from vbserve.engine.contract import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_PRESENCE_FREQUENCY_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MAX_TOP_LOGPROBS,
    MIN_POSITIVE_SETTING,
    MIN_REPETITION_PENALTY,
)

VOCAB = 256
ADAPTERS = [None, "ad0", "ad1", "ad2"]
FIXED = [(None, 0), ("ad0", 1), ("ad1", 2)]  # the greedy requests beside: adapter, prompt
GREEDY_TOKENS = 24


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine, store = engine_with_adapters(
        tmp_path_factory.mktemp("props") / "a.db",
        count=3,
        first_seed=500,
        max_batch_size=12,
        max_queue=32,
        max_adapter_slots=4,
    )
    yield engine
    engine.shutdown()
    store.close()


def fixed_request(i: int) -> GenerationRequest:
    adapter, prompt = FIXED[i]
    return greedy(prompts(3, seed=40)[prompt], adapter, n=GREEDY_TOKENS, ignore_eos=True)


def edges_and_between(low: float, high: float) -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([low, high]), st.floats(low, high))


# Every setting but max_new_tokens and min_tokens (bounded by it): valid values, edges included.
SAMPLING_VALUES = dict(
    temperature=st.one_of(st.just(0.0), edges_and_between(MIN_POSITIVE_SETTING, MAX_TEMPERATURE)),
    top_p=edges_and_between(MIN_POSITIVE_SETTING, 1.0),
    top_k=st.one_of(st.sampled_from([0, 1, VOCAB]), st.integers(0, VOCAB)),
    repetition_penalty=edges_and_between(MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    stop=st.lists(st.text(min_size=1, max_size=3), max_size=2),
    ignore_eos=st.booleans(),
    logprobs=st.booleans(),
    top_logprobs=st.integers(0, MAX_TOP_LOGPROBS),
    stop_token_ids=st.lists(st.integers(0, VOCAB - 1), max_size=3),
    presence_penalty=edges_and_between(-MAX_PRESENCE_FREQUENCY_PENALTY, MAX_PRESENCE_FREQUENCY_PENALTY),
    frequency_penalty=edges_and_between(-MAX_PRESENCE_FREQUENCY_PENALTY, MAX_PRESENCE_FREQUENCY_PENALTY),
    logit_bias=st.dictionaries(
        st.integers(0, VOCAB - 1), edges_and_between(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS), max_size=MAX_LOGIT_BIAS_ENTRIES
    ),
    min_p=edges_and_between(0.0, 1.0),
)


@st.composite
def valid_sampling(draw: st.DrawFn) -> SamplingParams:
    max_new_tokens = draw(st.integers(1, 16))
    return draw(
        st.builds(
            SamplingParams,
            max_new_tokens=st.just(max_new_tokens),
            min_tokens=st.integers(0, max_new_tokens),
            **SAMPLING_VALUES,
        )
    )


# (field, a value just outside its bounds)
just_outside = st.sampled_from(
    [
        ("temperature", MIN_POSITIVE_SETTING / 2),
        ("temperature", 1e-50),
        ("temperature", 1e-300),
        ("temperature", math.nextafter(MAX_TEMPERATURE, math.inf)),
        ("top_p", MIN_POSITIVE_SETTING / 2),
        ("top_p", 1e-300),
        ("top_p", math.nextafter(1.0, math.inf)),
        ("top_k", VOCAB + 1),
        ("top_k", 10**30),
        ("top_k", -1),
        ("repetition_penalty", math.nextafter(MIN_REPETITION_PENALTY, 0)),
        ("repetition_penalty", 1e-50),
        ("repetition_penalty", math.nextafter(MAX_REPETITION_PENALTY, math.inf)),
        ("presence_penalty", math.nextafter(MAX_PRESENCE_FREQUENCY_PENALTY, math.inf)),
        ("presence_penalty", -math.inf),
        ("frequency_penalty", math.nextafter(-MAX_PRESENCE_FREQUENCY_PENALTY, -math.inf)),
        ("frequency_penalty", math.nan),
        ("logit_bias", {VOCAB: 1.0}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {0: math.nextafter(MAX_LOGIT_BIAS, math.inf)}),
        ("logit_bias", {0: -math.inf}),
        ("logit_bias", dict.fromkeys(range(MAX_LOGIT_BIAS_ENTRIES + 1), 1.0)),
        ("min_p", math.nextafter(1.0, math.inf)),
        ("min_p", -MIN_POSITIVE_SETTING),
        ("min_tokens", 21),  # the refused request asks for 20 tokens
        ("min_tokens", -1),
    ]
)


@pytest.fixture(scope="module")
def solo(engine) -> list[list[int]]:
    async def alone() -> list[list[int]]:
        return [(await (await engine.submit(fixed_request(i))).result()).token_ids for i in range(len(FIXED))]

    return asyncio.run(alone())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.lists(st.tuples(st.sampled_from(ADAPTERS), valid_sampling(), st.integers(1, 3)), min_size=1, max_size=6),
    bad=st.one_of(st.none(), st.tuples(st.sampled_from(ADAPTERS), just_outside)),
)
def test_random_sampling_values_never_affect_another_request(engine, solo, caplog, batch, bad):
    caplog.clear()
    caplog.set_level(logging.ERROR, logger="vbserve.engine")
    ps = prompts(len(batch), seed=41)

    async def scenario() -> None:
        fixed = [await engine.submit(fixed_request(i)) for i in range(len(FIXED))]
        drawn = [  # n samples of each drawn request (OpenAI's `n`), one row each
            handle
            for p, (adapter, sampling, n) in zip(ps, batch, strict=True)
            for handle in await engine.submit_n(GenerationRequest(p, sampling, greedy(p, adapter).adapter), n)
        ]
        if bad is not None:
            adapter, (field, value) = bad
            with pytest.raises(InvalidRequestError) as refused:
                await engine.submit(greedy(ps[0], adapter, **{"temperature": 1.0, field: value}))
            assert refused.value.field == field
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in [*fixed, *drawn])), timeout=60)
        assert [r.token_ids for r in results[: len(FIXED)]] == solo
        settings = [sampling for _, sampling, n in batch for _ in range(n)]
        for result, sampling in zip(results[len(FIXED) :], settings, strict=True):
            assert result.error is None and result.finish_reason in ("length", "stop"), result
            assert 1 <= len(result.token_ids) <= sampling.max_new_tokens
            if not sampling.stop:  # min_tokens holds back EOS and stop_token_ids, not stop strings
                assert len(result.token_ids) >= sampling.min_tokens

    asyncio.run(scenario())
    assert engine._thread.is_alive()
    assert not caplog.records, caplog.text  # nothing failed a step, a batch or a row
