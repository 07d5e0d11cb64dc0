"""Prompts are tokenized off the event loop, within limits checked first, in time linear in
their size (issue #12, finding 6): one tenant's huge chat must not stall anyone's route."""

from __future__ import annotations

import asyncio
import gc
import statistics
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from transformers import PreTrainedTokenizerBase

from tests.conftest import serve_in_thread, tiny_llama
from tests.test_api import api, api_settings, error_of  # noqa: F401  (api: the in-process app fixture)
from tests.test_hostile import SPECIALS, chatml_tokenizer
from vbserve.api.errors import APIError
from vbserve.api.routers.openai import _chat_prompt_ids
from vbserve.api.schemas.openai import ChatRequest
from vbserve.api.tokenizing import TokenizerPool
from vbserve.app import create_app
from vbserve_store.store import SQLiteAdapterStore


def hostile_chat(messages: int, chars_per_message: int) -> list[dict]:
    """Messages that each spell a control token: the costly path, where every message is
    encoded apart from the template so that the token stays text."""
    filler = "x" * (chars_per_message - len(SPECIALS[1]))
    return [{"role": "user", "content": SPECIALS[1] + filler}] * messages


def flood(folder: Path, chat: dict, clients: int = 4) -> tuple[list[httpx.Response], list[float]]:
    """`clients` threads post `chat` at once to a real server (tiny model, ChatML test
    tokenizer, default limits) while /healthz is asked again and again until they all
    have their answer. Returns their responses and the probes' latencies (seconds)."""
    store = SQLiteAdapterStore(folder / "adapters.db")
    app = create_app(api_settings(), model=tiny_llama(seed=7), tokenizer=chatml_tokenizer(), store=store)
    responses: list[httpx.Response] = []
    latencies: list[float] = []
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as probe:
        probe.get("/healthz")  # the connection is open before the flood
        # A full garbage collection over this process's objects (pytest, torch,
        # transformers: 0.2 to 0.4 s) stops every thread whatever they run. Frozen out of
        # the collector's reach meanwhile, so that the probe measures the event loop.
        gc.freeze()
        try:
            senders = [
                threading.Thread(
                    target=lambda: responses.append(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120))
                )
                for _ in range(clients)
            ]
            for sender in senders:
                sender.start()
            while any(sender.is_alive() for sender in senders):
                start = time.perf_counter()
                assert probe.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)
        finally:
            gc.unfreeze()
    store.close()
    print(f"{len(latencies)} healthz probes, p50 {statistics.median(latencies) * 1000:.0f} ms, ", end="")
    print(f"max {max(latencies) * 1000:.0f} ms; chats answered in {[r.elapsed.total_seconds() for r in responses]} s")
    return responses, latencies


def test_healthz_answers_while_huge_chats_are_tokenized(tmp_path) -> None:
    # Four chats at both limits at once (the default 2048 messages, 256 Ki characters
    # each): on the event loop their templating and tokenizing stopped every route for
    # seconds. Here /healthz must keep answering as if nothing ran.
    settings = api_settings()
    per_message = settings.max_prompt_chars // settings.max_chat_messages
    print("\n4 chats at the limits:", end=" ")
    responses, latencies = flood(tmp_path, {"messages": hostile_chat(settings.max_chat_messages, per_message)})
    # Tokenized whole, then refused: the test tokenizer's control-token ids lie past the tiny
    # model's 256-token vocabulary (and 262,144 byte tokens past its context).
    assert [r.status_code for r in responses] == [400] * 4
    # Measured on a loaded 2-core machine (the probe, the flood and the server share one
    # process and its GIL): p50 50 ms, at most 0.08 to 0.27 s here; with tokenizing on the
    # event loop, every chat stopped the loop for 0.6 to 1.9 s.
    assert max(latencies) < 0.4, sorted(latencies)[-5:]
    # The flood lasted a while: /healthz was asked during it (8 probes over 0.4 s on a quiet
    # machine, where each probe waits ~45 ms for the tokenizing threads' GIL; more under load).
    assert len(latencies) >= 5, latencies


