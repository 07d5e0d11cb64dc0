"""Bring your LoRA: a VB-LoRA adapter fitted to a plain LoRA adapter (`vbserve.training.fit`).

A LoRA exported from a VB-LoRA adapter is recovered exactly against that adapter's bank,
which stays unchanged; with a new bank the fit is deterministic and cuts the error; a
fitted adapter's model gives PEFT's `PeftModel` logits; and over HTTP a fit_lora job
converts a tenant's uploaded LoRA, publishes a VB-LoRA adapter that serves, reports the
fit error and the output agreement, and every bad request is a 4xx naming its field
that queues nothing."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.conftest import described, rel_err, tiny_llama
from tests.test_api import error_of
from tests.test_engine import random_adapter
from tests.test_jobs_api import api as api
from tests.test_jobs_api import ended, wait_for
from tests.test_mixtures import composed, served_logits
from tests.test_training import one_torch_thread as one_torch_thread
from tests.test_training import task_model
from vbserve.api import current_tenant
from vbserve.training.fit import fit_vblora, output_agreement
from vbserve.training.hyperparams import TrainingHyperparameters
from vbserve.training.prepare import with_fit_defaults
from vbserve.vblora.lora_export import to_lora
from vbserve_store import AdapterConfig, encode_adapter
from vbserve_store.peft_io import load_peft_dir

TARGETS = ("q_proj", "v_proj")


def peft_lora(base, tmp_path, *, r=4, alpha=8, seed=0, scale=0.3, targets=TARGETS):
    """A PEFT LoRA model over a copy of `base`, random A and B, saved under tmp_path/lora."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(tmp_path / "lora")
    return model.eval(), tmp_path / "lora"


def vb_config(lora, *, r=4, b=16, h=128, k=2) -> AdapterConfig:
    return AdapterConfig(lora.config.modules, r=r, vector_length=b, num_vectors=h, topk=k)


# -- the fit --------------------------------------------------------------------------------


def test_a_lora_made_from_a_vblora_adapter_is_recovered_against_its_frozen_bank():
    vblora = random_adapter(tiny_llama(seed=3), seed=4, targets=("q_proj", "v_proj", "down_proj"), r=4, b=16, h=32)
    lora = to_lora(vblora)
    result = fit_vblora(
        lora, vblora.config, steps=20, lr_bank=5e-3, lr_logits=5e-2, frozen_bank=vblora.bank, save_dtype=torch.float32
    )
    assert result.rel_error < 1e-3 and max(result.module_errors.values()) < 1e-3, result.module_errors
    assert torch.equal(result.adapter.bank, vblora.bank) and result.adapter.bank_id == vblora.bank_id
    mats = composed(result.adapter)
    for name, (a, b) in composed(vblora).items():
        assert rel_err(mats[name][1] @ mats[name][0], b @ a) < 1e-3


def test_a_new_bank_fit_is_deterministic_and_cuts_the_error():
    vblora = random_adapter(tiny_llama(seed=3), seed=4, targets=("q_proj", "v_proj", "down_proj"), r=4, b=16, h=32)
    lora = to_lora(vblora)
    seen = []
    runs = [
        fit_vblora(lora, vblora.config, steps=30, lr_bank=5e-3, lr_logits=5e-2, seed=1, on_progress=seen.append)
        for _ in range(2)
    ]
    assert torch.equal(runs[0].adapter.indices, runs[1].adapter.indices)
    assert torch.equal(runs[0].adapter.weights, runs[1].adapter.weights)
    assert torch.equal(runs[0].adapter.bank, runs[1].adapter.bank)
    # 208 sub-vectors coded by 32 vectors, two at a time: the dictionary learning finds a
    # local optimum (0.25 measured), far below the zero adapter's 1.0, not the exact bank.
    assert runs[0].rel_error < 0.3, runs[0].rel_error
    assert [p.step for p in seen[:30]] == list(range(1, 31)) and seen[-1].total_steps == 30
    assert seen[-1].rel_error <= seen[0].rel_error
    assert math.isclose(runs[0].rel_error, seen[-1].rel_error, rel_tol=0.05)  # float16 storage changes little


