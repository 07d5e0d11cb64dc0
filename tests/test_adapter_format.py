"""The adapter wire format and its validation.

Blobs and PEFT checkpoints come from tenants, so every rule is checked on its own: each
test feeds one defect and asserts the exact error class (the HTTP layer maps it to a
status) and its `.field` (the HTTP layer names it in the 4xx body).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vbserve_store import (
    AdapterConfig,
    AdapterError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    AdapterValidationError,
    BankNotFoundError,
    IncompatibleBaseModelError,
    ModuleSpec,
    VBLoRAAdapter,
    decode_adapter,
    encode_adapter,
    encode_bank,
)
from vbserve_store.codec import FORMAT, FORMAT_VERSION
from vbserve_store.peft_io import PATTERN_BUDGET_S, export_peft, read_peft_files

REPO = Path(__file__).resolve().parents[1]
MODULES = (
    ModuleSpec("model.layers.0.self_attn.q_proj", 64, 64),
    ModuleSpec("model.layers.0.self_attn.v_proj", 64, 32),
    ModuleSpec("model.layers.1.self_attn.q_proj", 64, 64),
)


def make_adapter(h: int = 32, k: int = 3, seed: int = 0) -> VBLoRAAdapter:
    config = AdapterConfig(MODULES, r=2, vector_length=16, num_vectors=h, topk=k, base_model="tiny")
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(config.num_subvectors, h, generator=gen)
    return VBLoRAAdapter.from_logits(config, torch.rand(h, 16, generator=gen) - 0.5, logits)


def blob_parts(adapter: VBLoRAAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a valid blob, to tamper with one at a time."""
    blob = encode_adapter(adapter)
    return st_load(blob), json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])["__metadata__"]


def craft(adapter: VBLoRAAdapter, **changes: object) -> bytes:
    """A blob of `adapter` with tensors or metadata entries replaced (None drops one)."""
    tensors, metadata = blob_parts(adapter)
    for key, value in changes.items():
        target = tensors if key in ("bank", "indices", "weights", "extra") else metadata
        if value is None:
            del target[key]
        else:
            target[key] = value.contiguous() if isinstance(value, torch.Tensor) else value
    return st_save(tensors, metadata=metadata)


def expect(error: type[AdapterError], field: str, call: Callable[[], object], match: str | None = None) -> AdapterError:
    """`call()` raises exactly `error` (not a sibling or parent) naming `field`."""
    with pytest.raises(AdapterError, match=match) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert info.value.field == field
    assert isinstance(info.value, AdapterError)
    return info.value


def header_dtypes(blob: bytes) -> dict[str, str]:
    return {name: info["dtype"] for name, info in safetensors.deserialize(blob)}


# --- round trips -------------------------------------------------------------------------


