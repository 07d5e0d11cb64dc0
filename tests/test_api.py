"""The HTTP API over a tiny random Llama, in process (httpx over ASGI, lifespan running):
OpenAI and LoRAX generation, adapter management, error bodies, metrics, readiness."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

import vbserve_store.adapter
import vbserve_store.codec
from tests.conftest import byte_tokenizer, random_peft_vblora, serve_in_thread, tiny_llama
from vbserve import cli
from vbserve.app import create_app
from vbserve.engine import AdapterRef, GenerationRequest, SamplingParams
from vbserve.settings import Settings
from vbserve.tenancy import SQLiteTenantRegistry
from vbserve_store import (
    AdapterConfig,
    ModuleSpec,
    VBLoRAAdapter,
    bank_id_of,
    decode_adapter,
    decode_bank,
    encode_adapter,
)
from vbserve_store.peft_io import load_peft_dir, read_peft_files
from vbserve_store.store import SQLiteAdapterStore

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MAX_ADAPTER_BYTES = 256 << 10
BASE = "base"  # the tiny model has no name of its own


def api_settings(**overrides) -> Settings:
    return Settings(
        **{
            "max_batch_size": 8,
            "max_queue": 32,
            "max_adapter_slots": 8,
            "max_lora_rank": 8,
            "max_model_len": 256,
            "max_adapter_bytes": MAX_ADAPTER_BYTES,
            "default_max_tokens": 16,
            **overrides,
        }
    )


@contextmanager
def live_multi_tenant(folder: Path, admin_key: str, tenant: str, **overrides) -> Iterator[tuple[FastAPI, str, str]]:
    """A real uvicorn server with an admin key over SQLite store, tenant registry and job
    queue in `folder` (jobs are queued, no worker runs them), and one tenant with one key.
    Yields (app, base URL, the tenant's key)."""
    store = SQLiteAdapterStore(folder / "adapters.db")
    registry = SQLiteTenantRegistry(folder / "tenants.db")
    registry.create_tenant(tenant)
    _, key = registry.create_key(tenant)
    settings = api_settings(
        admin_key=admin_key,
        store_url=f"sqlite:///{folder / 'adapters.db'}",
        jobs_url=f"sqlite:///{folder / 'jobs.db'}",
        embedded_worker=False,
        **overrides,
    )
    app = create_app(settings, model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store, tenants=registry)
    try:
        with serve_in_thread(app) as url:
            yield app, url, key
    finally:
        registry.close()
        store.close()


def random_adapter(model, seed: int, r: int = 4) -> VBLoRAAdapter:
    """A VB-LoRA adapter on `model`'s q_proj and v_proj layers, with random logits and bank."""
    modules = tuple(
        ModuleSpec(n, m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "v_proj"))
    )
    config = AdapterConfig(modules, r=r, vector_length=16, num_vectors=32, topk=2)
    gen = torch.Generator().manual_seed(seed)
    bank = torch.rand(32, 16, generator=gen) - 0.5
    return VBLoRAAdapter.from_logits(config, bank, torch.randn(config.num_subvectors, 32, generator=gen))


