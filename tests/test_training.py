"""The VB-LoRA trainer on a tiny random Llama: it learns a made-up task that greedy
serving then reproduces, its forward equals PEFT's, gradients reach logits and bank,
runs are deterministic; and every dataset and hyperparameter rule is refused with a
typed error naming the field."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch

from tests.conftest import byte_tokenizer, described, engine_over, tiny_llama
from vbserve.engine import AdapterRef, GenerationRequest, SamplingParams
from vbserve.model import module_shapes
from vbserve.settings import Settings
from vbserve.training import (
    DatasetError,
    DatasetLimits,
    DatasetTooLargeError,
    HyperparameterError,
    TrainingCancelled,
    TrainingHyperparameters,
    parse_jsonl,
    prepare_job,
    published_bytes,
    train_adapter,
)
from vbserve.training.data import IGNORE_INDEX, Example
from vbserve.training.trainer import (
    Progress,
    VBLoRAParameters,
    collate,
    evaluate,
    exact_match,
    lora_hooks,
    loss_sum,
    plan_batches,
    target_count,
)
from vbserve_store import bank_id_of
from vbserve_store.store import SQLiteAdapterStore

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASK = {"key0:": "apple", "key1:": "river", "key2:": "stone", "key3:": "cloud"}


def task_model(seed: int = 3) -> torch.nn.Module:
    """The tiny Llama with a larger LM head. A random head of std 0.02 after RMSNorm caps
    every logit near 1, so no adapter could make one token clearly win; scaled by 10 the
    model can express a confident answer, as a trained model can."""
    model = tiny_llama(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


def jsonl(rows: list[object]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and two threads spinning on a shared 2-core
    machine can make them a hundred times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TASK_FILE = jsonl([{"prompt": p, "completion": c} for p, c in TASK.items()])
TASK_HP = TrainingHyperparameters(
    target_modules=ALL_LINEAR,
    r=4,
    vector_length=16,
    num_vectors=64,
    max_steps=120,
    batch_size=4,
    lr_bank=2e-2,
    lr_logits=5e-2,
    warmup_ratio=0.0,
    max_seq_len=32,
)


# -- training -----------------------------------------------------------------------------


async def test_trained_adapter_learns_the_task_and_serves_it(tmp_path) -> None:
    model, tok = task_model(), byte_tokenizer()
    job = prepare_job(described(model), tok, TASK_HP, TASK_FILE)
    progress: list[Progress] = []
    result = train_adapter(model, job.train, TASK_HP, job.config, on_progress=progress.append, pad_token_id=0)
    losses = [p.loss for p in progress]
    assert [p.step for p in progress] == list(range(1, 121)) and all(p.total_steps == 120 for p in progress)
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    assert result.steps == 120 and result.train_loss == losses[-1] and result.tokens_per_s > 0
    assert result.adapter.weights.dtype == torch.float16  # save_dtype default

    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    assert store.put("acme", "lookup", result.adapter).version == 1
    settings = Settings(max_batch_size=4, max_queue=8, max_adapter_slots=2, max_lora_rank=8, max_model_len=64)
    engine = engine_over(model, tok, store, settings)
    try:
        for prompt, completion in TASK.items():
            ids = tok.encode(prompt)
            tuned = await (await engine.submit(_greedy(ids, AdapterRef("acme", "lookup")))).result()
            base = await (await engine.submit(_greedy(ids, None))).result()
            assert tuned.text.startswith(completion), (prompt, tuned.text)
            assert not base.text.startswith(completion)
    finally:
        engine.shutdown()
        store.close()


def _greedy(ids: list[int], adapter: AdapterRef | None) -> GenerationRequest:
    return GenerationRequest(prompt_ids=ids, adapter=adapter, sampling=SamplingParams(max_new_tokens=8))


def test_forward_matches_peft_and_gradients_reach_logits_and_bank() -> None:
    from peft import VBLoRAConfig, get_peft_model

    base, tok = tiny_llama(seed=1).requires_grad_(False), byte_tokenizer()
    hp = TrainingHyperparameters(target_modules=["q_proj", "v_proj", "down_proj"], r=2, vector_length=16, num_vectors=8)
    config = hp.check_fits(module_shapes(base))
    params = VBLoRAParameters(config, seed=4)
    with torch.no_grad():  # large enough that the adapter visibly changes the output
        params.bank.mul_(50)
    peft_model = get_peft_model(
        copy.deepcopy(base),
        VBLoRAConfig(r=2, vector_length=16, num_vectors=8, topk=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    params.copy_into_peft(peft_model)
    ids = torch.tensor([tok.encode("hello world")])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        ref = peft_model(input_ids=ids).logits
    with lora_hooks(base, params) as refresh:
        refresh()
        ours = base(input_ids=ids).logits
        ours.float().square().mean().backward()
    assert not torch.allclose(ref, plain, atol=1e-3)
    torch.testing.assert_close(ours.detach(), ref, rtol=1e-5, atol=1e-5)
    for grad in (params.logits.grad, params.bank.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Only the top-k logits of each sub-vector are in the graph.
    assert int((params.logits.grad != 0).sum(-1).max()) <= config.topk
    assert all(p.grad is None for p in base.parameters())
    # The hooks are gone afterwards: the base model is itself again.
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, plain)


def test_loss_on_labelled_positions_only_equals_the_full_loss() -> None:
    """`loss_sum` asks the model for logits only where a label follows; the loss is the
    same as from all logits (what a model without `logits_to_keep` gets)."""
    model = tiny_llama(seed=2)
    batch = [Example([5, 6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]), Example([1, 2, 3], [IGNORE_INDEX, 2, 3])]
    ids, mask, labels = collate(batch, pad_token_id=0)
    full = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(
        full.reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    torch.testing.assert_close(loss_sum(model, ids, mask, labels), expected)
    assert target_count(batch) == 5


def test_training_is_deterministic_for_a_seed() -> None:
    tok = byte_tokenizer()
    hp = TASK_HP.model_copy(update={"max_steps": 5})

    def run(seed: int):
        model = task_model()
        job = prepare_job(described(model), tok, hp, TASK_FILE)
        return train_adapter(model, job.train, hp.model_copy(update={"seed": seed}), job.config).adapter

    a, b, c = run(0), run(0), run(1)
    assert a.bank_id == b.bank_id and torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert a.bank_id != c.bank_id


def test_gradient_accumulation_equals_one_large_batch() -> None:
    tok = byte_tokenizer()
    rows = jsonl([{"prompt": f"k{i}", "completion": f"v{i}x"} for i in range(4)])  # equal lengths: no padding

    def run(batch_size: int, accum: int):
        model = task_model()
        hp = TASK_HP.model_copy(update={"max_steps": 2, "batch_size": batch_size, "grad_accum_steps": accum})
        job = prepare_job(described(model), tok, hp, rows)
        return train_adapter(model, job.train, hp, job.config)

    one, accumulated = run(4, 1), run(2, 2)
    assert torch.equal(one.adapter.indices, accumulated.adapter.indices)
    torch.testing.assert_close(one.adapter.bank.float(), accumulated.adapter.bank.float(), atol=2e-3, rtol=0)
    assert abs(one.train_loss - accumulated.train_loss) < 1e-4


def test_micro_batches_bound_each_forward_and_train_as_one_batch() -> None:
    """A job's memory is bounded by the padded tokens of one forward, not by its batch
    size: with a token budget each batch is cut into micro-batches that fit, and the
    adapter, the loss and the validation loss are those of the uncut batch."""
    tok = byte_tokenizer()
    rows = jsonl([{"prompt": f"key{i}:" + "p" * (i % 5), "completion": "c" * (1 + i % 3)} for i in range(12)])
    validation = jsonl([{"prompt": "key0:", "completion": "apple"}, {"prompt": "key12:pp", "completion": "c"}])

    def run(max_batch_tokens: int | None) -> tuple:
        model = task_model()
        widths: list[int] = []  # padded tokens of every forward
        model.register_forward_pre_hook(lambda _, args, kw: widths.append(kw["input_ids"].numel()), with_kwargs=True)
        hp = TASK_HP.model_copy(update={"max_steps": 3, "batch_size": 12, "max_seq_len": 16})
        job = prepare_job(described(model), tok, hp, rows, validation)
        result = train_adapter(
            model, job.train, hp, job.config, val_examples=job.validation, max_batch_tokens=max_batch_tokens
        )
        return result, widths

    whole, whole_widths = run(None)
    cut, cut_widths = run(16)  # one row of max_seq_len fits; 12 rows of up to 13 tokens do not
    assert max(whole_widths) > 16 >= max(cut_widths) and len(cut_widths) > len(whole_widths)
    assert torch.equal(whole.adapter.indices, cut.adapter.indices)
    torch.testing.assert_close(whole.adapter.bank.float(), cut.adapter.bank.float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(whole.adapter.weights.float(), cut.adapter.weights.float(), atol=2e-3, rtol=0)
    assert abs(whole.train_loss - cut.train_loss) < 1e-4 and abs(whole.val_loss - cut.val_loss) < 1e-4


def adapter_val_loss(model: torch.nn.Module, adapter, examples: list[Example]) -> float:
    """The validation loss of a finished adapter: logits whose top-k are its indices and
    whose softmax there is its weights, against its own bank."""
    params = VBLoRAParameters(adapter.config, seed=0, frozen_bank=adapter.bank)
    with torch.no_grad():
        logits = torch.full_like(params.logits, -1e9)
        params.logits.copy_(logits.scatter_(1, adapter.indices.long(), adapter.weights.float().log()))
    with lora_hooks(model, params) as refresh:
        return evaluate(model, refresh, examples, 4, 0)


def test_best_checkpoint_is_published_and_early_stopping_ends_training() -> None:
    """Validation rows that contradict the training rows: validation loss soon rises, so
    the best checkpoint is an early one, the published adapter is that one (its loss
    recomputed from the stored indices and weights), and patience ends the run early."""
    model, tok = task_model(), byte_tokenizer()
    contradicting = jsonl([{"prompt": p, "completion": "zz"} for p in TASK])
    hp = TASK_HP.model_copy(update={"eval_steps": 10, "early_stopping_patience": 2})
    job = prepare_job(described(model), tok, hp, TASK_FILE, contradicting)
    seen: list[Progress] = []
    result = train_adapter(model, job.train, hp, job.config, val_examples=job.validation, on_progress=seen.append)
    validated = [p for p in seen if p.val_loss is not None]
    assert [p.step for p in validated] == list(range(10, result.steps + 1, 10))
    best = min(validated, key=lambda p: p.val_loss)
    assert result.stopped_early and result.steps < 120 and result.steps == validated[-1].step
    assert [p.step for p in validated[-2:]] == [best.step + 10, best.step + 20]  # patience 2
    assert (
        (result.best_step, result.val_loss)
        == (best.step, best.val_loss)
        == (seen[-1].best_step, seen[-1].best_val_loss)
    )
    published = adapter_val_loss(model, result.adapter, job.validation)
    assert abs(published - best.val_loss) < 0.02 * best.val_loss < validated[-1].val_loss - published


def test_exact_match_on_validation_rows() -> None:
    """Greedy generation of the validation rows: none match before training, all after
    (the task the serving test reproduces); only the first `eval_exact_match_rows` count."""
    model, tok = task_model(), byte_tokenizer()
    hp = TASK_HP.model_copy(update={"eval_steps": 60, "eval_exact_match_rows": 3})
    job = prepare_job(described(model), tok, hp, TASK_FILE, TASK_FILE)
    untrained = VBLoRAParameters(job.config, seed=hp.seed)
    with lora_hooks(model, untrained) as refresh:
        assert exact_match(model, refresh, job.validation, 0) == 0.0
    seen: list[Progress] = []
    train_adapter(model, job.train, hp, job.config, val_examples=job.validation, on_progress=seen.append)
    assert [(p.step, p.val_exact_match) for p in seen if p.val_loss is not None][-1] == (120, 1.0)
    assert all(p.val_exact_match is None for p in seen if p.val_loss is None)


@pytest.mark.parametrize("save_dtype", ["float16", "float32"])
def test_frozen_bank_trains_only_the_logits_and_keeps_the_bank(save_dtype: str) -> None:
    """A shared-bank job: the bank gets no update, the adapter carries that very bank (same
    dtype, same id, whatever `save_dtype`), and the logits alone still learn the task."""
    model, tok = task_model(), byte_tokenizer()
    hp = TASK_HP.model_copy(update={"save_dtype": save_dtype})
    job = prepare_job(described(model), tok, hp, TASK_FILE)
    shared = (torch.rand(64, 16, generator=torch.Generator().manual_seed(5)) * 0.4 - 0.2).half()
    progress: list[Progress] = []
    result = train_adapter(model, job.train, hp, job.config, frozen_bank=shared, on_progress=progress.append)
    assert torch.equal(result.adapter.bank, shared) and result.adapter.bank_id == bank_id_of(shared)
    assert result.adapter.weights.dtype == hp.torch_save_dtype
    assert progress[-1].loss < 0.5 * progress[0].loss
    with pytest.raises(ValueError, match="frozen bank"):
        train_adapter(model, job.train, hp, job.config, frozen_bank=shared[:32])


def test_validation_loss_per_epoch_and_cancellation() -> None:
    model, tok = task_model(), byte_tokenizer()
    hp = TASK_HP.model_copy(update={"max_steps": None, "epochs": 3, "batch_size": 2})
    job = prepare_job(described(model), tok, hp, TASK_FILE, jsonl([{"prompt": "key0:", "completion": "apple"}]))
    seen: list[Progress] = []
    result = train_adapter(model, job.train, hp, job.config, val_examples=job.validation, on_progress=seen.append)
    # 4 rows, batch 2: two steps per epoch, validation after each epoch.
    assert [s.step for s in seen] == [1, 2, 3, 4, 5, 6]
    assert [s.val_loss is not None for s in seen] == [False, True] * 3
    assert result.val_loss == seen[-1].val_loss and seen[-1].val_loss < seen[1].val_loss
    assert result.best_step == seen[-1].best_step == 6 and not result.stopped_early

    calls = 0

    def stop_after_three() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    ids = torch.tensor([tok.encode("key1:")])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(TrainingCancelled):
        train_adapter(model, job.train, hp, job.config, should_stop=stop_after_three)
    assert calls == 4
    with torch.no_grad():  # a cancelled run leaves no hook behind
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_batches_group_similar_lengths_and_cover_every_row_once() -> None:
    lengths = [5, 50, 6, 51, 7, 52, 8, 53] * 4
    batches = plan_batches(lengths, 4, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 3 for b in batches)
    assert plan_batches(lengths, 4, seed=0, epoch=1) != batches
    assert plan_batches(lengths, 4, seed=0, epoch=0) == batches


# -- datasets -----------------------------------------------------------------------------


def parse(data: bytes, **kw):
    kw.setdefault("max_seq_len", 64)
    return parse_jsonl(data, byte_tokenizer(), **kw)


def test_prompt_completion_rows_mask_the_prompt() -> None:
    [example] = parse(b'\n{"prompt": "ab", "completion": "xyz", "extra": 1}\n\n')
    tok = byte_tokenizer()
    assert example.input_ids == tok.encode("ab") + tok.encode("xyz")
    assert example.labels == [IGNORE_INDEX] * 2 + tok.encode("xyz")


def test_chat_rows_train_only_the_last_assistant_turn() -> None:
    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    row = {
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    [example] = parse_jsonl(jsonl([row]), tok, max_seq_len=128)
    answer = tok.encode("ok\n")
    prompt = tok.encode("<system>be brief\n<user>hi\n<assistant>yo\n<user>again\n<assistant>")
    assert example.input_ids == prompt + answer
    assert example.labels == [IGNORE_INDEX] * len(prompt) + answer


def test_truncation_keeps_the_completion() -> None:
    data = jsonl([{"prompt": "p" * 20, "completion": "c" * 6}])
    with pytest.raises(DatasetError) as err:
        parse(data, max_seq_len=10)
    assert err.value.field == "training_file line 1" and "26 tokens exceed max_seq_len 10" in err.value.reason
    [example] = parse(data, max_seq_len=10, truncation="truncate")
    tok = byte_tokenizer()
    assert example.input_ids == tok.encode("pppp" + "cccccc")
    assert example.labels[4:] == tok.encode("cccccc")
    [short] = parse(jsonl([{"prompt": "p", "completion": "c" * 20}]), max_seq_len=10, truncation="truncate")
    assert len(short.input_ids) == 10 and short.labels[0] == IGNORE_INDEX


GOOD = '{"prompt": "a", "completion": "b"}'


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (f'{GOOD}\n{GOOD}\n{{"prompt": "a", "completion"', "training_file line 3", "malformed JSON"),
        ("", "training_file", "contains no rows"),
        ("\n  \n", "training_file", "contains no rows"),
        (f'{GOOD}\n{{"prompt": "a"}}', "training_file line 2", "missing field 'completion'"),
        ('{"completion": "b"}', "training_file line 1", "missing field 'prompt'"),
        ('{"prompt": 7, "completion": "b"}', "training_file line 1.prompt", "must be a string, got number"),
        ('{"prompt": "a", "completion": ""}', "training_file line 1.completion", "must not be empty"),
        ("[1, 2]", "training_file line 1", "must be a JSON object, got array"),
        ('{"prompt": "a", "completion": "b", "messages": []}', "training_file line 1", "not both"),
        ('{"messages": "hi"}', "training_file line 1.messages", "must be a list, got string"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "training_file line 1.messages", "at least one"),
        (
            '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
            "training_file line 1.messages[0].role",
            "must be one of",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}',
            "training_file line 1.messages[1].role",
            "last message must be the assistant",
        ),
        (
            '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}',
            "training_file line 1.messages[0].content",
            "must be a string",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
            "training_file line 1.messages",
            "no chat template",
        ),
    ],
)
def test_bad_rows_name_line_and_field(text: str, field: str, reason: str) -> None:
    with pytest.raises(DatasetError) as err:
        parse(text.encode())
    assert err.value.field == field and reason in err.value.reason, err.value
    assert err.value.kind == "invalid_request"


def test_non_utf8_and_size_limits() -> None:
    with pytest.raises(DatasetError, match=r"training_file line 2: is not valid UTF-8 \(byte 12\)"):
        parse(GOOD.encode() + b'\n{"prompt": "\xff", "completion": "b"}')
    cases = [
        (GOOD.encode() * 100, DatasetLimits(max_bytes=1000), "training_file", "exceed the limit of 1000"),
        ("\n".join([GOOD] * 3).encode(), DatasetLimits(max_rows=2), "training_file", "more than 2 rows"),
        (b'{"prompt": "' + b"a" * 100 + b'"}', DatasetLimits(max_line_bytes=50), "training_file line 1", "longer"),
    ]
    for data, limits, field, reason in cases:
        with pytest.raises(DatasetTooLargeError) as err:
            parse(data, limits=limits)
        assert err.value.field == field and reason in err.value.reason and err.value.kind == "too_large"


def test_an_endless_file_is_refused_after_max_rows_without_reading_on() -> None:
    class Endless(io.RawIOBase):
        """A stream that claims billions of rows: it never ends."""

        lines_read = 0

        def readline(self, size: int = -1) -> bytes:
            self.lines_read += 1
            return GOOD.encode() + b"\n"

    stream = Endless()
    with pytest.raises(DatasetTooLargeError, match="more than 5 rows"):
        parse(stream, limits=DatasetLimits(max_rows=5))
    assert stream.lines_read == 6


# -- hyperparameters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"r": 0}, "hyperparameters.r", "greater than or equal to 1"),
        ({"lr_bank": -1}, "hyperparameters.lr_bank", "greater than 0"),
        ({"warmup_ratio": 1.0}, "hyperparameters.warmup_ratio", "less than 1"),
        ({"learning_rate": 1e-3}, "hyperparameters.learning_rate", "Extra inputs"),
        ({"topk": 9, "num_vectors": 8}, "hyperparameters.topk", "exceeds num_vectors"),
        ({"save_dtype": "int8"}, "hyperparameters.save_dtype", "float16"),
        ({"truncation": "drop"}, "hyperparameters.truncation", "refuse"),
        ({"target_modules": []}, "hyperparameters.target_modules", "at least 1"),
        ({"target_modules": ["q_proj", "q_proj"]}, "hyperparameters.target_modules", "unique"),
        ({"target_modules": ["q proj"]}, "hyperparameters.target_modules", "not a module name"),
        ({"batch_size": "four"}, "hyperparameters.batch_size", "integer"),
        ({"eval_steps": 0}, "hyperparameters.eval_steps", "greater than or equal to 1"),
        ({"early_stopping_patience": 0}, "hyperparameters.early_stopping_patience", "greater than or equal to 1"),
        ({"eval_exact_match_rows": 257}, "hyperparameters.eval_exact_match_rows", "less than or equal to 256"),
        ({"bank_id": "sha256-XYZ"}, "hyperparameters.bank_id", "should match pattern"),
        ({"bank_of": "../x"}, "hyperparameters.bank_of", "only letters"),
        ({"bank_of": "a", "bank_id": "sha256-" + "0" * 40}, "hyperparameters.bank_of", "not both"),
        ([1], "hyperparameters", "must be an object"),
    ],
)
def test_hyperparameter_bounds(data: object, field: str, reason: str) -> None:
    with pytest.raises(HyperparameterError) as err:
        TrainingHyperparameters.parse(data)
    assert err.value.field == field and reason in err.value.reason, err.value


def test_defaults() -> None:
    """The paper's method at ten times its learning rates, steps from the data size
    (see `hyperparams`)."""
    hp = TrainingHyperparameters.parse(None)
    assert (hp.lr_bank, hp.lr_logits, hp.topk, hp.save_dtype, hp.truncation) == (1e-2, 1e-1, 2, "float16", "refuse")
    assert (hp.epochs, hp.max_steps, hp.batch_size, hp.warmup_ratio) == (None, None, 4, 0.1)
    assert (hp.target_modules, hp.r, hp.vector_length, hp.num_vectors) == (["q_proj", "v_proj"], 4, 64, 256)


@pytest.mark.parametrize(
    ("rows", "update", "epochs", "steps"),
    [
        (240, {}, 1, 60),  # a large file is read once: 60 steps at batch 4
        (1000, {}, 1, 250),
        (20, {}, 12, 60),  # a small one is repeated up to MIN_AUTO_STEPS
        (7, {}, 30, 60),  # 2 steps per epoch (the last batch short)
        (1, {}, 60, 60),
        (20, {"epochs": 2}, 2, 10),  # given epochs win
        (20, {"batch_size": 2, "grad_accum_steps": 5}, 30, 60),  # a step takes 10 rows
        (20, {"max_steps": 7}, 12, 7),  # max_steps replaces the epochs
    ],
)
def test_steps_from_the_data_size(rows: int, update: dict, epochs: int, steps: int) -> None:
    """Without `epochs` or `max_steps`, a job makes as many passes as give it at least
    `MIN_AUTO_STEPS` optimizer steps; the trainer runs `total_steps`."""
    hp = TrainingHyperparameters.parse(update)
    assert (hp.epochs_for(rows), hp.total_steps(rows)) == (epochs, steps)


@pytest.mark.parametrize(
    ("update", "kw", "field", "reason"),
    [
        ({"vector_length": 24}, {}, "hyperparameters.vector_length", "24 does not divide"),
        ({"target_modules": ["qkv_proj"]}, {}, "hyperparameters.target_modules", "no linear layer 'qkv_proj'"),
        ({"target_modules": ["lm_head"]}, {}, "hyperparameters.target_modules", "no linear layer 'lm_head'"),
        ({"r": 8}, {"max_rank": 4}, "hyperparameters.r", "rank limit 4"),
        ({"num_vectors": 512}, {"max_num_vectors": 256}, "hyperparameters.num_vectors", "exceeds the limit 256"),
        ({"r": 64, "num_vectors": 60000}, {}, "hyperparameters.num_vectors", "logits exceed the limit"),
        ({"max_seq_len": 1024}, {"max_positions": 256}, "hyperparameters.max_seq_len", "context of 256"),
        ({"max_seq_len": 129}, {"max_batch_tokens": 128}, "hyperparameters.max_seq_len", "128 tokens per training"),
    ],
)
def test_check_fits_names_the_field(update: dict, kw: dict, field: str, reason: str) -> None:
    shapes = module_shapes(tiny_llama())
    hp = TrainingHyperparameters(target_modules=ALL_LINEAR, vector_length=16, num_vectors=64).model_copy(update=update)
    hp = TrainingHyperparameters.model_validate(hp.model_dump())
    with pytest.raises(HyperparameterError) as err:
        hp.check_fits(shapes, **kw)
    assert err.value.field == field and reason in err.value.reason, err.value


def test_check_fits_matches_suffixes_and_full_names() -> None:
    shapes = module_shapes(tiny_llama())
    hp = TrainingHyperparameters(target_modules=["v_proj", "model.layers.1.mlp.down_proj"], vector_length=16)
    config = hp.check_fits(shapes, base_model="tiny")
    assert [m.name for m in config.modules] == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert config.base_model == "tiny" and config.r == 4 and config.num_vectors == 256


@pytest.mark.parametrize("save_dtype", ["float16", "float32"])
def test_published_bytes_are_known_before_training(tmp_path, save_dtype: str) -> None:
    """What the quota check at job creation charges is what the store charges later."""
    model = task_model()
    hp = TASK_HP.model_copy(update={"max_steps": 1, "save_dtype": save_dtype, "num_vectors": 48, "topk": 3})
    job = prepare_job(described(model), byte_tokenizer(), hp, TASK_FILE)
    adapter = train_adapter(model, job.train, hp, job.config).adapter
    with SQLiteAdapterStore(tmp_path / "adapters.db") as store:
        assert published_bytes(job.config, hp.torch_save_dtype) == store.put("t", "a", adapter).stored_bytes


@pytest.mark.parametrize("name", ["eval_steps", "early_stopping_patience", "eval_exact_match_rows"])
def test_evaluation_settings_need_a_validation_file(name: str) -> None:
    hp = TASK_HP.model_copy(update={name: 2})
    with pytest.raises(HyperparameterError) as err:
        prepare_job(described(tiny_llama()), byte_tokenizer(), hp, TASK_FILE)
    assert err.value.field == f"hyperparameters.{name}" and "validation_file" in err.value.reason


def test_prepare_job_checks_hyperparameters_before_the_file() -> None:
    hp = TrainingHyperparameters(vector_length=24)
    with pytest.raises(HyperparameterError):
        prepare_job(described(tiny_llama()), byte_tokenizer(), hp, b"not json")
    hp = TrainingHyperparameters(vector_length=16, max_seq_len=64)
    with pytest.raises(DatasetError, match="validation_file line 1"):
        prepare_job(described(tiny_llama()), byte_tokenizer(), hp, GOOD.encode(), b"not json")
