"""OpenAI generation parity on `/v1/completions` and `/v1/chat/completions` (issue #13):
`n`, presence/frequency penalties, `logit_bias`, vLLM's `min_p`, `min_tokens`,
`stop_token_ids`, `ignore_eos`, and `echo`. Each setting's effect through the API, each
refused value a 400 naming the field, and the official `openai` package against a real
server."""

from __future__ import annotations

import collections
import time

import httpx
import openai
import pytest

from tests.conftest import serve_in_thread, tiny_llama
from tests.test_api import BASE, api_settings, chat_tokenizer, error_of, sse_events
from tests.test_api import api as api  # the fixture
from vbserve.app import create_app
from vbserve.engine.contract import MAX_LOGIT_BIAS_ENTRIES
from vbserve_store.store import SQLiteAdapterStore

EOS = 2  # the tiny model's eos_token_id
HI = [{"role": "user", "content": "Hi there"}]
SAMPLED = {"temperature": 1.0, "seed": 5, "max_tokens": 8, "ignore_eos": True}
PATHS = {"/v1/completions": {"prompt": "Hello"}, "/v1/chat/completions": {"messages": HI}}


def texts(body: dict) -> list[str]:
    return [c["text"] if "text" in c else c["message"]["content"] for c in body["choices"]]


def streamed_texts(events: list) -> dict[int, str]:
    """Each choice's text, joined from a stream's chunks by their choice index."""
    joined: dict[int, str] = collections.defaultdict(str)
    for event in events[:-1]:
        for c in event["choices"]:
            joined[c["index"]] += c.get("text") or (c.get("delta") or {}).get("content") or ""
    return dict(joined)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),  # VBSERVE_MAX_N is 16
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"logit_bias": {"256": 1}}, "logit_bias"),  # the vocabulary has 256 tokens
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}}, "logit_bias"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 13, "max_tokens": 12}, "min_tokens"),
        ({"stop_token_ids": [256]}, "stop_token_ids"),
    ],
)
async def test_refused_values_are_400_naming_the_field(api, path, fields, field):
    r = await api.post(path, json={**PATHS[path], **fields})
    assert r.status_code == 400, r.text
    assert error_of(r)["field"] == field
    assert (await api.post(path, json={**PATHS[path], "max_tokens": 2})).status_code == 200  # serves on


async def test_echo_with_logprobs_is_refused_naming_echo(api):
    r = await api.post("/v1/completions", json={"prompt": "Hello", "echo": True, "logprobs": 2})
    assert r.status_code == 400 and error_of(r)["field"] == "echo"