def chat_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture
async def api(tmp_path):
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    app = create_app(api_settings(), model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.app = app
            yield client
    store.close()


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A PEFT VB-LoRA checkpoint (top-k only, as PEFT saves for serving) for the tiny model."""
    model = random_peft_vblora(
        tiny_llama(seed=7), r=4, b=16, h=32, k=2, targets=["q_proj", "v_proj"], seed=1, save_only_topk_weights=True
    )
    path = tmp_path_factory.mktemp("peft")
    model.save_pretrained(path)
    return path


def multipart(peft_dir):
    return {
        name: (name, (peft_dir / name).read_bytes()) for name in ("adapter_config.json", "adapter_model.safetensors")
    }


def assert_sse_framing(r: httpx.Response) -> None:
    """The wire format OpenAI's and LoRAX's clients read: one `data:` line per event, each
    ended by a blank line; no caching, no proxy buffering."""
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    blocks = r.text.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1]), r.text


def sse_events(text: str) -> list:
    """`data:` payloads of an SSE body, JSON-decoded except the final `[DONE]`."""
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "field"}, body
    return body["error"]


GREEDY = {"temperature": 0, "max_tokens": 12}


# -- generation ---------------------------------------------------------------------------


async def test_completion_and_chat(api):
    r = await api.post("/v1/completions", json={"prompt": "Hello there", **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == BASE
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 12, "total_tokens": 23}
    # A list of one prompt is the same request.
    again = (await api.post("/v1/completions", json={"prompt": ["Hello there"], **GREEDY})).json()
    assert again["choices"][0]["text"] == body["choices"][0]["text"]

    r = await api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], **GREEDY})
    assert r.status_code == 200, r.text
    chat = r.json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    # The prompt is the chat template's rendering, ending in the assistant's turn.
    assert chat["usage"]["prompt_tokens"] == len("<user>Hi\n<assistant>")
    assert chat["usage"]["completion_tokens"] == 12


async def test_completion_logprobs(api):
    body = (await api.post("/v1/completions", json={"prompt": "abc", "logprobs": 3, **GREEDY})).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 12
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(len(t) <= 3 for t in lp["top_logprobs"])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_streaming_matches_non_streaming(api, path):
    chat = "chat" in path
    request = {"messages": [{"role": "user", "content": "Stream me"}]} if chat else {"prompt": "Stream me"}
    request |= GREEDY
    full = (await api.post(path, json=request)).json()
    r = await api.post(path, json={**request, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert_sse_framing(r)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and r.text.endswith("\n\ndata: [DONE]\n\n")
    chunks = events[:-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    if chat:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks[:-1])
        assert text == full["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
        assert text == full["choices"][0]["text"]
    assert len({c["id"] for c in chunks}) == 1


async def test_lorax_generate_and_stream(api):
    request = {"inputs": "Hello", "parameters": {"max_new_tokens": 10, "details": True}}
    r = await api.post("/generate", json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    details = body["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 10
    assert details["prompt_tokens"] == 5 and len(details["tokens"]) == 10
    assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]

    r = await api.post("/generate_stream", json=request)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert_sse_framing(r)
    events = sse_events(r.text)
    assert len(events) == 10 and all(e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == body["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "length"
    assert [e["token"]["id"] for e in events] == [t["id"] for t in details["tokens"]]

    # Sampling is TGI's: greedy unless asked; a seed makes it reproducible.
    sampled = {"inputs": "Hello", "parameters": {"max_new_tokens": 10, "do_sample": True, "seed": 3}}
    first = (await api.post("/generate", json=sampled)).json()["generated_text"]
    assert (await api.post("/generate", json=sampled)).json()["generated_text"] == first


# -- adapters -----------------------------------------------------------------------------


async def test_adapter_lifecycle(api, peft_dir):
    r = await api.put("/v1/adapters/peft-one", files=multipart(peft_dir))
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == "peft-one" and info["version"] == 1
    assert info["config"]["r"] == 4 and info["bank_bytes"] > 0
    assert info["stored_bytes"] == info["body_bytes"] + info["bank_bytes"]

    imported = load_peft_dir(peft_dir)
    blob = encode_adapter(imported)
    r = await api.put("/v1/adapters/native-one", content=blob, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert r.json()["bank_id"] == info["bank_id"] == imported.bank_id
    # Replacing is a new version; a conditional write on a stale version conflicts.
    r = await api.put("/v1/adapters/native-one", content=blob, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["version"] == 2
    r = await api.put("/v1/adapters/native-one?expected_version=1", content=blob)
    assert r.status_code == 409 and error_of(r)["type"] == "conflict"
    # A blob without its bank is taken when the tenant already holds that bank.
    r = await api.put("/v1/adapters/no-bank", content=encode_adapter(imported, include_bank=False))
    assert r.status_code == 201, r.text

    # List, paged.
    first = (await api.get("/v1/adapters", params={"limit": 2})).json()
    assert [a["name"] for a in first["data"]] == ["native-one", "no-bank"]
    assert first["has_more"] and first["next_after"] == "no-bank"
    rest = (await api.get("/v1/adapters", params={"after": first["next_after"]})).json()
    assert [a["name"] for a in rest["data"]] == ["peft-one"] and not rest["has_more"]
    models = (await api.get("/v1/models")).json()["data"]
    assert [m["id"] for m in models] == [BASE, "native-one", "no-bank", "peft-one"]
    assert models[1]["parent"] == BASE

    got = (await api.get("/v1/adapters/native-one")).json()
    assert got["version"] == 2 and got["config"] == info["config"]

    # native, with and without the bank, and the bank itself.
    r = await api.get("/v1/adapters/peft-one/content")
    assert r.status_code == 200 and r.headers["etag"] == '"v1"'
    pulled = decode_adapter(r.content)
    assert torch.equal(pulled.indices.long(), imported.indices.long())
    assert torch.equal(pulled.weights, imported.weights)
    slim = await api.get("/v1/adapters/peft-one/content", params={"omit_bank": "true"})
    assert len(slim.content) < len(r.content)
    bank = await api.get(f"/v1/banks/{info['bank_id']}")
    assert bank.status_code == 200
    assert torch.equal(decode_bank(bank.content), imported.bank)
    unrelated = "sha256-" + "0" * 40
    assert (await api.get(f"/v1/banks/{unrelated}")).status_code == 404

    # If-None-Match with the current version: 304, no body.
    r = await api.get("/v1/adapters/peft-one/content", headers={"If-None-Match": '"v1"'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == '"v1"'
    r = await api.get("/v1/adapters/native-one/content", headers={"If-None-Match": '"v1"'})
    assert r.status_code == 200 and r.headers["etag"] == '"v2"'

    # peft: the two PEFT files, which import back to the same adapter.
    r = await api.get("/v1/adapters/peft-one/content", params={"format": "peft"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert sorted(zf.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
        back = read_peft_files(zf.read("adapter_config.json"), zf.read("adapter_model.safetensors"))
    assert torch.equal(back.indices.long(), imported.indices.long())
    assert torch.allclose(back.weights, imported.weights)
    # lora: the materialized A/B matrices of every targeted module.
    r = await api.get("/v1/adapters/peft-one/content", params={"format": "lora"})
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        config = json.loads(zf.read("adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    r = await api.get("/v1/adapters/peft-one/content", params={"format": "zip"})
    assert r.status_code == 422 and error_of(r)["field"] == "format"

    r = await api.delete("/v1/adapters/native-one")
    assert r.status_code == 204
    r = await api.get("/v1/adapters/native-one")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found"
    assert (await api.delete("/v1/adapters/native-one")).status_code == 404
    assert (await api.get("/v1/adapters/native-one/content")).status_code == 404


async def test_downloads_are_byte_stable(api, peft_dir):
    """One stored adapter, one file per format: the same bytes on every download and after
    a round trip (upload the download, download again), so their digest names the adapter."""
    r = await api.put("/v1/adapters/stable", files=multipart(peft_dir))
    assert r.status_code == 201, r.text
    for params in ({}, {"omit_bank": "true"}, {"format": "peft"}, {"format": "lora"}):
        downloads = [await api.get("/v1/adapters/stable/content", params=params) for _ in range(3)]
        assert all(d.status_code == 200 for d in downloads), params
        assert len({d.content for d in downloads}) == 1, params
        digest = base64.b64encode(hashlib.sha256(downloads[0].content).digest()).decode()
        assert downloads[0].headers["repr-digest"] == f"sha-256=:{digest}:"
    native = (await api.get("/v1/adapters/stable/content")).content
    r = await api.put("/v1/adapters/copy", content=native, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert (await api.get("/v1/adapters/copy/content")).content == native


async def test_a_native_upload_hashes_its_bank_once(api, peft_dir, monkeypatch):
    """The bank is the bulk of an adapter: an upload hashes it once (building the adapter),
    whether the blob carries it or names a bank of the tenant's by id."""
    hashed = []

    def counting(bank: torch.Tensor) -> str:
        hashed.append(tuple(bank.shape))
        return bank_id_of(bank)

    adapter = load_peft_dir(peft_dir)
    octet = {"content-type": "application/octet-stream"}
    for module in (vbserve_store.adapter, vbserve_store.codec):
        monkeypatch.setattr(module, "bank_id_of", counting)
    for name, blob in (("full", encode_adapter(adapter)), ("slim", encode_adapter(adapter, include_bank=False))):
        hashed.clear()
        r = await api.put(f"/v1/adapters/{name}", content=blob, headers=octet)
        assert r.status_code == 201, r.text
        assert hashed == [tuple(adapter.bank.shape)], name


async def test_generation_with_uploaded_adapter(api, peft_dir):
    assert (await api.put("/v1/adapters/tuned", files=multipart(peft_dir))).status_code == 201
    prompt = "The adapter changes this"
    request = {"prompt": prompt, "temperature": 0, "max_tokens": 20}
    base = (await api.post("/v1/completions", json=request)).json()["choices"][0]["text"]
    tuned = (await api.post("/v1/completions", json={**request, "model": "tuned"})).json()
    assert tuned["model"] == "tuned"
    assert tuned["choices"][0]["text"] != base
    # The same request straight to the engine gives the same text.
    services = api.app.state.services
    ids = services.tokenizer.encode(prompt)
    handle = await services.engine.submit(
        GenerationRequest(ids, SamplingParams(max_new_tokens=20), AdapterRef("default", "tuned"))
    )
    assert tuned["choices"][0]["text"] == (await handle.result()).text
    # LoRAX names the adapter in parameters.adapter_id.
    lorax = {"inputs": prompt, "parameters": {"adapter_id": "tuned", "max_new_tokens": 20}}
    assert (await api.post("/generate", json=lorax)).json()["generated_text"] == tuned["choices"][0]["text"]


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "kind", "field"),
    [
        ("/v1/completions", b"{not json", 400, "invalid_request", "body"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 422, "invalid_request", "temperature"),
        ("/v1/completions", {"prompt": 5}, 422, "invalid_request", "prompt"),
        ("/v1/completions", {"max_tokens": 3}, 422, "invalid_request", "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "invalid_request", "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "invalid_request", "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "invalid_request", "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "invalid_request", "top_p"),
        ("/v1/completions", {"prompt": "x", "n": 0}, 400, "invalid_request", "n"),
        ("/v1/completions", {"prompt": ""}, 400, "invalid_request", "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "invalid_request", "prompt"),
        ("/v1/completions", {"prompt": "x" * 300}, 400, "invalid_request", "prompt"),
        ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "not_found", "model"),
        ("/v1/completions", {"prompt": "x", "model": "bad/name"}, 400, "invalid_request", "model"),
        ("/v1/chat/completions", {"messages": []}, 422, "invalid_request", "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 422, "invalid_request", "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "invalid_request", "max_tokens"),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": -1}}, 400, "invalid_request", "parameters.max_new_tokens"),
        ("/generate", {"inputs": "x", "parameters": {"adapter_id": "nope"}}, 404, "not_found", "parameters.adapter_id"),
        ("/generate_stream", {"inputs": "x", "parameters": {"top_k": -2}}, 400, "invalid_request", "parameters.top_k"),
        ("/generate", {"parameters": {}}, 422, "invalid_request", "inputs"),
    ],
)  # fmt: skip
async def test_error_bodies(api, path, body, status, kind, field):
    if isinstance(body, bytes):
        r = await api.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = await api.post(path, json=body)
    assert r.status_code == status, r.text
    error = error_of(r)
    assert (error["type"], error["field"]) == (kind, field), error
    assert error["message"]


