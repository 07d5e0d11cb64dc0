"""Plain LoRA adapters: a PEFT LoRA checkpoint uploads, lists, downloads (PEFT loads it back)
and is served beside VB-LoRA adapters in one batch, giving what PEFT's `PeftModel` gives
(greedy tokens, and logprobs and logits to float rounding); bad checkpoints are refused
naming the field, and nothing is stored."""

from __future__ import annotations

import copy
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests.conftest import byte_tokenizer, engine_over, rel_err, tiny_llama
from tests.test_api import api  # noqa: F401 (the fixture)
from tests.test_engine import random_adapter
from tests.test_mixtures import (
    TENANT,
    composed,
    generate,
    mixture,
    peft_greedy,
    peft_mixture,
    request,
    served_logits,
)
from vbserve.engine import AdapterRef
from vbserve.settings import Settings
from vbserve.vblora.lora_export import export_lora
from vbserve.vblora.mixture import mix_lora
from vbserve_store import LoRAAdapter, decode_lora
from vbserve_store.peft_io import load_peft_dir, write_checkpoint_dir
from vbserve_store.store import SQLiteAdapterStore

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_lora(base, *, r=8, alpha=16, rslora=False, seed=0, targets=TARGETS):
    """A PEFT LoRA model over a copy of `base` with random A and B (PEFT starts B at zero)."""
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets)
    model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def saved(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_an_imported_peft_lora_gives_peft_logits(rslora, tmp_path):
    base = tiny_llama(seed=41)
    oracle = peft_lora(base, rslora=rslora, seed=42)
    adapter = load_peft_dir(saved(oracle, tmp_path / "peft"))
    assert isinstance(adapter, LoRAAdapter) and adapter.config.r == 8 and adapter.config.use_rslora == rslora
    input_ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(43))
    with torch.no_grad():
        ref, plain = oracle(input_ids).logits, base(input_ids).logits
    s = adapter.config.scaling
    ours = served_logits(base, {n: (a, b * s) for n, (a, b) in adapter.matrices().items()}, input_ids)
    assert rel_err(ref - plain, plain) > 1e-3, "the adapter must move the logits"
    assert rel_err(ours, ref) < 1e-5 and rel_err(ours - plain, ref - plain) < 1e-4


def test_a_mixture_of_a_lora_and_a_vblora_adapter_is_peft_cat(tmp_path):
    base = tiny_llama(seed=51)
    lora = load_peft_dir(saved(peft_lora(base, r=4, alpha=12, seed=52), tmp_path / "lora"))
    vblora = random_adapter(base, seed=53, targets=("q_proj", "o_proj"), r=2, b=32)
    write_checkpoint_dir(tmp_path / "vb", *export_lora(vblora))
    input_ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(54))
    oracle = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora", adapter_name="lora")
    oracle.load_adapter(tmp_path / "vb", adapter_name="vb")
    oracle.add_weighted_adapter(["lora", "vb"], [0.8, -1.5], "mix", combination_type="cat")
    oracle.set_adapter("mix")
    with torch.no_grad():
        ref = oracle.eval()(input_ids).logits
    mixed = mix_lora([lora.matrices(), composed(vblora)], [0.8, -1.5], [lora.config.scaling, 1.0], "cat")
    assert rel_err(served_logits(base, mixed, input_ids), ref) < 1e-5


async def test_the_engine_serves_lora_beside_vblora_rows_as_peft_does(tmp_path):
    model = tiny_llama(seed=7)
    oracle = peft_lora(tiny_llama(seed=7), r=6, alpha=9, seed=61)
    store = SQLiteAdapterStore(tmp_path / "a.db")
    store.put(TENANT, "plain", load_peft_dir(saved(oracle, tmp_path / "peft")))
    store.put(TENANT, "vb", random_adapter(model, seed=62, bank_scale=2.0))
    engine = engine_over(model, byte_tokenizer(), store, Settings(max_lora_rank=8, max_model_len=128))
    try:
        prompts = ([5, 17, 99, 3, 250], [8, 8, 1])
        rows = [
            request(prompts[0], AdapterRef(TENANT, "plain")),
            request(prompts[0], AdapterRef(TENANT, "vb")),
            request(prompts[1]),
            request(prompts[1], AdapterRef(TENANT, "plain")),
        ]
        results = await generate(engine, rows)
    finally:
        engine.shutdown()
        store.close()
    for (tokens, logprobs), prompt in ((results[0], prompts[0]), (results[3], prompts[1])):
        expected, expected_lp = peft_greedy(oracle, prompt, 12)
        assert tokens == expected
        assert rel_err(logprobs, expected_lp) < 1e-4
    assert results[0][0] != results[1][0] and results[3][0] != results[2][0], "the adapters must act"