def test_the_issues_1_mb_chat_is_refused_before_any_templating(tmp_path) -> None:
    # The chat of the report: 23,000 messages in 1 MB, each spelling a control token. One
    # stopped every route for 15 s (10 s on the reporter's machine); over the message
    # limit, it is now refused before the chat template or the tokenizer sees it.
    print("\n4 chats of 23,000 messages in 1 MB:", end=" ")
    responses, latencies = flood(tmp_path, {"messages": hostile_chat(23_000, 12)})
    for r in responses:
        error = error_of(r)
        assert r.status_code == 400 and error["field"] == "messages" and "at most 2048" in error["message"]
        assert r.elapsed.total_seconds() < 2  # measured 0.1 to 0.5 s
    # What remains on the event loop is reading the JSON body into 23,000 message objects
    # (FastAPI validates bodies there): about 0.1 s per body; healthz took 0.3 s at most here.
    assert max(latencies) < 1, sorted(latencies)[-5:]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 5, "max_tokens": 1}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 9}] * 2, "max_tokens": 1}, "messages"),
        ("/v1/completions", {"prompt": "a" * 17, "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": ["a" * 17], "max_tokens": 1}, "prompt"),
        ("/generate", {"inputs": "a" * 17, "parameters": {"max_new_tokens": 1}}, "inputs"),
        ("/generate_stream", {"inputs": "a" * 17, "parameters": {"max_new_tokens": 1}}, "inputs"),
    ],
)
async def test_prompts_over_the_limits_are_refused_before_tokenizing(api, path, body, field) -> None:  # noqa: F811
    services = api.app.state.services
    services.settings = services.settings.model_copy(update={"max_chat_messages": 4, "max_prompt_chars": 16})
    # Well within the model's context: only the limits refuse these.
    r = await api.post(path, json=body)
    error = error_of(r)
    assert r.status_code == 400 and (error["type"], error["field"]) == ("invalid_request", field)
    assert "at most" in error["message"]
    # At the limits, accepted.
    services.settings = services.settings.model_copy(update={"max_chat_messages": 5, "max_prompt_chars": 18})
    assert (await api.post(path, json=body)).status_code == 200


def test_chat_tokenizing_time_is_linear_in_the_messages() -> None:
    tokenizer = chatml_tokenizer()

    def seconds(messages: int) -> float:
        body = ChatRequest(messages=hostile_chat(messages, 24))
        return min(timeit.repeat(lambda: _chat_prompt_ids(tokenizer, body), number=1, repeat=3))

    small, large = seconds(2000), seconds(8000)
    print(f"\nchat of 2000 messages: {small:.3f} s, of 8000: {large:.3f} s ({large / small:.1f}x)")
    # Four times the messages: about four times the time (measured 3.4x); the scan that
    # searched the whole text once per message took 9x (0.25 s, then 2.3 s), worse beyond.
    assert large / small < 6, (small, large)


async def test_the_tokenizer_pool_bounds_its_threads_and_its_queue() -> None:
    pool = TokenizerPool(chatml_tokenizer(), threads=1, max_waiting=1)
    release = threading.Event()
    ran: list[str] = []

    def work(name: str) -> Callable[[object], str]:
        def run(tokenizer: object) -> str:
            release.wait(10)
            ran.append(name)
            return name

        return run

    running = asyncio.create_task(pool.run(work("running")))
    waiting = asyncio.create_task(pool.run(work("waiting")))
    await asyncio.sleep(0.05)
    with pytest.raises(APIError) as refused:  # one running, one waiting: full
        await pool.run(work("refused"))
    assert refused.value.type == "overloaded" and refused.value.status == 429
    waiting.cancel()  # its client went away before a thread took it: it never runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    assert await running == "running"
    assert await pool.run(work("later")) == "later"
    assert ran == ["running", "later"]


async def test_each_tokenizing_thread_encodes_with_its_own_tokenizer() -> None:
    # `split_special_tokens` is a flag that transformers sets on the tokenizer before each
    # encode: on one tokenizer shared by two threads, one thread's flag applied to the
    # other's encode (a chat message's `<|im_end|>` read as the control token).
    tokenizer = chatml_tokenizer()
    text = f"hi {SPECIALS[1]} " * 500
    expected = {
        split: tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split) for split in (False, True)
    }
    assert expected[False] != expected[True]
    pool = TokenizerPool(tokenizer, threads=2, max_waiting=200)
    splits = [i % 2 == 0 for i in range(200)]

    def encode(split: bool) -> Callable[[PreTrainedTokenizerBase], list[int]]:
        return lambda own: own.encode(text, add_special_tokens=False, split_special_tokens=split)

    results = await asyncio.gather(*(pool.run(encode(split)) for split in splits))
    wrong = sum(ids != expected[split] for ids, split in zip(results, splits, strict=True))
    assert wrong == 0, f"{wrong} of {len(splits)} encodes used the other thread's flag"
