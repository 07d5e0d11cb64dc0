"""The clients people already use, unchanged, against a real `vbserve serve` process (the
tiny model, a SQLite store): LoRAX's own `lorax-client` (it posts to `/`, TGI's and
LoRAX's compatibility route) and the official `openai` package's handling of fields this
server does not implement. No field is silently ignored: each `lorax-client` parameter
is implemented, or a 400 naming it when set to anything but its default; an unknown field
is a 400 naming it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import lorax
import lorax.errors
import openai
import pytest

from tests.conftest import failing_forward_pass, serve_in_thread, tiny_llama
from tests.test_api import api_settings, chat_tokenizer, random_adapter
from tests.test_mixtures import peft_greedy, peft_mixture
from tests.test_replicas import MODEL_SEED, replica, wait_ready
from tests.test_structured import MAX_TOKENS, PERSON
from vbserve.app import create_app
from vbserve_store import encode_adapter
from vbserve_store.store import SQLiteAdapterStore

PROMPT = "Hello there, general"
ADAPTER = "support"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a `vbserve serve` process on the tiny model (with a chat template,
    for the chat routes) holding one adapter, ADAPTER."""
    folder = tmp_path_factory.mktemp("lorax-server")
    model_dir = folder / "model"
    tiny_llama(seed=MODEL_SEED).save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    with replica(model_dir, f"sqlite:///{folder / 'adapters.db'}", "unused", folder / "server.log") as server:
        wait_ready(server)
        blob = encode_adapter(random_adapter(tiny_llama(seed=MODEL_SEED), seed=1))
        r = httpx.put(
            f"{server.url}/v1/adapters/{ADAPTER}", content=blob, headers={"content-type": "application/octet-stream"}
        )
        assert r.status_code in (200, 201), r.text
        yield server.url


@pytest.fixture
def client(server: str) -> lorax.Client:
    return lorax.Client(server, timeout=60)


def refusal(exc: BaseException) -> dict:
    """The error body that lorax-client raised as its own exception."""
    body = exc.args[0]
    assert isinstance(body, dict), body
    return body


# -- lorax-client: generate, generate_stream, details ---------------------------------------


def test_generate_returns_text_and_details_the_client_parses(client: lorax.Client) -> None:
    response = client.generate(PROMPT, max_new_tokens=9)  # details=True is the client's default
    details = response.details
    assert details is not None
    assert details.generated_tokens == len(details.tokens) == 9
    assert details.finish_reason == "length"
    assert details.prompt_tokens == len(PROMPT.encode())  # the tiny model's tokenizer is byte-level
    assert details.prefill == []
    assert "".join(t.text for t in details.tokens) == response.generated_text
    assert all(t.logprob <= 0 and not t.special and t.alternative_tokens is None for t in details.tokens)


def test_generate_stream_sends_each_token_then_text_and_details_on_the_last(client: lorax.Client) -> None:
    events = list(client.generate_stream(PROMPT, max_new_tokens=7))
    assert len(events) == 7
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.details is not None
    assert last.details.generated_tokens == 7 and last.details.finish_reason == "length"
    assert last.details.prompt_tokens == len(PROMPT.encode())
    text = "".join(e.token.text for e in events)
    assert last.generated_text == text == client.generate(PROMPT, max_new_tokens=7).generated_text


def test_a_stream_without_details_still_carries_each_tokens_logprob(client: lorax.Client) -> None:
    """lorax-client's `Token.logprob` is required: a token without one failed to parse."""
    events = list(client.generate_stream(PROMPT, max_new_tokens=4, details=False))
    assert len(events) == 4 and all(e.token.logprob <= 0 for e in events)


def test_adapter_id_selects_the_adapter(client: lorax.Client) -> None:
    base = client.generate(PROMPT, max_new_tokens=12, details=False).generated_text
    adapted = client.generate(PROMPT, adapter_id=ADAPTER, max_new_tokens=12, details=False).generated_text
    assert adapted != base


def test_an_unknown_adapter_id_raises_the_clients_not_found_error(client: lorax.Client) -> None:
    with pytest.raises(lorax.errors.NotFoundError) as caught:
        client.generate(PROMPT, adapter_id="no-such-adapter", max_new_tokens=4)
    assert refusal(caught.value)["field"] == "parameters.adapter_id"
    with pytest.raises(lorax.errors.NotFoundError):
        list(client.generate_stream(PROMPT, adapter_id="no-such-adapter", max_new_tokens=4))


