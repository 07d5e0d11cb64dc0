"""Structured generation (`response_format`, issue #13): the engine's grammar masks (a
constrained row beside unconstrained ones and other adapters, failures that end one request
alone, compile bounds), the OpenAI routes, and the official `openai` package against a real
`vbserve serve` process with adapters in the batch, every sampled output validated."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import tiny_llama
from tests.test_api import api as api  # the fixture
from tests.test_api import chat_tokenizer, error_of, random_adapter, sse_events
from tests.test_engine import TENANT, engine_with_adapters
from tests.test_replicas import MODEL_SEED, replica, wait_ready
from vbserve.engine import AdapterRef, GenerationRequest, InvalidRequestError, ResponseFormat, SamplingParams
from vbserve.engine.grammar import Grammars
from vbserve_store import encode_adapter

# Bounded in every dimension, so each sample ends (its grammar then allows only EOS) inside
# MAX_TOKENS: at most 86 characters, one token each for the byte tokenizer.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{0,4}$"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "active", "tags"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
MAX_TOKENS = 100
HI = [{"role": "user", "content": "Hi there"}]


def person(schema: dict = PERSON) -> ResponseFormat:
    return ResponseFormat(schema, strict=True)


def constrained_engine(tmp_path):
    """The tiny model (EOS 2) with adapters ad0 and ad1; returns (engine, store, ad0)."""
    engine, store = engine_with_adapters(tmp_path / "a.db", count=2, first_seed=1)
    return engine, store, AdapterRef(TENANT, "ad0")


async def texts_of(engine, requests: list[GenerationRequest]) -> list[tuple[str, str]]:
    """Submit all at once (so they share batches), then each one's (finish_reason, text)."""
    handles = [await engine.submit(r) for r in requests]
    results = [await h.result() for h in handles]
    return [(r.finish_reason, r.text) for r in results]


# -- the engine --------------------------------------------------------------------------


async def test_constrained_rows_share_a_batch_and_leave_the_others_untouched(tmp_path):
    """Constrained rows (sampled, on an adapter and on the base) beside unconstrained greedy
    rows: every constrained output validates, and each unconstrained row gives exactly what
    it gives alone (the masks touch only their own rows)."""
    engine, store, adapter = constrained_engine(tmp_path)
    try:
        prompt = list(b"Hello")

        def free(ref: AdapterRef | None) -> GenerationRequest:
            return GenerationRequest(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True), ref)

        alone = await texts_of(engine, [free(None), free(adapter)])
        constrained = [
            GenerationRequest(
                prompt,
                SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.0, seed=i),
                adapter if i % 2 else None,
                response_format=person(),
            )
            for i in range(6)
        ]
        mixed = await texts_of(engine, [*constrained[:3], free(None), free(adapter), *constrained[3:]])
        assert [mixed[3], mixed[4]] == alone
        for reason, text in mixed[:3] + mixed[5:]:
            assert reason == "stop", text
            jsonschema.validate(json.loads(text), PERSON)
    finally:
        engine.shutdown()
        store.close()


