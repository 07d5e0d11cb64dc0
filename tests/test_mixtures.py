"""Per-request mixtures: composed exactly as PEFT's `add_weighted_adapter` composes them
(PEFT is the oracle: logits on fresh random inputs, and greedy tokens through the engine
beside other rows of the same batch), cached by their recipe, refused with the field named."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from tests.conftest import byte_tokenizer, engine_over, rel_err, tiny_llama
from tests.test_engine import random_adapter
from vbserve.engine import (
    AdapterRef,
    AdapterUnavailableError,
    FinalResult,
    GenerationRequest,
    InvalidRequestError,
    MixtureComponent,
    MixtureRef,
    SamplingParams,
)
from vbserve.engine.adapters import MAX_CACHED_MIXTURES_PER_TENANT, AdapterKey, MixtureKey
from vbserve.settings import Settings
from vbserve.vblora.compose import compose_adapters
from vbserve.vblora.layer import AdapterRouting, wrap_linear_layers, write_adapter_slot
from vbserve.vblora.lora_export import export_lora
from vbserve.vblora.mixture import mix_lora
from vbserve_store.peft_io import write_checkpoint_dir
from vbserve_store.store import SQLiteAdapterStore

TENANT = "t1"
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def mixture(*parts: tuple[str, float], combination: str = "cat", tenant: str = TENANT) -> MixtureRef:
    components = tuple(
        MixtureComponent(n, w, f"adapters[{i}].name", f"adapters[{i}].weight") for i, (n, w) in enumerate(parts)
    )
    return MixtureRef(tenant, components, combination, field="adapters", combination_field="combination")


def peft_mixture(base, adapters: dict, weights: list[float], combination: str, tmp_path: Path):
    """PEFT's LoRA model over `base` holding each adapter (exported as the equivalent LoRA)
    and their `add_weighted_adapter` mixture, set active."""
    names = list(adapters)
    for name, adapter in adapters.items():
        write_checkpoint_dir(tmp_path / name, *export_lora(adapter))
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(tmp_path / name, adapter_name=name)
    model.add_weighted_adapter(names, weights, "mix", combination_type=combination)
    model.set_adapter("mix")
    return model.eval()


def served_logits(base, matrices, input_ids):
    model = copy.deepcopy(base)
    routing = AdapterRouting()
    layers = wrap_linear_layers(model, routing, num_slots=2, max_rank=32)
    write_adapter_slot(layers, 1, matrices)
    routing.slots = torch.ones(input_ids.shape[0], dtype=torch.long)
    with torch.no_grad():
        return model(input_ids).logits


def composed(adapter):
    return {name: (a[0], b[0]) for name, (a, b) in compose_adapters([adapter]).items()}


@pytest.mark.parametrize(
    "combination, second, weights",
    [
        ("cat", dict(targets=ALL, r=2, b=32), [0.7, -0.4]),  # different ranks and modules
        ("linear", dict(targets=("q_proj", "v_proj", "down_proj"), r=4, b=32), [0.6, 1.3]),
        ("linear", dict(targets=("q_proj", "v_proj", "down_proj"), r=4, b=32), [-0.5, 0.8]),
    ],
    ids=["cat", "linear", "linear-negative"],
)
def test_a_mixture_gives_peft_add_weighted_adapter_logits(combination, second, weights, tmp_path):
    base = tiny_llama(seed=11)
    adapters = {"a": random_adapter(base, seed=12, r=4, b=32), "b": random_adapter(base, seed=13, **second)}
    ref_model = peft_mixture(base, adapters, weights, combination, tmp_path)
    input_ids = torch.randint(0, 256, (3, 13), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        ref, plain = ref_model(input_ids).logits, base(input_ids).logits
    mixed = mix_lora([composed(a) for a in adapters.values()], weights, [1.0, 1.0], combination)
    ours = served_logits(base, mixed, input_ids)
    assert rel_err(ref - plain, plain) > 1e-3, "the mixture must move the logits"
    assert rel_err(ours - plain, ref - plain) < 1e-4
    assert rel_err(ours, ref) < 1e-5
    # PEFT's merged matrices themselves, module by module. PEFT's are the mixture's full
    # rank wide, zero past the ranks of the adapters that target the module.
    for name, (a, b) in mixed.items():
        layer = ref_model.base_model.model.get_submodule(name)
        peft_a, peft_b = layer.lora_A["mix"].weight, layer.lora_B["mix"].weight
        r = a.shape[0]
        assert rel_err(a, peft_a[:r]) < 1e-6 and rel_err(b, peft_b[:, :r]) < 1e-6
        assert not peft_a[r:].any() and not peft_b[:, r:].any()


def test_a_mixture_of_one_adapter_at_weight_one_is_that_adapter():
    base = tiny_llama(seed=21)
    adapter = random_adapter(base, seed=22, targets=ALL, r=4, b=32)
    input_ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(23))
    for combination in ("cat", "linear"):
        mixed = mix_lora([composed(adapter)], [1.0], [1.0], combination)
        assert rel_err(served_logits(base, mixed, input_ids), served_logits(base, composed(adapter), input_ids)) < 1e-6


# -- through the engine ------------------------------------------------------------------------


@pytest.fixture
def engine_and_store(tmp_path):
    model = tiny_llama(seed=7)
    store = SQLiteAdapterStore(tmp_path / "a.db")
    store.put(TENANT, "ad0", random_adapter(model, seed=31, r=4, bank_scale=2.0))
    store.put(TENANT, "ad1", random_adapter(model, seed=32, targets=ALL, r=2, b=32, bank_scale=2.0))
    store.put(TENANT, "ad2", random_adapter(model, seed=33, r=4, bank_scale=2.0))
    store.put("t2", "theirs", random_adapter(model, seed=34))
    events: list[str] = []
    settings = Settings(max_lora_rank=8, max_model_len=128, max_batch_size=8)
    engine = engine_over(
        model, byte_tokenizer(), store, settings, on_adapter_event=lambda kind, _: events.append(kind)
    )
    yield engine, store, events
    engine.shutdown()
    store.close()


def request(prompt, adapter=None, n=12):
    return GenerationRequest(prompt, SamplingParams(max_new_tokens=n, logprobs=True), adapter=adapter)


async def generate(engine, requests):
    """Submit all, then collect each one's (token ids, logprobs): they run in one batch."""
    handles = [await engine.submit(r) for r in requests]
    out = []
    for handle in handles:
        logprobs = []
        async for event in handle:
            if isinstance(event, FinalResult):
                assert event.error is None, event.error
                out.append((event.token_ids, torch.tensor(logprobs)))
            elif event.token_id >= 0:
                logprobs.append(event.logprob)
    return out