# -- lorax-client: the parameters this server implements ------------------------------------


def test_return_full_text_prepends_the_prompt(client: lorax.Client) -> None:
    plain = client.generate(PROMPT, max_new_tokens=6).generated_text
    assert client.generate(PROMPT, max_new_tokens=6, return_full_text=True).generated_text == PROMPT + plain
    last = list(client.generate_stream(PROMPT, max_new_tokens=6, return_full_text=True))[-1]
    assert last.generated_text == PROMPT + plain


def test_truncate_keeps_the_last_prompt_tokens(client: lorax.Client) -> None:
    truncated = client.generate(PROMPT, max_new_tokens=8, truncate=5)
    assert truncated.details is not None and truncated.details.prompt_tokens == 5
    assert truncated.generated_text == client.generate(PROMPT[-5:], max_new_tokens=8).generated_text
    assert truncated.generated_text != client.generate(PROMPT, max_new_tokens=8).generated_text


def test_return_k_alternatives_gives_each_tokens_most_likely_tokens(client: lorax.Client) -> None:
    response = client.generate(PROMPT, max_new_tokens=5, return_k_alternatives=3)
    assert response.details is not None
    for token in response.details.tokens:
        alternatives = token.alternative_tokens
        assert alternatives is not None and len(alternatives) == 3
        logprobs = [a.logprob for a in alternatives]
        assert logprobs == sorted(logprobs, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert alternatives[0].id == token.id and alternatives[0].logprob == pytest.approx(token.logprob)

    # lorax-client's generate_stream does not send the parameter; TGI's stream carries it.
    body = {"inputs": PROMPT, "stream": True, "parameters": {"max_new_tokens": 5, "return_k_alternatives": 2}}
    with httpx.stream("POST", f"{client.base_url}/", json=body, timeout=30) as r:
        events = [json.loads(line.removeprefix("data:")) for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 5 and all(len(e["token"]["alternative_tokens"]) == 2 for e in events)


def test_ignore_eos_token_generates_past_the_end_of_sequence_token(client: lorax.Client) -> None:
    """Near-uniform sampling (temperature 50) over the 256-token vocabulary ends on the
    tiny model's EOS (id 2) within 200 tokens for about half the seeds; the same seed with
    ignore_eos_token samples the same tokens and goes on past it."""
    sampling = {"do_sample": True, "temperature": 50.0, "max_new_tokens": 200}
    for seed in range(40):
        ended = client.generate(PROMPT, seed=seed, **sampling)
        assert ended.details is not None
        if ended.details.finish_reason == "eos_token":
            break
    else:
        pytest.fail("no seed of 40 ended on the EOS token")
    assert ended.details.tokens[-1].id == 2 and ended.details.tokens[-1].special
    ignored = client.generate(PROMPT, seed=seed, ignore_eos_token=True, **sampling)
    assert ignored.details is not None and ignored.details.finish_reason == "length"
    assert ignored.details.generated_tokens == 200 > ended.details.generated_tokens
    assert [t.id for t in ignored.details.tokens[: len(ended.details.tokens)]] == [t.id for t in ended.details.tokens]


def test_response_format_output_parses_and_validates_on_every_sample(client: lorax.Client) -> None:
    """lorax-client's ResponseFormat, through the same grammar path as OpenAI's: sampled
    outputs on the base model and the adapter, generated and streamed, each parses and
    validates; a schema xgrammar cannot use is a 400 naming it."""
    fmt = lorax.types.ResponseFormat(type="json_object", schema=PERSON)
    sampling = {"do_sample": True, "temperature": 1.0, "max_new_tokens": MAX_TOKENS, "response_format": fmt}
    samples = []
    for seed in range(8):
        adapter = ADAPTER if seed % 2 else None
        done = client.generate(PROMPT, adapter_id=adapter, seed=seed, **sampling)
        assert done.details is not None and done.details.finish_reason == "eos_token", done
        samples.append(done.generated_text)
    streamed = list(client.generate_stream(PROMPT, adapter_id=ADAPTER, seed=1, **sampling))
    assert streamed[-1].generated_text == samples[1]  # seeded: the same sample
    for text in samples:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(samples)) > 1
    with pytest.raises(lorax.errors.BadRequestError) as caught:
        client.generate(PROMPT, response_format={"type": "json_object", "schema": {"type": "nonsense"}})
    assert refusal(caught.value)["field"] == "parameters.response_format.schema"


def test_best_of_answers_the_likeliest_of_independent_samples(client: lorax.Client, server: str) -> None:
    """As TGI: best_of samples, the answer is the one whose tokens have the highest summed
    logprob, the others come in details.best_of_sequences. Seeded (raw HTTP: lorax-client
    refuses a seed with best_of), sample i is seeded seed + i and equals that seed's single
    sample."""
    response = client.generate(PROMPT, best_of=3, do_sample=True, max_new_tokens=10)
    details = response.details
    assert details is not None and details.best_of_sequences is not None and len(details.best_of_sequences) == 2
    sequences = [(response.generated_text, details.tokens)] + [
        (s.generated_text, s.tokens) for s in details.best_of_sequences
    ]
    for text, tokens in sequences:
        assert "".join(t.text for t in tokens) == text
    summed = [sum(t.logprob for t in tokens) for _, tokens in sequences]
    assert summed[0] == max(summed) and summed[1:] == sorted(summed[1:], reverse=True)

    body = {
        "inputs": PROMPT,
        "parameters": {"best_of": 3, "do_sample": True, "seed": 5, "max_new_tokens": 10, "details": True},
    }
    seeded = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    found = [(seeded["generated_text"], seeded["details"]["seed"])]
    found += [(s["generated_text"], s["seed"]) for s in seeded["details"]["best_of_sequences"]]
    assert sorted(seed for _, seed in found) == [5, 6, 7]
    for text, seed in found:
        assert client.generate(PROMPT, do_sample=True, seed=seed, max_new_tokens=10).generated_text == text


@pytest.mark.parametrize(
    ("route", "parameters"),
    [
        ("/generate", {"best_of": 2}),  # greedy: every sample the same
        ("/generate_stream", {"best_of": 2, "do_sample": True}),
        ("/generate", {"best_of": 0, "do_sample": True}),
        ("/generate", {"best_of": 1000, "do_sample": True}),  # above VBSERVE_MAX_N
    ],
)
def test_a_best_of_this_server_cannot_run_is_a_400_naming_it(server: str, route: str, parameters: dict) -> None:
    r = httpx.post(f"{server}{route}", json={"inputs": PROMPT, "parameters": parameters}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == "parameters.best_of"


# -- lorax-client: the parameters this server refuses ---------------------------------------

REFUSED = {
    "decoder_input_details": {"decoder_input_details": True},
    "typical_p": {"typical_p": 0.5},
    "watermark": {"watermark": True},
    "adapter_source": {"adapter_source": "hub"},
    "api_token": {"api_token": "hf_secret"},
}


@pytest.mark.parametrize("field", REFUSED)
def test_a_refused_parameter_is_a_400_naming_it(client: lorax.Client, field: str) -> None:
    with pytest.raises(lorax.errors.BadRequestError) as caught:
        client.generate(PROMPT, max_new_tokens=4, **REFUSED[field])
    body = refusal(caught.value)
    assert body["type"] == "invalid_request" and body["field"] == f"parameters.{field}", body


@pytest.mark.parametrize("route", ["/", "/generate", "/generate_stream"])
def test_unknown_fields_are_a_400_naming_them(server: str, route: str) -> None:
    cases = {
        "parameters.top_n_tokens": {"inputs": PROMPT, "parameters": {"top_n_tokens": 2}},
        "grammar": {"inputs": PROMPT, "grammar": {"type": "json"}},
    }
    for field, body in cases.items():
        r = httpx.post(f"{server}{route}", json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["field"] == field


def test_a_stream_flag_that_contradicts_the_route_is_a_400(server: str) -> None:
    for route, stream in (("/generate", True), ("/generate_stream", False)):
        r = httpx.post(f"{server}{route}", json={"inputs": PROMPT, "stream": stream}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["field"] == "stream", r.text


def test_truncate_below_one_is_a_400_naming_it(server: str) -> None:
    r = httpx.post(f"{server}/", json={"inputs": PROMPT, "parameters": {"truncate": 0}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["field"] == "parameters.truncate", r.text


# -- openai: unknown fields are refused, OpenAI's bookkeeping fields accepted ---------------


@pytest.fixture
def openai_client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_openai_unknown_field_is_a_400_naming_it(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=4, extra_body={"bogus": 1})
    assert caught.value.body["field"] == "bogus"
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model=ADAPTER, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body={"bogus": 1}
        )
    assert caught.value.body["field"] == "bogus"
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model=ADAPTER, messages=[{"role": "user", "content": "Hi", "name": "ann"}], max_tokens=4
        )
    assert caught.value.body["field"] == "messages.0.name"


def test_openai_bookkeeping_fields_are_accepted(openai_client: openai.OpenAI) -> None:
    bookkeeping = {"user": "u-1", "metadata": {"team": "a"}, "store": False, "service_tier": "auto"}
    plain = openai_client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=6, temperature=0)
    tagged = openai_client.completions.create(
        model=ADAPTER, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=bookkeeping
    )
    assert tagged.choices[0].text == plain.choices[0].text
    chat = {"model": ADAPTER, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
    plain_chat = openai_client.chat.completions.create(**chat)
    # The defaults of the fields this server does not implement are accepted too.
    tagged_chat = openai_client.chat.completions.create(
        **chat, response_format={"type": "text"}, tool_choice="none", **bookkeeping
    )
    assert tagged_chat.choices[0].message.content == plain_chat.choices[0].message.content


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        ("tool_choice", "auto"),
    ],
)
def test_openai_tools_on_a_template_without_tools_are_a_400_naming_them(
    openai_client: openai.OpenAI, field: str, value
) -> None:
    """This server's chat template renders no tools (tool calling: tests/test_tool_calls.py);
    a tool_choice other than "none" needs tools."""
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model=ADAPTER, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **{field: value}
        )
    assert caught.value.body["field"] == field


def test_a_failure_after_the_first_token_raises_the_clients_generation_error(tmp_path: Path) -> None:
    """Once streaming began the status line is sent: the failure travels as an event, with
    TGI's `error_type` beside our error body so lorax-client raises its GenerationError
    (not an UnknownError for "status 200"). The fault is injected in the model runner of
    an in-process server: the fourth forward pass (a decode step) raises."""
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    app = create_app(api_settings(), model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store)
    with serve_in_thread(app) as url, failing_forward_pass(app.state.services.engine.runner, 4):
        events = lorax.Client(url, timeout=60).generate_stream(PROMPT, max_new_tokens=8)
        assert next(events).token.logprob <= 0  # the first token arrived
        with pytest.raises(lorax.errors.GenerationError) as caught:
            list(events)
    store.close()
    assert refusal(caught.value)["type"] == "internal_error"


# -- per-request mixtures: openai's extra_body `adapters`, lorax-client's `merged_adapters` ----

SECOND = "billing"


@pytest.fixture(scope="module")
def mixtures(server: str) -> str:
    """The server, also holding SECOND (the rank of ADAPTER, so a linear merge takes both)."""
    blob = encode_adapter(random_adapter(tiny_llama(seed=MODEL_SEED), seed=2))
    r = httpx.put(f"{server}/v1/adapters/{SECOND}", content=blob, headers={"content-type": "application/octet-stream"})
    assert r.status_code in (200, 201), r.text
    return server


def peft_tokens(weights: list[float], combination: str, n: int, tmp_path: Path) -> list[int]:
    """PEFT's greedy tokens for PROMPT with `add_weighted_adapter` of ADAPTER and SECOND."""
    model = tiny_llama(seed=MODEL_SEED)
    adapters = {ADAPTER: random_adapter(model, seed=1), SECOND: random_adapter(model, seed=2)}
    oracle = peft_mixture(model, adapters, weights, combination, tmp_path)
    return peft_greedy(oracle, chat_tokenizer().encode(PROMPT), n)[0]


def test_lorax_merged_adapters_generate_what_peft_linear_merge_generates(
    client: lorax.Client, mixtures: str, tmp_path: Path
) -> None:
    merged = lorax.MergedAdapters(ids=[ADAPTER, SECOND], weights=[0.6, 0.8], merge_strategy="linear", density=1.0)
    out = client.generate(PROMPT, max_new_tokens=10, details=True, ignore_eos_token=True, merged_adapters=merged)
    assert out.details is not None
    assert [t.id for t in out.details.tokens] == peft_tokens([0.6, 0.8], "linear", 10, tmp_path)
    one = lorax.MergedAdapters(ids=[ADAPTER], weights=[1.0], density=1.0)
    assert (
        client.generate(PROMPT, max_new_tokens=10, merged_adapters=one).generated_text
        == client.generate(PROMPT, max_new_tokens=10, adapter_id=ADAPTER).generated_text
    )


def test_lorax_merged_adapters_refusals_name_the_field(client: lorax.Client, mixtures: str) -> None:
    ties = lorax.MergedAdapters(ids=[ADAPTER, SECOND], weights=[1, 1], merge_strategy="ties", density=0.5)
    with pytest.raises(lorax.errors.BadRequestError) as caught:
        client.generate(PROMPT, max_new_tokens=4, merged_adapters=ties)
    assert refusal(caught.value)["field"] == "parameters.merged_adapters.merge_strategy"
    unknown = lorax.MergedAdapters(ids=[ADAPTER, "nope"], weights=[1, 1], density=1.0)
    with pytest.raises(lorax.errors.NotFoundError) as caught:
        client.generate(PROMPT, max_new_tokens=4, merged_adapters=unknown)
    assert refusal(caught.value)["field"] == "parameters.merged_adapters.ids[1]"
    # What lorax-client itself would not send: ids and weights of different lengths, and
    # both an adapter_id and a merge.
    for parameters, field in (
        ({"merged_adapters": {"ids": [ADAPTER, SECOND], "weights": [1]}}, "parameters.merged_adapters.weights"),
        ({"adapter_id": ADAPTER, "merged_adapters": {"ids": [SECOND], "weights": [1]}}, "parameters.adapter_id"),
    ):
        r = httpx.post(f"{mixtures}/generate", json={"inputs": PROMPT, "parameters": parameters}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text


def test_openai_adapters_generate_what_peft_cat_merge_generates(
    openai_client: openai.OpenAI, mixtures: str, tmp_path: Path
) -> None:
    base = openai_client.models.list().data[0].id
    adapters = [{"name": ADAPTER, "weight": 0.7}, {"name": SECOND, "weight": -0.5}]
    out = openai_client.completions.create(
        model=base, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"adapters": adapters, "ignore_eos": True}
    )
    assert out.choices[0].text == chat_tokenizer().decode(peft_tokens([0.7, -0.5], "cat", 10, tmp_path))
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    mixed = openai_client.chat.completions.create(model=base, **chat, extra_body={"adapters": [{"name": ADAPTER}]})
    alone = openai_client.chat.completions.create(model=ADAPTER, **chat)
    assert mixed.choices[0].message.content == alone.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "model", "error", "field"),
    [
        ({"adapters": [{"name": ADAPTER}, {"name": "nope"}]}, None, openai.NotFoundError, "adapters[1].name"),
        (
            {"adapters": [{"name": ADAPTER}, {"name": SECOND, "weight": "x"}]},
            None,
            openai.BadRequestError,
            "adapters[1].weight",
        ),
        (
            {"adapters": [{"name": ADAPTER}, {"name": SECOND, "weight": 0}]},
            None,
            openai.BadRequestError,
            "adapters[1].weight",
        ),
        ({"adapters": [{"name": f"a{i}"} for i in range(9)]}, None, openai.BadRequestError, "adapters"),
        ({"adapters": [{"name": SECOND}]}, ADAPTER, openai.BadRequestError, "model"),
    ],
    ids=["unknown", "weight-type", "weight-zero", "too-many", "model-too"],
)
def test_openai_adapters_refusals_name_the_field(
    openai_client: openai.OpenAI, mixtures: str, extra: dict, model: str | None, error: type, field: str
) -> None:
    base = openai_client.models.list().data[0].id
    with pytest.raises(error) as caught:
        openai_client.completions.create(model=model or base, prompt=PROMPT, max_tokens=4, extra_body=extra)
    assert caught.value.body["field"] == field