async def test_a_request_whose_grammar_allows_no_token_fails_alone(tmp_path):
    """The grammar allows only EOS once the enum's value is out; min_tokens masks EOS until
    5 tokens: no token is left, for a greedy and a sampled row. Each ends alone; its batch
    mates finish."""
    engine, store, adapter = constrained_engine(tmp_path)
    try:
        prompt = list(b"Hello")
        stuck = {"max_new_tokens": 20, "min_tokens": 5}
        results = await texts_of(
            engine,
            [
                GenerationRequest(prompt, SamplingParams(**stuck), response_format=person({"enum": ["a"]})),
                GenerationRequest(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True), adapter),
                GenerationRequest(
                    prompt, SamplingParams(**stuck, temperature=1.0), adapter, response_format=person({"enum": ["a"]})
                ),
                GenerationRequest(prompt, SamplingParams(max_new_tokens=MAX_TOKENS), response_format=person()),
            ],
        )
        assert [r for r, _ in results] == ["error", "length", "error", "stop"]
        jsonschema.validate(json.loads(results[3][1]), PERSON)
        # and it serves on
        assert (await texts_of(engine, [GenerationRequest(prompt, SamplingParams(max_new_tokens=3))]))[0][0]
    finally:
        engine.shutdown()
        store.close()


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "nonsense"}, "Unsupported type"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
        ({"type": "string", "pattern": "(("}, "Regex"),
        ({"$ref": "#/definitions/missing"}, "missing"),
    ],
)
async def test_a_schema_xgrammar_cannot_use_is_refused_naming_the_field(tmp_path, schema, why):
    engine, store, _adapter = constrained_engine(tmp_path)
    try:
        fmt = ResponseFormat(schema, field="response_format.json_schema.schema")
        with pytest.raises(InvalidRequestError) as refused:
            await engine.submit(GenerationRequest([1, 2], SamplingParams(max_new_tokens=4), response_format=fmt))
        assert refused.value.field == "response_format.json_schema.schema" and why in refused.value.message
        assert engine.queue_length == 0 and engine.running_count == 0
    finally:
        engine.shutdown()
        store.close()


def grammars(**limits) -> Grammars:
    bounds = {
        "max_schema_chars": 1 << 15,
        "max_schema_depth": 64,
        "compile_timeout_s": 10.0,
        "cache_bytes": 1 << 20,
        **limits,
    }
    return Grammars(chat_tokenizer(), 256, {2}, **bounds)


async def test_compiling_is_bounded_in_size_time_and_cache():
    with pytest.raises(InvalidRequestError, match="exceeds 100 characters") as refused:
        await grammars(max_schema_chars=100).compile(person())
    assert refused.value.field == "response_format"
    nested: dict = {"type": "string"}
    for _ in range(300):  # 2.8 s to compile; 6 KB
        nested = {"type": "array", "items": nested}
    with pytest.raises(InvalidRequestError, match="nests deeper than 64 levels"):
        await grammars().compile(person(nested))
    with pytest.raises(InvalidRequestError, match="to compile"):
        await grammars(compile_timeout_s=1e-6).compile(person())
    cached = grammars(cache_bytes=100_000)
    for size in range(1, 30):  # each a different schema text, so a different cache entry
        await cached.compile(person({"type": "string", "maxLength": size}))
    assert 0 < cached._compiler.get_cache_size_bytes() <= 100_000


# -- the OpenAI routes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/completions", {"prompt": "Hello"}), ("/v1/chat/completions", {"messages": HI})],
)
async def test_json_object_gives_a_json_object_streamed_or_not(api, path, body):
    request = {**body, "response_format": {"type": "json_object"}, "max_tokens": MAX_TOKENS, "seed": 3, "n": 3}
    done = await api.post(path, json=request)
    assert done.status_code == 200, done.text
    choices = done.json()["choices"]
    outputs = [c["text"] if "text" in c else c["message"]["content"] for c in choices]
    # A free JSON object may run past max_tokens; every one that ended is an object.
    ended = [json.loads(text) for text, c in zip(outputs, choices, strict=True) if c["finish_reason"] == "stop"]
    assert ended and all(isinstance(value, dict) for value in ended)
    streamed = sse_events((await api.post(path, json={**request, "stream": True})).text)
    joined = {}
    for event in streamed[:-1]:
        for c in event["choices"]:
            joined[c["index"]] = joined.get(c["index"], "") + (c.get("text") or c.get("delta", {}).get("content") or "")
    assert [joined[i] for i in range(3)] == outputs  # seeded: the same samples


@pytest.mark.parametrize(
    ("response_format", "field"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}, "schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "extra": 1}}, "extra"),
        ({"type": "json_object", "schema": {"type": "object"}}, "schema"),
    ],
)
async def test_a_bad_response_format_is_a_400_naming_it(api, response_format, field):
    r = await api.post("/v1/chat/completions", json={"messages": HI, "response_format": response_format})
    assert r.status_code == 400, r.text
    assert error_of(r)["field"].startswith("response_format") and error_of(r)["field"].endswith(field)
    assert (await api.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})).status_code == 200