def assert_same(a: VBLoRAAdapter, b: VBLoRAAdapter) -> None:
    assert a.config == b.config and a.bank_id == b.bank_id
    for name in ("bank", "indices", "weights"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_float32_round_trip_is_exact() -> None:
    """Bank, indices and the k-1 stored weights come back bit for bit; the last weight is
    re-derived as 1 - sum(others) (as PEFT does), so it may move by float rounding only,
    and a second round trip is then exact in every value."""
    original = make_adapter()
    once = decode_adapter(encode_adapter(original))
    assert torch.equal(once.bank, original.bank)
    assert torch.equal(once.indices.long(), original.indices.long())
    assert torch.equal(once.weights[:, :-1], original.weights[:, :-1])
    assert (once.weights[:, -1] - original.weights[:, -1]).abs().max() <= 1e-6
    assert_same(decode_adapter(encode_adapter(once)), once)


def test_one_adapter_encodes_to_one_file() -> None:
    """The same bytes from every encoding, after a decode-encode round trip, and in other
    processes with other hash seeds (safetensors alone wrote its metadata in a random order:
    20 encodings of one adapter gave 17 different files)."""
    adapter = make_adapter()
    blob = encode_adapter(adapter)
    assert {encode_adapter(adapter) for _ in range(20)} == {blob}
    assert encode_adapter(decode_adapter(blob)) == blob
    assert {encode_bank(adapter.bank) for _ in range(20)} == {encode_bank(adapter.bank)}
    script = (
        "import hashlib, sys\n"
        "from vbserve_store import encode_adapter\n"
        "from tests.test_adapter_format import make_adapter\n"
        "sys.stdout.write(hashlib.sha256(encode_adapter(make_adapter())).hexdigest())\n"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout == hashlib.sha256(blob).hexdigest(), f"PYTHONHASHSEED={seed}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compact_dtypes_round_trip_exactly(dtype: torch.dtype) -> None:
    """A compact copy keeps its dtype through the codec and is stored smaller."""
    original = make_adapter()
    compact = original.to(dtype)
    assert compact.bank.dtype == dtype and compact.weights.dtype == dtype
    assert (compact.weights.float() - original.weights).abs().max() < 1e-2
    blob = encode_adapter(compact)
    assert_same(decode_adapter(blob), compact)
    assert len(blob) < len(encode_adapter(original))
    expected = "F16" if dtype == torch.float16 else "BF16"
    assert header_dtypes(blob)["bank"] == header_dtypes(blob)["weights"] == expected


def test_blob_without_bank_needs_the_bank() -> None:
    adapter = decode_adapter(encode_adapter(make_adapter()))  # last weight already re-derived
    blob = encode_adapter(adapter, include_bank=False)
    assert "bank" not in header_dtypes(blob)
    assert len(blob) < len(encode_adapter(adapter))
    held = {adapter.bank_id: adapter.bank}
    assert_same(decode_adapter(blob, bank_resolver=held.get), adapter)
    err = expect(BankNotFoundError, "bank_id", lambda: decode_adapter(blob))
    assert isinstance(err, AdapterNotFoundError)
    expect(BankNotFoundError, "bank_id", lambda: decode_adapter(blob, bank_resolver=lambda _: None))
    # A resolver that hands back some other bank of the right shape is caught by the hash.
    other = make_adapter(seed=1).bank
    expect(AdapterValidationError, "bank_id", lambda: decode_adapter(blob, bank_resolver=lambda _: other))


@pytest.mark.parametrize(("h", "dtype"), [(32, "U8"), (256, "U8"), (257, "I16"), (4096, "I16")])
def test_indices_use_the_smallest_integer_type(h: int, dtype: str) -> None:
    """uint8 holds indices up to 255, so h = 256 still fits (PEFT switches to int16 there)."""
    adapter = make_adapter(h=h)
    assert header_dtypes(encode_adapter(adapter))["indices"] == dtype
    assert torch.equal(decode_adapter(encode_adapter(adapter)).indices.long(), adapter.indices.long())


# --- one test per validation rule ---------------------------------------------------------


def test_truncated_blob() -> None:
    blob = encode_adapter(make_adapter())
    expect(AdapterFormatError, "blob", lambda: decode_adapter(blob[:-7]))  # tensor data cut
    expect(AdapterFormatError, "blob", lambda: decode_adapter(blob[:100]))  # header cut
    expect(AdapterFormatError, "blob", lambda: decode_adapter(blob[:5]))  # length prefix cut


def test_lying_header_length() -> None:
    blob = encode_adapter(make_adapter())
    (n,) = struct.unpack("<Q", blob[:8])
    for lie in (n + 1, n - 1, len(blob), 1 << 40):
        expect(AdapterFormatError, "blob", lambda lie=lie: decode_adapter(struct.pack("<Q", lie) + blob[8:]))


def test_oversized_blob() -> None:
    blob = encode_adapter(make_adapter())
    assert decode_adapter(blob, max_bytes=len(blob)).config.r == 2
    expect(AdapterTooLargeError, "blob", lambda: decode_adapter(blob, max_bytes=len(blob) - 1))


def test_not_bytes() -> None:
    expect(AdapterFormatError, "blob", lambda: decode_adapter("not bytes"))  # type: ignore[arg-type]


def test_unknown_format_marker() -> None:
    adapter = make_adapter()
    expect(AdapterFormatError, "format", lambda: decode_adapter(craft(adapter, format="pickle")))
    expect(AdapterFormatError, "format", lambda: decode_adapter(craft(adapter, format=None)))
    expect(AdapterFormatError, "format_version", lambda: decode_adapter(craft(adapter, format_version="2")))
    assert (blob_parts(adapter)[1]["format"], blob_parts(adapter)[1]["format_version"]) == (FORMAT, FORMAT_VERSION)


def pack(text: str) -> str:
    """Config metadata as the codec writes it: zlib-compressed, base64-encoded."""
    return base64.b64encode(zlib.compress(text.encode())).decode()


def test_config_metadata_not_json() -> None:
    adapter = make_adapter()
    expect(AdapterFormatError, "config", lambda: decode_adapter(craft(adapter, config="{r: 2")))
    expect(AdapterFormatError, "config", lambda: decode_adapter(craft(adapter, config=pack("{r: 2"))))
    expect(AdapterFormatError, "config", lambda: decode_adapter(craft(adapter, config=pack("{}")[:-8])))
    expect(AdapterFormatError, "config", lambda: decode_adapter(craft(adapter, config=None)))
    expect(AdapterValidationError, "config", lambda: decode_adapter(craft(adapter, config=pack("[1, 2]"))))


def test_config_compression_bomb_is_refused() -> None:
    adapter = make_adapter()
    bomb = pack(" " * (64 << 20))  # 64 MiB of JSON whitespace in a few KB
    expect(AdapterTooLargeError, "config", lambda: decode_adapter(craft(adapter, config=bomb)))


def test_config_fingerprint_must_match_its_modules() -> None:
    adapter = make_adapter()
    cfg = adapter.config.to_json()
    cfg["base_fingerprint"] = "0" * 32
    blob = craft(adapter, config=pack(json.dumps(cfg)))
    expect(AdapterValidationError, "config.base_fingerprint", lambda: decode_adapter(blob))


def test_unexpected_or_missing_tensors() -> None:
    adapter = make_adapter()
    expect(AdapterFormatError, "tensors", lambda: decode_adapter(craft(adapter, extra=torch.zeros(1))))
    expect(AdapterFormatError, "indices", lambda: decode_adapter(craft(adapter, indices=None)))
    expect(AdapterFormatError, "weights", lambda: decode_adapter(craft(adapter, weights=None)))


def test_wrong_dtypes() -> None:
    adapter = make_adapter()
    tensors, _ = blob_parts(adapter)
    int_weights = craft(adapter, weights=tensors["weights"].round().to(torch.int32))
    expect(AdapterValidationError, "weights", lambda: decode_adapter(int_weights), match="dtype")
    float_indices = craft(adapter, indices=tensors["indices"].float())
    expect(AdapterValidationError, "indices", lambda: decode_adapter(float_indices), match="dtype")
    expect(AdapterValidationError, "bank", lambda: decode_adapter(craft(adapter, bank=tensors["bank"].double())))
    expect(
        AdapterValidationError,
        "bank",
        lambda: VBLoRAAdapter(adapter.config, adapter.bank.to(torch.int64), adapter.indices, adapter.weights),
        match="dtype",
    )


def test_index_out_of_range() -> None:
    adapter = make_adapter(h=32)
    tensors, _ = blob_parts(adapter)
    for bad in (32, 255):
        indices = tensors["indices"].clone()
        indices[4, 1] = bad
        expect(AdapterValidationError, "indices", lambda i=indices: decode_adapter(craft(adapter, indices=i)))
    negative = adapter.indices.to(torch.int16)
    negative[0, 0] = -1
    expect(
        AdapterValidationError,
        "indices",
        lambda: VBLoRAAdapter(adapter.config, adapter.bank, negative, adapter.weights),
    )


def test_nan_weight() -> None:
    adapter = make_adapter()
    tensors, _ = blob_parts(adapter)
    for bad in (math.nan, math.inf):
        weights = tensors["weights"].clone()
        weights[3, 0] = bad
        expect(AdapterValidationError, "weights", lambda w=weights: decode_adapter(craft(adapter, weights=w)))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_bank(bad: float) -> None:
    adapter = make_adapter()
    bank = adapter.bank.clone()
    bank[5, 7] = bad
    expect(AdapterValidationError, "bank", lambda: decode_adapter(craft(adapter, bank=bank)), match="NaN or Inf")
    expect(
        AdapterValidationError, "bank", lambda: VBLoRAAdapter(adapter.config, bank, adapter.indices, adapter.weights)
    )


def test_weights_must_sum_to_one() -> None:
    """The blob stores k-1 weights, so only a directly built adapter can break the sum."""
    adapter = make_adapter()
    weights = adapter.weights.clone()
    weights[2] *= 0.9
    expect(
        AdapterValidationError,
        "weights",
        lambda: VBLoRAAdapter(adapter.config, adapter.bank, adapter.indices, weights),
        match="sum to 1",
    )


def test_weights_outside_unit_interval() -> None:
    """Rows that still sum to 1 but hold a weight above 1 and one below 0."""
    adapter = make_adapter()
    weights = adapter.weights.clone()
    weights[2] = torch.tensor([1.5, -0.25, -0.25])
    expect(
        AdapterValidationError,
        "weights",
        lambda: VBLoRAAdapter(adapter.config, adapter.bank, adapter.indices, weights),
        match=r"\[0, 1\]",
    )
    # In a blob: stored free weights above 1 make the derived last weight negative.
    stored = blob_parts(adapter)[0]["weights"].clone()
    stored[2] = torch.tensor([0.7, 0.6])
    expect(AdapterValidationError, "weights", lambda: decode_adapter(craft(adapter, weights=stored)), match=r"\[0, 1\]")


def test_shape_mismatch() -> None:
    adapter = make_adapter()
    tensors, _ = blob_parts(adapter)
    expect(AdapterValidationError, "indices", lambda: decode_adapter(craft(adapter, indices=tensors["indices"][:-1])))
    expect(AdapterValidationError, "weights", lambda: decode_adapter(craft(adapter, weights=tensors["weights"][:-1])))
    expect(AdapterValidationError, "weights", lambda: decode_adapter(craft(adapter, weights=tensors["weights"][:, 0])))
    expect(AdapterValidationError, "bank", lambda: decode_adapter(craft(adapter, bank=tensors["bank"][:, :8])))
    # All k weights stored where k-1 are expected: the row then has k+1 entries.
    full = adapter.weights.contiguous()
    expect(AdapterValidationError, "weights", lambda: decode_adapter(craft(adapter, weights=full)))


def test_mismatched_base_model() -> None:
    config = make_adapter().config
    shapes = {m.name: (m.in_features, m.out_features) for m in MODULES}
    config.check_compatible(shapes)
    config.check_compatible({**shapes, "model.layers.0.mlp.up_proj": (64, 128)})  # extra layers are fine
    missing = {k: v for k, v in shapes.items() if "v_proj" not in k}
    expect(IncompatibleBaseModelError, "modules", lambda: config.check_compatible(missing), match="v_proj")
    other_shape = {**shapes, "model.layers.0.self_attn.v_proj": (64, 64)}
    expect(IncompatibleBaseModelError, "modules", lambda: config.check_compatible(other_shape), match="64->32")


def test_vector_length_must_divide_every_dimension() -> None:
    modules = (ModuleSpec("a", 64, 64), ModuleSpec("b", 64, 40))
    expect(
        AdapterValidationError,
        "vector_length",
        lambda: AdapterConfig(modules, r=2, vector_length=16, num_vectors=8, topk=2),
        match="b.out_features=40",
    )
    # The same rule guards a blob whose config JSON claims such a shape.
    adapter = make_adapter()
    cfg = adapter.config.to_json()
    cfg["modules"][0][1] = 72
    del cfg["base_fingerprint"]
    expect(
        AdapterValidationError, "vector_length", lambda: decode_adapter(craft(adapter, config=pack(json.dumps(cfg))))
    )


# --- PEFT checkpoints ---------------------------------------------------------------------


def peft_files(adapter: VBLoRAAdapter, topk_only: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    return export_peft(adapter, save_only_topk_weights=topk_only)


def read(config: dict, tensors: dict[str, torch.Tensor]) -> VBLoRAAdapter:
    return read_peft_files(json.dumps(config).encode(), st_save({k: v.contiguous() for k, v in tensors.items()}))


@pytest.mark.parametrize("topk_only", [True, False], ids=["topk", "logits"])
def test_untampered_peft_checkpoint_loads(topk_only: bool) -> None:
    """The control for the PEFT tests below: the same files, untouched, import fine."""
    adapter = make_adapter()
    back = read(*peft_files(adapter, topk_only))
    assert torch.equal(back.indices.long(), adapter.indices.long()) and torch.equal(back.bank, adapter.bank)
    assert (back.weights - adapter.weights).abs().max() < 1e-6


def test_peft_config_of_another_type() -> None:
    config, tensors = peft_files(make_adapter())
    config["peft_type"] = "IA3"
    expect(AdapterFormatError, "adapter_config.json.peft_type", lambda: read(config, tensors), match="IA3")
    # LORA is a type we read (tests/test_lora_adapters.py): a VB-LoRA config that claims
    # it is refused for the fields LoRA does not have.
    config["peft_type"] = "LORA"
    expect(AdapterFormatError, "adapter_config.json.num_vectors", lambda: read(config, tensors))


def test_peft_config_with_unknown_field() -> None:
    config, tensors = peft_files(make_adapter())
    config["use_magic"] = True
    expect(AdapterFormatError, "adapter_config.json.use_magic", lambda: read(config, tensors))


def test_peft_config_not_json() -> None:
    _, tensors = peft_files(make_adapter())
    weights = st_save(tensors)
    expect(AdapterFormatError, "adapter_config.json", lambda: read_peft_files(b"{peft", weights))
    expect(AdapterFormatError, "adapter_model.safetensors", lambda: read_peft_files(b"{}", weights[:-3]))


@pytest.mark.parametrize("topk_only", [True, False], ids=["topk", "logits"])
def test_peft_checkpoint_missing_tensors(topk_only: bool) -> None:
    config, tensors = peft_files(make_adapter(), topk_only)
    name = "model.layers.0.self_attn.v_proj"
    suffix = "B_topk_weights" if topk_only else "B"
    without_one = {k: v for k, v in tensors.items() if k != f"base_model.model.{name}.vblora_logits_{suffix}"}
    expect(AdapterFormatError, f"adapter_model.{name}", lambda: read(config, without_one), match="expected tensors")
    without_bank = {k: v for k, v in tensors.items() if "vector_bank" not in k}
    expect(AdapterFormatError, "adapter_model.vblora_vector_bank", lambda: read(config, without_bank))


def test_peft_checkpoint_index_out_of_range() -> None:
    """PEFT's own int16 indices can hold values the bank does not have."""
    config, tensors = peft_files(make_adapter(h=32))
    key = "base_model.model.model.layers.1.self_attn.q_proj.vblora_logits_A_topk_indices"
    tensors[key] = tensors[key].to(torch.int16)
    tensors[key][0, 0, 0] = 261  # narrowed to uint8 before the check, it would wrap to a valid 5
    expect(AdapterValidationError, "indices", lambda: read(config, tensors))


def test_every_error_is_an_adapter_error() -> None:
    for cls in (
        AdapterValidationError,
        AdapterFormatError,
        AdapterTooLargeError,
        IncompatibleBaseModelError,
        AdapterNotFoundError,
        BankNotFoundError,
    ):
        assert issubclass(cls, AdapterError)
    # Format errors are validation errors, so callers that catch the broad class see them.
    assert issubclass(AdapterFormatError, AdapterValidationError) and issubclass(AdapterValidationError, ValueError)


# --- PEFT's target_modules rule -------------------------------------------------------------

QV_MODULES = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]

# (what the config says, as changes to the one PEFT saved with ["q_proj", "v_proj"]; accepted)
TARGET_CASES = [
    ("as saved", {}, True),
    ("full module names", {"target_modules": QV_MODULES}, True),
    ("regex matching q and v", {"target_modules": r".*\.(q|v)_proj"}, True),
    ("layers 0 and 1", {"layers_to_transform": [0, 1]}, True),
    ("layers 0 and 1 by pattern", {"layers_to_transform": [0, 1], "layers_pattern": "layers"}, True),
    ("nonexistent_proj", {"target_modules": ["nonexistent_proj"]}, False),
    ("q_proj only", {"target_modules": ["q_proj"]}, False),
    ("regex matching q only", {"target_modules": r".*\.q_proj"}, False),
    ("regex matching no whole name", {"target_modules": "q_proj|v_proj"}, False),
    ("v_proj excluded", {"exclude_modules": ["v_proj"]}, False),
    ("v_proj excluded by regex", {"exclude_modules": r".*v_proj"}, False),
    ("layer 0 only", {"layers_to_transform": [0]}, False),
]


@pytest.fixture(scope="module")
def saved_qv_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint PEFT itself saved, top-k weights only, for the tiny test model."""
    from tests.conftest import random_peft_vblora, tiny_llama

    model = random_peft_vblora(
        tiny_llama(seed=7), r=4, b=16, h=32, k=2, targets=["q_proj", "v_proj"], seed=1, save_only_topk_weights=True
    )
    folder = tmp_path_factory.mktemp("peft-qv")
    model.save_pretrained(folder)
    return folder


def peft_keeps_every_tensor(folder: Path) -> bool:
    """PEFT's own verdict: the checkpoint loads and none of its tensors is dropped (PEFT
    drops, silently, the tensors of a module its config does not target)."""
    from peft import PeftModel, get_peft_model_state_dict
    from peft.utils.error import NoMatchingPeftModuleError
    from safetensors.torch import load_file

    from tests.conftest import tiny_llama

    try:
        model = PeftModel.from_pretrained(tiny_llama(seed=7), folder)
    except NoMatchingPeftModuleError:
        return False
    return set(load_file(folder / "adapter_model.safetensors")) <= set(get_peft_model_state_dict(model))


@pytest.mark.parametrize(("changes", "accepted"), [pytest.param(c, a, id=i) for i, c, a in TARGET_CASES])
def test_peft_target_modules_must_target_every_tensor(saved_qv_checkpoint, tmp_path, changes, accepted) -> None:
    """We accept exactly the checkpoints whose every tensor PEFT loads."""
    config = {**json.loads((saved_qv_checkpoint / "adapter_config.json").read_text()), **changes}
    weights = (saved_qv_checkpoint / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    assert peft_keeps_every_tensor(tmp_path) is accepted
    if accepted:
        assert (
            sorted(m.name for m in read_peft_files(json.dumps(config).encode(), weights).config.modules) == QV_MODULES
        )
    else:
        expect(
            AdapterValidationError,
            "adapter_config.json.target_modules",
            lambda: read_peft_files(json.dumps(config).encode(), weights),
            match="does not target",
        )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"target_modules": None}, "adapter_config.json.target_modules"),
        ({"target_modules": 7}, "adapter_config.json.target_modules"),
        ({"target_modules": "(q_proj"}, "adapter_config.json.target_modules"),
        ({"exclude_modules": [1]}, "adapter_config.json.exclude_modules"),
        ({"layers_to_transform": "0"}, "adapter_config.json.layers_to_transform"),
        ({"layers_to_transform": [0, 1], "layers_pattern": "(("}, "adapter_config.json.layers_pattern"),
    ],
)
def test_peft_target_fields_of_the_wrong_kind(saved_qv_checkpoint, changes, field) -> None:
    config = {**json.loads((saved_qv_checkpoint / "adapter_config.json").read_text()), **changes}
    weights = (saved_qv_checkpoint / "adapter_model.safetensors").read_bytes()
    expect(AdapterValidationError, field, lambda: read_peft_files(json.dumps(config).encode(), weights))


def test_a_catastrophic_target_pattern_is_cut_short(saved_qv_checkpoint) -> None:
    """A pattern that backtracks exponentially on a 31-character module name (the same on
    Python's `re`): the check gives up within its budget and names the field."""
    config = json.loads((saved_qv_checkpoint / "adapter_config.json").read_text())
    config["target_modules"] = r"(?:(\w)|(\w)|\.)*(?<=\d)"
    weights = (saved_qv_checkpoint / "adapter_model.safetensors").read_bytes()
    started = time.monotonic()
    expect(
        AdapterValidationError,
        "adapter_config.json.target_modules",
        lambda: read_peft_files(json.dumps(config).encode(), weights),
        match="took more than",
    )
    assert time.monotonic() - started < 5 * PATTERN_BUDGET_S