def peft_greedy(model, prompt, n):
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            last = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            ids.append(int(last.argmax()))
            logprobs.append(float(last.max()))
    return ids[len(prompt) :], torch.tensor(logprobs)


@pytest.mark.parametrize(
    "names, weights, combination", [(["ad0", "ad1"], [0.7, -0.4], "cat"), (["ad0", "ad2"], [0.6, 0.9], "linear")]
)
async def test_the_engine_serves_peft_mixtures_beside_other_rows(
    engine_and_store, names, weights, combination, tmp_path
):
    engine, store, _ = engine_and_store
    prompt = [5, 17, 99, 3, 250, 41, 8]
    mix = mixture(*zip(names, weights, strict=True), combination=combination)
    rows = [
        request(prompt, mix),
        request(prompt, AdapterRef(TENANT, "ad0")),
        request([9, 9, 4, 120]),
        request(prompt, mixture(("ad0", 1.0))),
        request([77, 3, 3], AdapterRef(TENANT, "ad1")),
    ]
    (mixed, mixed_lp), (single, single_lp), (base, _), (one, one_lp), _ = await generate(engine, rows)
    unwrapped = tiny_llama(seed=7)  # the engine's model, before the engine wrapped its layers
    oracle = peft_mixture(unwrapped, {n: store.get(TENANT, n)[1] for n in names}, weights, combination, tmp_path)
    expected, expected_lp = peft_greedy(oracle, prompt, 12)
    assert mixed == expected
    assert rel_err(mixed_lp, expected_lp) < 1e-4
    assert mixed != single and mixed != base, "the mixture must change the output"
    assert one == single and rel_err(one_lp, single_lp) < 1e-5  # one adapter at weight 1 is that adapter