async def test_unknown_route_and_method(api):
    r = await api.get("/v2/nothing")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found"
    r = await api.get("/v1/completions")
    assert r.status_code == 405 and error_of(r)["type"] == "method_not_allowed"


async def test_incompatible_and_invalid_uploads(api):
    other = tiny_llama(hidden=32)  # our tiny model's layers are 64 wide
    r = await api.put("/v1/adapters/foreign", content=encode_adapter(random_adapter(other, seed=1)))
    assert r.status_code == 400, r.text
    assert error_of(r)["type"] == "incompatible_adapter" and error_of(r)["field"] == "modules"
    wide = random_adapter(tiny_llama(), seed=2, r=16)
    r = await api.put("/v1/adapters/too-wide", content=encode_adapter(wide))
    assert r.status_code == 400 and error_of(r)["field"] == "r"
    r = await api.put("/v1/adapters/garbage", content=b"not an adapter at all")
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request"
    r = await api.put("/v1/adapters/bad name", content=encode_adapter(random_adapter(tiny_llama(), seed=3)))
    assert r.status_code == 400 and error_of(r)["field"] == "name"
    r = await api.put(f"/v1/adapters/{BASE}", content=encode_adapter(random_adapter(tiny_llama(), seed=3)))
    assert r.status_code == 409 and error_of(r)["type"] == "conflict"
    r = await api.put("/v1/adapters/text", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415 and error_of(r)["type"] == "unsupported_media_type"
    r = await api.put("/v1/adapters/half", files={"adapter_config.json": ("adapter_config.json", b"{}")})
    assert r.status_code == 400 and error_of(r)["field"] == "adapter_model.safetensors"
    # A foreign tenant's bank (or any unknown bank) cannot be referenced by id.
    r = await api.put(
        "/v1/adapters/bankless", content=encode_adapter(random_adapter(tiny_llama(), seed=4), include_bank=False)
    )
    assert r.status_code == 404 and error_of(r)["field"] == "bank_id"
    assert (await api.get("/v1/adapters")).json()["data"] == []


async def test_oversized_upload_refused(api):
    big = b"\0" * (MAX_ADAPTER_BYTES + 1)
    r = await api.put("/v1/adapters/big", content=big, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413 and error_of(r)["type"] == "too_large"

    sent = 0

    async def chunked():  # no Content-Length: the server must stop reading past the limit
        nonlocal sent
        for _ in range(64):
            sent += 1
            yield b"\0" * (16 << 10)

    r = await api.put("/v1/adapters/big", content=chunked(), headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413 and error_of(r)["type"] == "too_large"
    assert sent * (16 << 10) <= MAX_ADAPTER_BYTES + (32 << 10)  # stopped right after the limit


# -- operations ---------------------------------------------------------------------------


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def test_metrics_move(api, peft_dir):
    r = await api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    before = scrape(r.text)
    ok = ("vbserve_http_requests_total", (("method", "POST"), ("route", "/v1/completions"), ("status", "200")))
    assert before.get(ok, 0) == 0

    await api.put("/v1/adapters/m", files=multipart(peft_dir))
    for _ in range(2):
        assert (await api.post("/v1/completions", json={"prompt": "hi", "model": "m", **GREEDY})).status_code == 200
    await api.post("/v1/completions", json={"prompt": "hi", "model": "missing"})
    after = scrape((await api.get("/metrics")).text)

    assert after[ok] == 2
    missing = ("vbserve_http_requests_total", (("method", "POST"), ("route", "/v1/completions"), ("status", "404")))
    assert after[missing] == 1
    latency = ("vbserve_http_request_duration_seconds_count", (("method", "POST"), ("route", "/v1/completions")))
    assert after[latency] == 3
    assert after[("vbserve_generated_tokens_total", ())] == 24
    assert after[("vbserve_generations_total", (("finish_reason", "length"),))] == 2
    assert after[("vbserve_time_to_first_token_seconds_count", ())] == 2
    assert after[("vbserve_adapter_cache_misses_total", ())] == 1
    assert after[("vbserve_adapter_cache_hits_total", ())] == 1
    assert after[("vbserve_adapter_compose_seconds_count", ())] == 1
    assert after[("vbserve_adapter_cache_bytes", ())] > 0
    assert ("vbserve_queue_length", ()) in after and ("vbserve_running_requests", ()) in after
    info = [k for k in after if k[0] == "vbserve_lora_requests_info"]
    assert len(info) == 1 and dict(info[0][1])["max_lora"] == "8"  # one series, the current adapters
    put = ("vbserve_store_operation_seconds_count", (("operation", "put"),))
    assert after[put] == before.get(put, 0) + 1
    assert after[("vbserve_store_operation_seconds_count", (("operation", "get"),))] >= 1  # the cold load


async def test_health_and_readiness(api):
    assert (await api.get("/healthz")).json() == {"status": "ok", "checks": {}}
    r = await api.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    api.app.state.services.store.close()  # the store goes away
    r = await api.get("/readyz")
    assert r.status_code == 503 and error_of(r)["type"] == "unavailable"
    assert r.headers["retry-after"].isdigit()
    r = await api.get("/v1/adapters")
    assert r.status_code == 503 and "retry-after" in r.headers


async def test_not_ready_before_startup(tmp_path):
    store = SQLiteAdapterStore(tmp_path / "a.db")
    app = create_app(api_settings(), model=tiny_llama(), tokenizer=chat_tokenizer(), store=store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.get("/readyz")  # lifespan not run: no engine yet
        assert r.status_code == 503 and error_of(r)["type"] == "unavailable"
        assert (await client.get("/metrics")).status_code == 503  # nor the settings that guard it
        assert (await client.get("/healthz")).status_code == 200
    store.close()


def test_create_app_needs_model_and_tokenizer_together():
    with pytest.raises(ValueError, match="together"):
        create_app(api_settings(), model=tiny_llama())


async def test_overload_is_429_with_retry_after(tmp_path):
    store = SQLiteAdapterStore(tmp_path / "a.db")
    settings = api_settings(max_batch_size=1, max_queue=1)
    app = create_app(settings, model=tiny_llama(), tokenizer=chat_tokenizer(), store=store)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        body = {"prompt": "busy", "max_tokens": 50, "temperature": 0}
        responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(8)))
    refused = [r for r in responses if r.status_code == 429]
    assert refused and any(r.status_code == 200 for r in responses)
    assert all(error_of(r)["type"] == "overloaded" and r.headers["retry-after"] == "1" for r in refused)
    store.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.com", "::"])
def test_serve_refuses_non_loopback_hosts(host, capsys):
    assert cli.main(["serve", "--host", host]) == 2
    assert "refusing to listen" in capsys.readouterr().err


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                                ("[::1]", True), ("localhost", True), ("10.0.0.1", False)])  # fmt: skip
def test_is_loopback(host, loopback):
    assert cli.is_loopback(host) is loopback