@pytest.mark.parametrize("depth", [65, 500, 950])
async def test_a_deeply_nested_schema_is_a_400_naming_it(api, depth):
    """Nesting is what makes a schema slow to compile (see grammar.py), and near the JSON
    parser's own depth limit re-encoding the schema could exhaust Python's recursion."""
    schema = '{"type": "string"}'
    for _ in range(depth):
        schema = '{"type": "array", "items": ' + schema + "}"
    body = f'{{"messages": {json.dumps(HI)}, "response_format": {{"type": "json_schema", "json_schema": {{"name": "x", "schema": {schema}}}}}}}'
    r = await api.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert error_of(r)["field"] in ("response_format.json_schema.schema", "body")  # "body": past the parser's depth


# -- the openai package, a real server, adapters in the batch ----------------------------

ADAPTERS = ("support", "sales")


@contextmanager
def server_with_adapters(folder: Path, model, tokenizer, settings: dict[str, str]) -> Iterator[str]:
    """The URL of a `vbserve serve` process on `model` and `tokenizer` (saved in `folder`)
    holding ADAPTERS, random ones for the tiny model."""
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    settings = {"VBSERVE_MAX_BATCH_SIZE": "16", "VBSERVE_MAX_QUEUE": "128", **settings}
    with replica(model_dir, f"sqlite:///{folder / 'adapters.db'}", "unused", folder / "server.log", settings) as s:
        wait_ready(s)
        for seed, name in enumerate(ADAPTERS, start=1):
            blob = encode_adapter(random_adapter(tiny_llama(seed=MODEL_SEED), seed=seed))
            r = httpx.put(
                f"{s.url}/v1/adapters/{name}", content=blob, headers={"content-type": "application/octet-stream"}
            )
            assert r.status_code in (200, 201), r.text
        yield s.url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny model with a chat template."""
    folder = tmp_path_factory.mktemp("structured-server")
    with server_with_adapters(folder, tiny_llama(seed=MODEL_SEED), chat_tokenizer(), {}) as url:
        yield url


def test_openai_package_json_schema_validates_on_every_sample(server: str) -> None:
    """50 sampled json_schema outputs (temperature 1; base and both adapters, completions and
    chat) sent at once beside unconstrained requests, so they share batches: each parses and
    validates. json_object parses; a bad schema is a 400 naming it."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)
    base = next(m.id for m in client.models.list() if m.id not in ADAPTERS)
    models = (base, *ADAPTERS)

    def constrained(i: int) -> list[str]:
        common = {"model": models[i % 3], "temperature": 1.0, "max_tokens": MAX_TOKENS, "n": 5}
        if i % 2:
            chat = client.chat.completions.create(messages=HI, response_format=PERSON_FORMAT, **common)
            return [c.message.content for c in chat.choices]
        done = client.completions.create(prompt="Hello", extra_body={"response_format": PERSON_FORMAT}, **common)
        return [c.text for c in done.choices]

    def unconstrained(i: int) -> str:
        done = client.completions.create(model=models[i % 3], prompt="Hi", temperature=1.0, max_tokens=40)
        return done.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        free = [pool.submit(unconstrained, i) for i in range(6)]
        samples = [text for texts in pool.map(constrained, range(10)) for text in texts]
        assert all(isinstance(f.result(), str) for f in free)
    assert len(samples) == 50
    for text in samples:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(samples)) > 1  # sampled, not one answer

    anything = client.chat.completions.create(
        model=ADAPTERS[0], messages=HI, temperature=0, max_tokens=MAX_TOKENS, response_format={"type": "json_object"}
    )
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=base,
            messages=HI,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )
    assert refused.value.body["field"] == "response_format.json_schema.schema"