def test_the_fitted_adapter_gives_peft_lora_logits(tmp_path):
    """With more bank vectors than sub-vectors every sub-vector can have its own: the fit
    must then reproduce the LoRA, and the served adapter PEFT's LoRA model."""
    base = tiny_llama(seed=21)
    oracle, path = peft_lora(base, tmp_path, r=4, alpha=8, seed=22)
    lora = load_peft_dir(path)
    result = fit_vblora(lora, vb_config(lora, h=128), steps=50, lr_bank=5e-3, lr_logits=5e-2)
    assert result.rel_error < 5e-3, result.module_errors  # float16 bank and weights
    input_ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        ref, plain = oracle(input_ids).logits, base(input_ids).logits
    ours = served_logits(base, composed(result.adapter), input_ids)
    assert rel_err(ref - plain, plain) > 1e-2, "the LoRA must move the logits"
    assert rel_err(ours - plain, ref - plain) < 1e-2
    agreement = output_agreement(base, lora, result.adapter)
    assert agreement.rel_error < 1e-2 and agreement.top1_agreement == 1.0, agreement
    assert not base.training


def test_a_smaller_rank_fits_the_best_it_can(tmp_path):
    """A rank-8 LoRA fitted at rank 2: no better than its best rank-2 approximation."""
    lora = load_peft_dir(peft_lora(tiny_llama(seed=31), tmp_path, r=8, alpha=16, seed=32)[1])
    result = fit_vblora(lora, vb_config(lora, r=2, h=256), steps=20, lr_bank=5e-3, lr_logits=5e-2)
    s, best_err2, total = lora.config.scaling, 0.0, 0.0
    for a, b in lora.matrices().values():
        singular = torch.linalg.svdvals((b.double() * s) @ a.double())
        best_err2, total = best_err2 + float((singular[2:] ** 2).sum()), total + float((singular**2).sum())
    assert math.sqrt(best_err2 / total) - 1e-6 <= result.rel_error < 1.0


@pytest.mark.parametrize("k", [1, 3])
def test_other_topk_fit(k, tmp_path):
    lora = load_peft_dir(peft_lora(tiny_llama(seed=31), tmp_path)[1])
    result = fit_vblora(lora, vb_config(lora, h=32, k=k), steps=10, lr_bank=5e-3, lr_logits=5e-2)
    assert result.adapter.config.topk == k and result.rel_error < 0.9, result.rel_error


def test_a_config_not_on_the_loras_modules_is_refused(tmp_path):
    lora = load_peft_dir(peft_lora(tiny_llama(seed=31), tmp_path)[1])
    other = random_adapter(tiny_llama(seed=31), seed=1, targets=("q_proj",)).config
    with pytest.raises(ValueError, match="modules"):
        fit_vblora(lora, other, steps=1, lr_bank=1e-3, lr_logits=1e-2)


def test_fit_defaults_come_from_the_source(tmp_path):
    lora = load_peft_dir(peft_lora(tiny_llama(seed=31), tmp_path, r=8, alpha=16)[1])
    spec = described(tiny_llama(seed=31))
    shapes = dict(spec.module_shapes)
    hp = with_fit_defaults(TrainingHyperparameters.parse({"method": "fit_lora", "source_adapter": "x"}), lora, spec)
    assert (hp.target_modules, hp.r, hp.max_steps) == (["q_proj", "v_proj"], 8, 200)
    only_layer_0 = {n: v for n, v in shapes.items() if ".0." in n or not n.endswith(TARGETS)}
    shapes_more = {**only_layer_0, **{n.replace(".0.", ".1."): v for n, v in only_layer_0.items()}}
    assert with_fit_defaults(hp, lora, replace(spec, module_shapes=shapes_more)).target_modules == ["q_proj", "v_proj"]  # set: kept
    unset = TrainingHyperparameters.parse({"method": "fit_lora", "source_adapter": "x", "r": 2})
    extra = {**shapes, "model.layers.2.self_attn.q_proj": (64, 64)}  # q_proj would select a module more
    fitted = with_fit_defaults(unset, lora, replace(spec, module_shapes=extra))
    assert fitted.r == 2 and fitted.target_modules == sorted(m.name for m in lora.config.modules)