async def test_peft_checkpoint_through_the_api_matches_peft(api, peft_dir, tmp_path):
    """Upload a PEFT VB-LoRA checkpoint, chat with it greedily: the same tokens as PEFT
    itself generates; pulled back as `peft`, the checkpoint loads in PEFT and agrees too."""
    from peft import PeftModel

    assert (await api.put("/v1/adapters/peftchat", files=multipart(peft_dir))).status_code == 201
    messages = [{"role": "user", "content": "Tell me something"}]
    r = await api.post("/v1/chat/completions", json={"model": "peftchat", "messages": messages, **GREEDY})
    served = r.json()["choices"][0]["message"]["content"]

    tok = chat_tokenizer()
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    ids = torch.tensor([prompt])

    def peft_greedy(checkpoint) -> str:
        model = PeftModel.from_pretrained(tiny_llama(seed=7), checkpoint).eval()
        out = model.generate(input_ids=ids, max_new_tokens=GREEDY["max_tokens"], do_sample=False)
        return tok.decode(out[0, len(prompt) :])

    assert served == peft_greedy(peft_dir)
    base = await api.post("/v1/chat/completions", json={"messages": messages, **GREEDY})
    assert base.json()["choices"][0]["message"]["content"] != served  # the adapter matters here

    pulled = await api.get("/v1/adapters/peftchat/content", params={"format": "peft"})
    zipfile.ZipFile(io.BytesIO(pulled.content)).extractall(tmp_path / "pulled")
    assert peft_greedy(tmp_path / "pulled") == served


def test_lora_requests_info_keeps_one_series_of_the_current_adapters():
    from vbserve.metrics import Metrics

    metrics = Metrics(max_lora=4, adapter_names=True)
    step = {"running": 2, "waiting": 1, "running_adapters": ["acme/a", "acme/b"], "waiting_adapters": ["globex/c"]}
    metrics.on_step(step)
    metrics.on_step({**step, "running_adapters": ["acme/b"], "waiting_adapters": []})
    series = [s for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples]
    info = [s.labels for s in series if s.name == "vbserve_lora_requests_info"]
    assert info == [{"running_lora_adapters": "acme/b", "waiting_lora_adapters": "", "max_lora": "4"}]