async def test_a_recipe_is_composed_once_and_a_new_version_is_a_new_recipe(engine_and_store):
    engine, store, events = engine_and_store
    prompt = [1, 2, 3, 4]
    first = await generate(engine, [request(prompt, mixture(("ad0", 0.5), ("ad1", 0.5)))])
    composes = events.count("compose_seconds")
    again = await generate(engine, [request(prompt, mixture(("ad0", 0.5), ("ad1", 0.5)))])
    assert events.count("compose_seconds") == composes and again[0][0] == first[0][0]
    await generate(engine, [request(prompt, mixture(("ad0", 0.5), ("ad1", 0.25)))])
    assert events.count("compose_seconds") == composes + 1  # other weights: another recipe
    store.put(TENANT, "ad1", random_adapter(tiny_llama(seed=7), seed=99, targets=ALL, r=2, b=32, bank_scale=2.0))
    republished = await generate(engine, [request(prompt, mixture(("ad0", 0.5), ("ad1", 0.5)))])
    assert events.count("compose_seconds") == composes + 2 and republished[0][0] != first[0][0]
    # A cached mixture is not one of the tenant's adapters: the residency view lists only those.
    assert {name for name, _, _ in engine.resident_adapters(TENANT)} <= {"ad0", "ad1", "ad2"}


async def test_a_stream_of_new_recipes_replaces_the_tenants_own(engine_and_store):
    """Every new weight is a new recipe: past MAX_CACHED_MIXTURES_PER_TENANT the tenant's own
    oldest recipes leave the cache, not other tenants' adapters."""
    engine, _, _ = engine_and_store
    prompt = [1, 2, 3, 4]
    await generate(engine, [request(prompt, AdapterRef("t2", "theirs"))])
    for i in range(MAX_CACHED_MIXTURES_PER_TENANT + 3):
        await generate(engine, [request(prompt, mixture(("ad0", 0.5), ("ad2", 0.1 * (i + 1))))])
    cached = list(engine.adapters._cache)
    own = [k for k in cached if isinstance(k, MixtureKey) and k.tenant == TENANT]
    assert len(own) == MAX_CACHED_MIXTURES_PER_TENANT
    assert own[-1].weights == (0.5, 0.1 * (MAX_CACHED_MIXTURES_PER_TENANT + 3))  # the newest stays
    assert any(isinstance(k, AdapterKey) and (k.tenant, k.name) == ("t2", "theirs") for k in cached)


@pytest.mark.parametrize(
    "ref, error, field",
    [
        (mixture(("ad0", 1.0), ("nope", 1.0)), "not_found", "adapters[1].name"),
        (mixture(("ad0", 1.0), ("theirs", 1.0)), "not_found", "adapters[1].name"),  # another tenant's
        (mixture(("ad0", 1.0), ("ad1", 0.0)), "invalid_request", "adapters[1].weight"),
        (mixture(("ad0", 1.0), ("ad1", float("nan"))), "invalid_request", "adapters[1].weight"),
        (mixture(("ad0", 1.0), ("ad1", "0.5")), "invalid_request", "adapters[1].weight"),
        (mixture(("ad0", 1.0), ("ad1", 1e9)), "invalid_request", "adapters[1].weight"),
        (mixture(("ad0", 1.0), ("ad1", 10**400)), "invalid_request", "adapters[1].weight"),  # past float range
        (mixture(("ad0", 1.0), ("ad0", 1.0)), "invalid_request", "adapters[1].name"),
        (mixture(*[(f"x{i}", 1.0) for i in range(9)]), "invalid_request", "adapters"),
        (mixture(("ad0", 1.0), ("ad1", 1.0), ("ad2", 1.0)), "invalid_request", "adapters"),  # rank 10 > 8
        (mixture(("ad0", 1.0), ("ad1", 1.0), combination="linear"), "invalid_request", "combination"),  # ranks 4, 2
        (mixture(("ad0", 1.0), combination="ties"), "invalid_request", "combination"),
    ],
    ids=[
        "unknown",
        "other-tenant",
        "zero",
        "nan",
        "string",
        "huge",
        "huge-int",
        "twice",
        "too-many",
        "rank",
        "linear-ranks",
        "ties",
    ],
)
async def test_a_bad_mixture_is_refused_naming_the_field(engine_and_store, ref, error, field):
    engine, *_ = engine_and_store
    with pytest.raises((AdapterUnavailableError, InvalidRequestError)) as caught:
        await engine.submit(request([1, 2, 3], ref))
    assert (caught.value.kind, caught.value.field) == (error, field), caught.value