# -- the job over HTTP ----------------------------------------------------------------------


def lora_upload(path) -> dict:
    return {name: (name, (path / name).read_bytes()) for name in ("adapter_config.json", "adapter_model.safetensors")}


FIT_FORM = {"adapter": "vb", "method": "fit_lora", "source_adapter": "src", "vector_length": "16", "num_vectors": "128"}


async def post_fit(api: httpx.AsyncClient, form: dict, files: dict | None = None) -> httpx.Response:
    """The job form as multipart/form-data (no files: httpx would send it urlencoded)."""
    fields = {name: (None, value) for name, value in form.items()}
    return await api.post("/v1/fine_tuning/jobs", files={**fields, **(files or {})})


async def put_lora(api: httpx.AsyncClient, tmp_path, name: str = "src", **kw) -> None:
    _, path = peft_lora(task_model(), tmp_path, **kw)
    r = await api.put(f"/v1/adapters/{name}", files=lora_upload(path))
    assert r.status_code in (200, 201), r.text


async def test_a_fit_job_converts_an_uploaded_lora_and_serves_it(api, tmp_path):
    await put_lora(api, tmp_path, r=4, alpha=8, scale=0.1)
    r = await post_fit(api, FIT_FORM)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["method"] == {"type": "fit_lora", "fit_lora": {"source_adapter": "src"}}
    hp = job["hyperparameters"]
    assert (hp["r"], hp["target_modules"], hp["max_steps"]) == (4, ["q_proj", "v_proj"], 200)
    await api.delete("/v1/adapters/src")  # the job has its own copy of the source
    job = await wait_for(api, job["id"], ended, timeout=120)
    assert job["status"] == "succeeded", job
    events = (await api.get(f"/v1/fine_tuning/jobs/{job['id']}/events")).json()["data"]
    last = events[-1]
    assert last["step"] == last["total_steps"] == 200 and "fit error=" in last["message"]
    assert last["loss"] < 5e-3 and last["output_rel_error"] < 2e-2 and last["top1_agreement"] == 1.0, last
    assert job["progress"]["loss"] == last["loss"]
    [checkpoint] = (await api.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")).json()["data"]
    assert checkpoint["metrics"]["train_loss"] == last["loss"]
    assert checkpoint["metrics"]["top1_agreement"] == last["top1_agreement"] == 1.0
    info = (await api.get("/v1/adapters/vb")).json()
    assert info["bank_id"] and info["config"]["num_vectors"] == 128 and info["config"]["r"] == 4
    r = await api.post("/v1/completions", json={"model": "vb", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text


async def test_a_fit_job_is_cancelled_between_steps_and_publishes_nothing(api, tmp_path):
    await put_lora(api, tmp_path)
    r = await post_fit(api, {**FIT_FORM, "max_steps": "1000000"})
    assert r.status_code == 201, r.text
    job = await wait_for(api, r.json()["id"], lambda j: j["progress"]["step"] > 0, timeout=120)
    assert job["progress"]["total_steps"] == 1000000 and 0 <= job["progress"]["loss"] < 1
    await api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    job = await wait_for(api, job["id"], ended, timeout=60)
    assert job["status"] == "cancelled", job
    assert (await api.get("/v1/adapters/vb")).status_code == 404


async def test_a_fit_against_an_existing_bank_keeps_it(api, tmp_path):
    await put_lora(api, tmp_path)
    family = random_adapter(task_model(), seed=5, targets=("q_proj",), r=4, b=16, h=64)
    r = await api.put("/v1/adapters/family", content=encode_adapter(family))
    assert r.status_code in (200, 201), r.text
    form = {"adapter": "vb", "method": "fit_lora", "source_adapter": "src", "bank_of": "family", "max_steps": "5"}
    r = await post_fit(api, form)
    assert r.status_code == 201, r.text
    job = await wait_for(api, r.json()["id"], ended, timeout=120)
    assert job["status"] == "succeeded", job
    info = (await api.get("/v1/adapters/vb")).json()
    assert info["bank_id"] == family.bank_id and info["config"]["num_vectors"] == 64


@pytest.mark.parametrize(
    "form, status, field",
    [
        ({"source_adapter": "nope"}, 404, "hyperparameters.source_adapter"),
        ({"source_adapter": "vblora"}, 400, "hyperparameters.source_adapter"),
        ({"source_adapter": None}, 400, "hyperparameters.source_adapter"),
        ({"method": None}, 400, "hyperparameters.source_adapter"),
        ({"target_modules": "q_proj"}, 400, "hyperparameters.target_modules"),
        ({"target_modules": "q_proj,v_proj,o_proj"}, 400, "hyperparameters.target_modules"),
        ({"r": "64"}, 400, "hyperparameters.r"),
        ({"vector_length": "48"}, 400, "hyperparameters.vector_length"),
        ({"bank_id": "sha256-" + "0" * 40}, 404, "hyperparameters.bank_id"),
        ({"bank_of": "src"}, 400, "hyperparameters.bank_of"),
        ({"num_vectors": "4096"}, 400, "hyperparameters.num_vectors"),
    ],
)
async def test_bad_fit_jobs_are_refused_naming_the_field(api, tmp_path, form, status, field):
    await put_lora(api, tmp_path)
    r = await api.put("/v1/adapters/vblora", content=_vblora_blob())
    assert r.status_code in (200, 201), r.text
    data = {k: v for k, v in {**FIT_FORM, **form}.items() if v is not None}
    r = await post_fit(api, data)
    assert (r.status_code, error_of(r)["field"]) == (status, field), r.text
    assert (await api.get("/v1/fine_tuning/jobs")).json()["data"] == []


async def test_a_fit_job_takes_no_files_and_no_openai_body(api, tmp_path):
    await put_lora(api, tmp_path)
    files = {"training_file": ("t.jsonl", b'{"prompt": "a", "completion": "b"}', "application/jsonl")}
    r = await post_fit(api, FIT_FORM, files)
    assert (r.status_code, error_of(r)["field"]) == (400, "training_file"), r.text
    model = (await api.get("/v1/models")).json()["data"][0]["id"]
    body = {"model": model, "training_file": "file-x", "vblora": {"method": "fit_lora", "source_adapter": "src"}}
    r = await api.post("/v1/fine_tuning/jobs", json=body)
    assert (r.status_code, error_of(r)["field"]) == (400, "vblora.method"), r.text
    assert (await api.get("/v1/fine_tuning/jobs")).json()["data"] == []


async def test_a_source_too_large_to_copy_is_413(api, tmp_path):
    """The job copies its source, within the training file limit (64 KiB here)."""
    await put_lora(
        api, tmp_path, r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    r = await post_fit(api, {**FIT_FORM, "vector_length": "32"})
    assert (r.status_code, error_of(r)["field"]) == (413, "hyperparameters.source_adapter"), r.text
    assert (await api.get("/v1/fine_tuning/jobs")).json()["data"] == []


async def test_another_tenants_lora_and_bank_are_not_found(api, tmp_path):
    await put_lora(api, tmp_path)
    r = await api.put("/v1/adapters/vblora", content=_vblora_blob())
    assert r.status_code in (200, 201), r.text
    bank_id = r.json()["bank_id"]
    api.app.dependency_overrides[current_tenant] = lambda: "globex"
    try:
        r = await post_fit(api, FIT_FORM)
        assert (r.status_code, error_of(r)["field"]) == (404, "hyperparameters.source_adapter"), r.text
        await put_lora(api, tmp_path)  # globex's own "src"
        r = await post_fit(api, {**FIT_FORM, "bank_id": bank_id})
        assert (r.status_code, error_of(r)["field"]) == (404, "hyperparameters.bank_id"), r.text
        assert (await api.get("/v1/fine_tuning/jobs")).json()["data"] == []
    finally:
        del api.app.dependency_overrides[current_tenant]


def _vblora_blob() -> bytes:
    return encode_adapter(random_adapter(task_model(), seed=9, targets=TARGETS, r=4, b=16, h=32))
