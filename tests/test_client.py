"""A real uvicorn server on a loopback port (tiny model, SQLite store) driven by our
Python client, the `vbctl` CLI and the official `openai` package."""

from __future__ import annotations

import asyncio
import http.server
import io
import socket
import threading
import time
import zipfile

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import failing_forward_pass, tiny_llama
from tests.test_api import BASE, api_settings, chat_tokenizer, random_adapter
from tests.test_api import peft_dir as peft_dir  # the module-scoped fixture
from vbserve.app import create_app
from vbserve_client import (
    APIError,
    AsyncVBServeClient,
    IncompatibleAdapterError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    VBServeClient,
)
from vbserve_client.cli import main as vbctl
from vbserve_store import decode_adapter, encode_adapter
from vbserve_store.peft_io import load_peft_dir
from vbserve_store.store import SQLiteAdapterStore

GREEDY = {"temperature": 0, "max_tokens": 12}
HI = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app in a uvicorn server on a background thread; yields (base URL, app)."""
    store = SQLiteAdapterStore(tmp_path_factory.mktemp("store") / "adapters.db")
    app = create_app(api_settings(), model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves on this socket
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()
    store.close()


@pytest.fixture
def url(server):
    return server[0]


def test_sync_client_generation(url):
    with VBServeClient(url) as vb:
        done = vb.generate("Hello", **GREEDY)
        assert done.model == BASE and done.finish_reason == "length"
        assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == 5
        assert "".join(vb.stream("Hello", **GREEDY)) == done.text
        reply = vb.chat(HI, **GREEDY)
        assert "".join(vb.chat_stream(HI, **GREEDY)) == reply.text
        assert vb.models()[0].id == BASE
        with pytest.raises(NotFoundError) as info:
            vb.generate("Hello", adapter="no-such-adapter")
        assert info.value.status == 404 and info.value.field == "model"
        with pytest.raises(InvalidRequestError) as info:
            list(vb.stream("Hello", max_tokens=-5))
        assert info.value.field == "max_tokens"


def test_sync_client_adapters(url, peft_dir, tmp_path):
    with VBServeClient(url) as vb:
        pushed = vb.adapters.push("sync-peft", peft_dir)
        assert pushed.version == 1
        blob = encode_adapter(load_peft_dir(peft_dir))
        assert vb.adapters.push("sync-blob", blob).bank_id == pushed.bank_id
        (tmp_path / "a.safetensors").write_bytes(blob)
        assert vb.adapters.push("sync-blob", tmp_path / "a.safetensors").version == 2
        assert {"sync-peft", "sync-blob"} <= {a.name for a in vb.adapters.iter(page_size=1)}
        assert vb.adapters.get("sync-blob").version == 2
        pulled = decode_adapter(vb.adapters.pull("sync-blob"))
        assert pulled.bank_id == pushed.bank_id and pulled.config == load_peft_dir(peft_dir).config
        assert zipfile.is_zipfile(io.BytesIO(vb.adapters.pull("sync-peft", format="lora")))
        tuned = vb.generate("Hello", adapter="sync-peft", **GREEDY)
        assert tuned.text != vb.generate("Hello", **GREEDY).text
        assert "".join(vb.stream("Hello", adapter="sync-peft", **GREEDY)) == tuned.text
        with pytest.raises(IncompatibleAdapterError):
            vb.adapters.push("wrong", encode_adapter(_foreign_adapter()))
        vb.adapters.delete("sync-blob")
        with pytest.raises(NotFoundError):
            vb.adapters.get("sync-blob")


async def test_async_client(url, peft_dir):
    async with AsyncVBServeClient(url) as vb:
        done = await vb.generate("Hello", **GREEDY)
        assert "".join([d async for d in vb.stream("Hello", **GREEDY)]) == done.text
        reply = await vb.chat(HI, **GREEDY)
        assert "".join([d async for d in vb.chat_stream(HI, **GREEDY)]) == reply.text
        await vb.adapters.push("async-peft", peft_dir)
        assert "async-peft" in [a.name async for a in vb.adapters.iter()]
        assert (await vb.adapters.list(limit=1)).data
        assert len(await vb.adapters.pull("async-peft", omit_bank=True)) > 0
        await vb.adapters.delete("async-peft")
        with pytest.raises(NotFoundError):
            await vb.adapters.get("async-peft")


def test_a_failure_after_streaming_began_raises_the_typed_error(server):
    """Once the first event is sent the status line is 200: the failure comes as an error
    event, which both clients raise as the error its `type` names (with no status). The
    fault is injected in the model runner: the fourth forward pass (a decode step) raises."""
    url, app = server
    runner = app.state.services.engine.runner
    with VBServeClient(url) as vb, failing_forward_pass(runner, 4):
        deltas = vb.stream("Hello", **GREEDY)
        assert next(deltas)  # the first token arrived
        with pytest.raises(InternalServerError) as caught:
            list(deltas)
    assert caught.value.type == "internal_error" and caught.value.status is None

    async def stream_async() -> None:
        async with AsyncVBServeClient(url) as vb:
            async for _ in vb.chat_stream(HI, **GREEDY):
                pass

    with failing_forward_pass(runner, 4), pytest.raises(InternalServerError) as caught:
        asyncio.run(stream_async())
    assert caught.value.status is None


class HtmlPage(http.server.BaseHTTPRequestHandler):
    """What a misconfigured proxy may answer to anything: 200 and a page."""

    def do_POST(self) -> None:
        body = b"<html>Welcome</html>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_stream_answered_with_no_event_stream_raises_an_api_error():
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), HtmlPage) as page:
        threading.Thread(target=page.serve_forever, daemon=True).start()
        with VBServeClient(f"http://127.0.0.1:{page.server_port}") as vb, pytest.raises(APIError) as caught:
            list(vb.stream("Hello"))
        page.shutdown()
    assert caught.value.status == 200 and "text/html" in caught.value.message


def test_openai_package(url, peft_dir):
    with VBServeClient(url) as vb:
        vb.adapters.push("oa", peft_dir)
        ours = vb.chat(HI, adapter="oa", **GREEDY).text
        ours_completion = vb.generate("Hello", **GREEDY).text
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data][:1] == [BASE]

    chat = client.chat.completions.create(model="oa", messages=HI, **GREEDY)
    assert chat.choices[0].message.content == ours and chat.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model="oa", messages=HI, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ours
    assert chunks[-1].usage.completion_tokens == 12

    completion = client.completions.create(model=BASE, prompt="Hello", **GREEDY)
    assert completion.choices[0].text == ours_completion
    streamed = client.completions.create(model=BASE, prompt="Hello", stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == ours_completion

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=HI)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="Hello", temperature=-1)


def test_vbctl(url, peft_dir, tmp_path, capsys):
    def run(*args: str) -> str:
        assert vbctl(["--url", url, *args]) == 0
        return capsys.readouterr().out

    assert "pushed cli-peft version 1" in run("adapters", "import-peft", "cli-peft", str(peft_dir))
    assert "cli-peft" in run("adapters", "ls")
    run("adapters", "export-peft", "cli-peft", str(tmp_path / "exported"))
    exported = load_peft_dir(tmp_path / "exported")
    assert exported.bank_id == load_peft_dir(peft_dir).bank_id
    run("adapters", "pull", "cli-peft", "-o", str(tmp_path / "blob.safetensors"))
    assert "pushed cli-blob version 1" in run("adapters", "push", "cli-blob", str(tmp_path / "blob.safetensors"))
    with VBServeClient(url) as vb:
        expected = vb.generate("Hi", adapter="cli-peft", **GREEDY).text
    assert run("generate", "Hi", "-a", "cli-peft", "--temperature", "0", "--max-tokens", "12") == expected + "\n"
    assert run("chat", "Hi there", "--temperature", "0", "--max-tokens", "12").endswith("\n")
    assert "deleted cli-blob" in run("adapters", "rm", "cli-blob")
    assert vbctl(["--url", url, "adapters", "rm", "cli-blob"]) == 1
    assert "not_found" in capsys.readouterr().err


def test_disconnect_cancels_generation(server):
    url, app = server
    engine = app.state.services.engine

    def cancelled() -> float:
        text = httpx.get(f"{url}/metrics").text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "vbserve_generations_total" and s.labels == {"finish_reason": "cancelled"}:
                    return s.value
        return 0.0

    def wait_for_cancel(before: float) -> None:
        deadline = time.monotonic() + 10
        while cancelled() == before or engine.running_count:
            assert time.monotonic() < deadline, "the engine kept generating for a client that left"
            time.sleep(0.02)

    # As long a generation as the context allows (about 0.4 s), so it still runs when we hang up.
    body = {"prompt": "Go on", "max_tokens": 250, "temperature": 0}
    before = cancelled()
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
    wait_for_cancel(before)

    before = cancelled()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.1)
    wait_for_cancel(before)


def _foreign_adapter():
    """An adapter for a model of hidden size 32: our tiny model's layers are 64 wide."""
    return random_adapter(tiny_llama(hidden=32), seed=1)