async def test_the_engine_serves_a_mixture_of_lora_and_vblora_as_peft_cat(tmp_path):
    model = tiny_llama(seed=7)
    lora_model = peft_lora(tiny_llama(seed=7), r=4, alpha=6, seed=71)
    lora = load_peft_dir(saved(lora_model, tmp_path / "peft"))
    vb = random_adapter(model, seed=72, r=4, bank_scale=2.0)
    store = SQLiteAdapterStore(tmp_path / "a.db")
    store.put(TENANT, "plain", lora)
    store.put(TENANT, "vb", vb)
    engine = engine_over(model, byte_tokenizer(), store, Settings(max_lora_rank=8, max_model_len=128))
    try:
        prompt = [3, 141, 59, 26]
        [(tokens, logprobs), _] = await generate(
            engine, [request(prompt, mixture(("plain", 0.9), ("vb", 0.6))), request(prompt, AdapterRef(TENANT, "vb"))]
        )
    finally:
        engine.shutdown()
        store.close()
    oracle = peft_mixture(tiny_llama(seed=7), {"vb": vb}, [1.0], "cat", tmp_path)  # loads vb as LoRA
    oracle.load_adapter(tmp_path / "peft", adapter_name="plain")
    oracle.add_weighted_adapter(["plain", "vb"], [0.9, 0.6], "both", combination_type="cat")
    oracle.set_adapter("both")
    expected, expected_lp = peft_greedy(oracle, prompt, 12)
    assert tokens == expected and rel_err(logprobs, expected_lp) < 1e-4


# -- over HTTP: upload, list, download, refuse ---------------------------------------------------


def checkpoint_files(path: Path, edit_config=None, edit_tensors=None) -> dict:
    config = json.loads((path / "adapter_config.json").read_text())
    if edit_config:
        edit_config(config)
    weights = (path / "adapter_model.safetensors").read_bytes()
    if edit_tensors:
        from safetensors.torch import load, save

        tensors = load(weights)
        edit_tensors(tensors)
        weights = save(tensors)
    return {
        "adapter_config.json": ("adapter_config.json", json.dumps(config).encode()),
        "adapter_model.safetensors": ("adapter_model.safetensors", weights),
    }


async def test_a_peft_lora_checkpoint_uploads_lists_and_downloads(api, tmp_path):  # noqa: F811
    oracle = peft_lora(tiny_llama(seed=7), r=8, alpha=16, seed=81)
    path = saved(oracle, tmp_path / "peft")
    r = await api.put("/v1/adapters/plain", files=checkpoint_files(path))
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["bank_id"] == "" and info["bank_bytes"] == 0 and info["config"]["kind"] == "lora"
    assert info["config"]["r"] == 8 and info["config"]["lora_alpha"] == 16
    assert [a["name"] for a in (await api.get("/v1/adapters")).json()["data"]] == ["plain"]
    models = [m["id"] for m in (await api.get("/v1/models")).json()["data"]]
    assert "plain" in models

    input_ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(82))
    with torch.no_grad():
        ref = oracle(input_ids).logits
    for fmt in ("peft", "lora"):
        r = await api.get(f"/v1/adapters/plain/content?format={fmt}")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path / fmt)
        loaded = PeftModel.from_pretrained(tiny_llama(seed=7), tmp_path / fmt).eval()
        assert loaded.peft_config["default"].peft_type.value == "LORA"
        with torch.no_grad():
            assert rel_err(loaded(input_ids).logits, ref) < 1e-6
    native = (await api.get("/v1/adapters/plain/content")).content
    assert isinstance(decode_lora(native, max_bytes=len(native)), LoRAAdapter)
    r = await api.put("/v1/adapters/copy", content=native, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert (await api.get("/v1/adapters/copy/content")).content == native  # canonical bytes

    # Served: the chat route answers with it, greedy, as with any adapter.
    r = await api.post("/v1/completions", json={"model": "plain", "prompt": "Hi", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text


def _nan_first_a(tensors: dict) -> None:
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")


def _transpose_first_b(tensors: dict) -> None:
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key].T.contiguous()


@pytest.mark.parametrize(
    ("edit_config", "edit_tensors", "field"),
    [
        (lambda c: c.update(use_dora=True), None, "adapter_config.json.use_dora"),
        (lambda c: c.update(rank_pattern={"q_proj": 4}), None, "adapter_config.json.rank_pattern"),
        (lambda c: c.update(bogus=1), None, "adapter_config.json.bogus"),
        (lambda c: c.update(lora_alpha=float("inf")), None, "adapter_config.json"),
        (lambda c: c.update(lora_alpha=-2), None, "adapter_config.json.lora_alpha"),
        (lambda c: c.update(target_modules=["k_proj"]), None, "adapter_config.json.target_modules"),
        (None, _nan_first_a, None),
        (None, _transpose_first_b, None),
    ],
    ids=["dora", "rank-pattern", "unknown-field", "alpha-inf", "alpha-negative", "untargeted", "nan", "shape"],
)
async def test_a_bad_lora_checkpoint_is_refused_and_nothing_stored(api, tmp_path, edit_config, edit_tensors, field):  # noqa: F811
    path = saved(peft_lora(tiny_llama(seed=7), r=4, alpha=8, seed=91), tmp_path / "peft")
    r = await api.put("/v1/adapters/bad", files=checkpoint_files(path, edit_config, edit_tensors))
    assert r.status_code == 400, r.text
    if field is not None:
        assert r.json()["error"]["field"] == field, r.json()
    assert (await api.get("/v1/adapters")).json()["data"] == []


async def test_a_lora_of_a_rank_above_the_servers_limit_is_refused(api, tmp_path):  # noqa: F811
    path = saved(peft_lora(tiny_llama(seed=7), r=16, alpha=16, seed=92), tmp_path / "peft")  # the server's max is 8
    r = await api.put("/v1/adapters/wide", files=checkpoint_files(path))
    assert r.status_code == 400 and r.json()["error"]["field"] == "r", r.text
    assert (await api.get("/v1/adapters")).json()["data"] == []
