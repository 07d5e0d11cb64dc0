"""The official `openai` package, unchanged, fine-tunes through a real `vbserve serve`
process (the tiny model saved as a model folder, SQLite store, the embedded worker in its
child process, two tenants): files.create/list/retrieve/content/delete, then
fine_tuning.jobs.create/retrieve/list_events/checkpoints/cancel, and the trained adapter
serves as `model`. Another tenant sees none of it, and every refused field is a 400
naming it, storing nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.test_api import chat_tokenizer
from tests.test_replicas import replica, wait_ready
from tests.test_training import TASK, TASK_FILE, task_model
from vbserve.training import parse_jsonl

ADMIN_KEY = "admin-key-for-the-openai-tests-0123456789"
# A job of a few seconds: 4 rows, one step per epoch, a small bank on two modules.
TINY = {"target_modules": ["q_proj", "v_proj"], "vector_length": 16, "num_vectors": 32, "max_seq_len": 32}
N_EPOCHS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """(URL, {tenant: API key}) of a live server with tenants acme and globex."""
    path = tmp_path_factory.mktemp("openai-finetune")
    task_model().save_pretrained(path / "model")
    chat_tokenizer().save_pretrained(path / "model")
    settings = {"VBSERVE_TRAINING_ENABLED": "true", "VBSERVE_ADMIN_KEY": ADMIN_KEY}
    with replica(path / "model", f"sqlite:///{path / 'adapters.db'}", "vbs", path / "server.log", settings) as proc:
        wait_ready(proc)
        keys = {}
        with httpx.Client(base_url=proc.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            for name in ("acme", "globex"):
                admin.post("/v1/admin/tenants", json={"name": name}).raise_for_status()
                keys[name] = admin.post(f"/v1/admin/tenants/{name}/keys", json={}).json()["key"]
        yield proc.url, keys


def client_of(server: tuple[str, dict[str, str]], tenant: str) -> openai.OpenAI:
    url, keys = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key=keys[tenant], max_retries=0, timeout=60)


def wait_until_ended(client: openai.OpenAI, job_id: str, timeout_s: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status}: {job}"
        time.sleep(0.2)
    return job


def test_files_and_a_fine_tuning_job_through_the_openai_package(server) -> None:
    client = client_of(server, "acme")
    base = client.models.list().data[0].id

    uploaded = client.files.create(file=("train.jsonl", TASK_FILE), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.object == "file" and uploaded.status == "processed"
    assert (uploaded.filename, uploaded.bytes, uploaded.purpose) == ("train.jsonl", len(TASK_FILE), "fine-tune")
    assert client.files.retrieve(uploaded.id) == uploaded
    assert [f.id for f in client.files.list().data] == [uploaded.id]
    assert client.files.content(uploaded.id).content == TASK_FILE

    job = client.fine_tuning.jobs.create(
        model=base,
        training_file=uploaded.id,
        validation_file=uploaded.id,
        suffix="lookup",
        seed=7,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": N_EPOCHS, "batch_size": 4, "learning_rate_multiplier": 2}},
        },
        extra_body={"vblora": TINY},
    )
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running") and job.model == base
    assert (job.training_file, job.validation_file, job.seed) == (uploaded.id, uploaded.id, 7)
    assert job.fine_tuned_model is None and job.trained_tokens is None
    hp = job.hyperparameters.model_dump()
    assert (hp["n_epochs"], hp["batch_size"], hp["learning_rate_multiplier"]) == (N_EPOCHS, 4, pytest.approx(2))
    assert (hp["lr_bank"], hp["lr_logits"], hp["r"]) == (pytest.approx(2e-2), pytest.approx(0.2), 4)  # VB-LoRA's own
    assert job.method.type == "supervised"
    assert job.method.supervised.hyperparameters.n_epochs == N_EPOCHS

    # A second job, cancelled while the first one holds the worker.
    second = client.fine_tuning.jobs.create(
        model=base, training_file=uploaded.id, extra_body={"vblora": {**TINY, "max_steps": 1_000_000}}
    )
    assert second.hyperparameters.n_epochs == "auto"  # no epochs given: the server's, from the data size
    cancelled = client.fine_tuning.jobs.cancel(second.id)
    assert cancelled.id == second.id and (cancelled.status == "cancelled" or cancelled.cancel_requested)
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id

    done = wait_until_ended(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft-lookup-") and done.finished_at >= done.created_at
    rows = parse_jsonl(TASK_FILE, chat_tokenizer(), max_seq_len=32)
    assert done.trained_tokens == N_EPOCHS * sum(len(row.input_ids) for row in rows)
    assert wait_until_ended(client, second.id).status == "cancelled"
    assert {j.id for j in client.fine_tuning.jobs.list().data} == {job.id, second.id}

    events = client.fine_tuning.jobs.list_events(job.id).data
    assert [e.data["step"] for e in events] == list(range(1, N_EPOCHS + 1))
    assert all(e.object == "fine_tuning.job.event" and e.level == "info" and e.type == "metrics" for e in events)
    assert events[-1].message.startswith(f"Step {N_EPOCHS}/{N_EPOCHS}: training loss=")
    assert len({e.id for e in events}) == len(events)
    [checkpoint] = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoint.object == "fine_tuning.job.checkpoint" and checkpoint.fine_tuning_job_id == job.id
    assert checkpoint.fine_tuned_model_checkpoint == done.fine_tuned_model
    assert checkpoint.metrics.train_loss == events[-1].data["train_loss"]
    assert client.fine_tuning.jobs.checkpoints.list(second.id).data == []

    for prompt in TASK:
        completion = client.completions.create(model=done.fine_tuned_model, prompt=prompt, max_tokens=4)
        assert completion.model == done.fine_tuned_model and completion.choices[0].finish_reason in ("stop", "length")

    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (uploaded.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert client.files.list().data == []
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"  # a job keeps its own copy


def test_another_tenant_sees_neither_the_file_nor_the_job(server) -> None:
    acme, globex = client_of(server, "acme"), client_of(server, "globex")
    base = acme.models.list().data[0].id
    uploaded = acme.files.create(file=("train.jsonl", TASK_FILE), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(
        model=base, training_file=uploaded.id, extra_body={"vblora": {**TINY, "max_steps": 1_000_000}}
    )
    try:
        for call in (globex.files.retrieve, globex.files.content, globex.files.delete):
            with pytest.raises(openai.NotFoundError):
                call(uploaded.id)
        for call in (
            globex.fine_tuning.jobs.retrieve,
            globex.fine_tuning.jobs.list_events,
            globex.fine_tuning.jobs.checkpoints.list,
            globex.fine_tuning.jobs.cancel,
        ):
            with pytest.raises(openai.NotFoundError):
                call(job.id)
        assert globex.files.list().data == [] and globex.fine_tuning.jobs.list().data == []
        with pytest.raises(openai.BadRequestError) as caught:  # acme's file is no file of globex's
            globex.fine_tuning.jobs.create(model=base, training_file=uploaded.id)
        assert caught.value.response.json()["error"]["field"] == "training_file"
        assert acme.files.content(uploaded.id).content == TASK_FILE
    finally:
        acme.fine_tuning.jobs.cancel(job.id)
        acme.files.delete(uploaded.id)


REFUSED_JOBS = [
    ({"model": "not-the-base"}, "model"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}}, "method.type"),
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"training_file": "file-nope"}, "training_file"),
    ({"validation_file": "file-nope"}, "validation_file"),
    ({"suffix": "a/b"}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 10_000}}, "hyperparameters.batch_size"),
    (
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}}}},
        "method.supervised.hyperparameters.learning_rate_multiplier",
    ),
    (
        {"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised", "supervised": {}}},
        "hyperparameters",
    ),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}, "integrations"),
    ({"extra_body": {"vblora": {"r": 1000}}}, "vblora.r"),
    ({"extra_body": {"vblora": {"target_modules": ["no_such_layer"]}}}, "vblora.target_modules"),
    ({"extra_body": {"vblora": {"no_such_knob": 1}}}, "vblora.no_such_knob"),
    ({"hyperparameters": {"n_epochs": 2}, "extra_body": {"vblora": {"epochs": 3}}}, "vblora.epochs"),
    ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
]


@pytest.mark.parametrize(("change", "field"), REFUSED_JOBS, ids=[field for _, field in REFUSED_JOBS])
def test_each_refused_job_field_is_a_400_naming_it(server, change: dict, field: str) -> None:
    client = client_of(server, "acme")
    uploaded = client.files.create(file=("train.jsonl", TASK_FILE), purpose="fine-tune")
    jobs_before = client.fine_tuning.jobs.list().data
    request = {"model": client.models.list().data[0].id, "training_file": uploaded.id, **change}
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(**request)
        error = caught.value.response.json()["error"]
        assert error["field"] == field, error
        assert client.fine_tuning.jobs.list().data == jobs_before  # nothing queued
    finally:
        client.files.delete(uploaded.id)


REFUSED_FILES = [
    ({"purpose": "assistants"}, "purpose"),
    ({"file": ("train.jsonl", b"")}, "file"),
    ({"file": ("train.jsonl", b"not json\n")}, "file line 1"),
    ({"file": ("train.jsonl", TASK_FILE + b'\n{"prompt": "key9:"}')}, "file line 5"),
    ({"file": ("train.jsonl", b'{"messages": [{"role": "robot", "content": "x"}]}')}, "file line 1.messages"),
]


@pytest.mark.parametrize(("change", "field"), REFUSED_FILES, ids=[field for _, field in REFUSED_FILES])
def test_each_refused_upload_is_a_400_naming_its_field(server, change: dict, field: str) -> None:
    client = client_of(server, "acme")
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(**{"file": ("train.jsonl", TASK_FILE), "purpose": "fine-tune", **change})
    error = caught.value.response.json()["error"]
    assert error["field"] == field, error
    assert client.files.list().data == []  # nothing stored