@pytest.mark.parametrize("path", PATHS)
async def test_n_choices_are_independent_seeded_and_streamed_by_index(api, path):
    body = {**PATHS[path], **SAMPLED, "n": 3}
    r = await api.post(path, json=body)
    assert r.status_code == 200, r.text
    done = r.json()
    assert [c["index"] for c in done["choices"]] == [0, 1, 2]
    assert len(set(texts(done))) == 3
    assert done["usage"]["completion_tokens"] == 3 * 8  # summed; the prompt counted once
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + 24
    one = (await api.post(path, json={**PATHS[path], **SAMPLED})).json()
    assert done["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    # Choice i is the request seeded seed + i; the whole answer is reproducible.
    alone = [texts((await api.post(path, json={**body, "n": 1, "seed": 5 + i})).json())[0] for i in range(3)]
    assert alone == texts(done)
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events((await api.post(path, json=stream)).text)
    assert events[-1] == "[DONE]" and events[-2]["usage"] == done["usage"]
    assert streamed_texts(events) == dict(enumerate(texts(done)))
    finished = [c["index"] for e in events[:-1] for c in e["choices"] if c["finish_reason"] == "length"]
    assert sorted(finished) == [0, 1, 2]
    if path == "/v1/chat/completions":  # every choice opens with the role
        roles = [c["index"] for e in events[:3] for c in e["choices"] if c["delta"].get("role") == "assistant"]
        assert roles == [0, 1, 2]


@pytest.mark.parametrize("path", PATHS)
async def test_greedy_n_gives_identical_choices(api, path):
    done = (await api.post(path, json={**PATHS[path], "temperature": 0, "max_tokens": 6, "n": 4})).json()
    assert len(done["choices"]) == 4 and len(set(texts(done))) == 1


@pytest.mark.parametrize("path", PATHS)
async def test_logit_bias_penalties_and_vllm_extras_reach_the_sampler(api, path):
    tokenizer = api.app.state.services.tokenizer
    greedy = {**PATHS[path], "temperature": 0, "max_tokens": 12, "ignore_eos": True}

    async def ask(**fields) -> dict:
        r = await api.post(path, json={**greedy, **fields})
        assert r.status_code == 200, r.text
        return r.json()

    plain = texts(await ask())[0]
    assert texts(await ask(logit_bias={"42": 100}))[0] == tokenizer.decode([42]) * 12
    assert texts(await ask(temperature=1.0, seed=3, min_p=1.0))[0] == plain  # min_p 1: only the top token
    assert texts(await ask(presence_penalty=2.0))[0] != plain
    assert texts(await ask(frequency_penalty=2.0))[0] != plain
    # EOS forced by its bias: held back by min_tokens, ignored with ignore_eos.
    eos = {str(EOS): 100}
    early = await ask(logit_bias=eos, ignore_eos=False)
    assert early["usage"]["completion_tokens"] == 1 and early["choices"][0]["finish_reason"] == "stop"
    held = await ask(logit_bias=eos, ignore_eos=False, min_tokens=4)
    assert held["usage"]["completion_tokens"] == 5 and held["choices"][0]["finish_reason"] == "stop"
    ignored = await ask(logit_bias=eos, ignore_eos=True)
    assert ignored["usage"]["completion_tokens"] == 12 and ignored["choices"][0]["finish_reason"] == "length"
    stopped = await ask(logit_bias={"7": 100}, stop_token_ids=[7], min_tokens=2)
    assert stopped["usage"]["completion_tokens"] == 3 and stopped["choices"][0]["finish_reason"] == "stop"


async def test_echo_prepends_the_prompt(api):
    greedy = {"prompt": "Hello", "temperature": 0, "max_tokens": 6}
    plain = texts((await api.post("/v1/completions", json=greedy)).json())[0]
    echoed = (await api.post("/v1/completions", json={**greedy, "echo": True, "n": 2})).json()
    assert texts(echoed) == ["Hello" + plain] * 2
    assert echoed["usage"]["completion_tokens"] == 12
    events = sse_events((await api.post("/v1/completions", json={**greedy, "echo": True, "stream": True})).text)
    assert streamed_texts(events) == {0: "Hello" + plain}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = SQLiteAdapterStore(tmp_path_factory.mktemp("store") / "adapters.db")
    app = create_app(api_settings(), model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store)
    with serve_in_thread(app) as url:
        yield url, app
    store.close()


def test_openai_package(server):
    url, app = server
    token = app.state.services.tokenizer.decode([42])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    three = client.completions.create(model=BASE, prompt="Hello", n=3, temperature=1.0, seed=4, max_tokens=8)
    assert [c.index for c in three.choices] == [0, 1, 2] and len({c.text for c in three.choices}) == 3
    chat = client.chat.completions.create(model=BASE, messages=HI, n=3, temperature=1.0, seed=4, max_tokens=8)
    stream = client.chat.completions.create(
        model=BASE, messages=HI, n=3, temperature=1.0, seed=4, max_tokens=8, stream=True
    )
    joined = collections.defaultdict(str)
    for chunk in stream:
        for c in chunk.choices:
            joined[c.index] += c.delta.content or ""
    assert dict(joined) == {c.index: c.message.content for c in chat.choices}

    biased = client.completions.create(model=BASE, prompt="Hello", logit_bias={"42": 100}, max_tokens=5)
    assert biased.choices[0].text == token * 5
    plain = client.chat.completions.create(
        model=BASE, messages=HI, temperature=0, max_tokens=8, extra_body={"ignore_eos": True}
    )
    extras = client.chat.completions.create(
        model=BASE,
        messages=HI,
        temperature=1.0,
        max_tokens=8,
        logit_bias={"7": 100, str(EOS): 50},
        extra_body={"min_p": 1.0, "min_tokens": 3, "stop_token_ids": [7], "ignore_eos": True},
    )
    # Token 7 ends it (a stop token), but only after 3 tokens; the biased EOS is ignored.
    assert extras.usage.completion_tokens == 4 and extras.choices[0].finish_reason == "stop"
    top_only = client.chat.completions.create(
        model=BASE, messages=HI, temperature=1.0, max_tokens=8, extra_body={"min_p": 1.0, "ignore_eos": True}
    )
    assert top_only.choices[0].message.content == plain.choices[0].message.content

    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=BASE, prompt="Hello", logit_bias={"42": 101})
    assert refused.value.response.json()["error"]["field"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=BASE, prompt="Hello", n=17)
    assert refused.value.response.json()["error"]["field"] == "n"


def test_n_counts_towards_the_tenants_concurrent_generations(tmp_path):
    """Each choice is a generation (a batch row): a tenant limited to 3 at once gets n=3,
    not n=4 (a 400: it can never run), and nothing beside a running n=2 but one more."""
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    settings = api_settings(tenant_max_concurrent_generations=3)
    app = create_app(settings, model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store)
    short = {"prompt": "Hi", "max_tokens": 2}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        generations = app.state.services.generations
        r = client.post("/v1/completions", json={**short, "n": 4})
        assert r.status_code == 400 and error_of(r)["field"] == "n"
        assert len(client.post("/v1/completions", json={**short, "n": 3}).json()["choices"]) == 3
        long = {"prompt": "Go on", "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True, "n": 2}
        with client.stream("POST", "/v1/completions", json=long) as streaming:
            lines = streaming.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # both choices run
            assert generations.active("default") == 2
            busy = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "n": 2})
            assert busy.status_code == 429 and error_of(busy)["field"] == "n"
            assert client.post("/v1/completions", json={**short, "n": 1}).status_code == 200
        deadline = time.monotonic() + 10
        while generations.active("default"):  # the abandoned stream gives its 2 back
            assert time.monotonic() < deadline
            time.sleep(0.01)
    store.close()
